"""Benchmark accuracy with lm-evaluation-harness on quantloop's runtimes, and the paired drop between two models.

`evaluate_tasks` runs lm-eval's evaluator on task config dicts (the task's prompts, choices, acc and acc_norm are
lm-eval's) with every item's result logged, and returns one TaskScore per task: the accuracies, their standard
errors and the per-item correctness in a fixed item order. The order is a seeded shuffle of the task's documents,
the same for every model, so a cap of `limit` items scores the same items for the float baseline and a quantized
model (and a sample of the whole task rather than its first documents, which are often one topic).

`paired_drop` compares two TaskScores item by item: drop = mean(base - quant) in percentage points, its standard
error the sample standard deviation of the per-item differences over sqrt(n).

A model's TaskScores are cached under CACHE_DIR/accuracy, keyed by the model file's sha256, the task config, the
item count, the runtime and ADAPTER_VERSION, so the float baseline is scored once for every attempt of a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from quantloop.errors import InputError
from quantloop.fileio import sha256_file, write_json_atomic
from quantloop.models.checkpoints import ResolvedModel
from quantloop.paths import CACHE_DIR

ORDER_SEED = 1234
ADAPTER_VERSION = "1"  # bump when scores could change (adapter.py, this module): the cache is keyed by it


class TaskScore(BaseModel):
    task: str
    items: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    correct: list[int]  # acc of each item (1 or 0), in doc_ids order
    correct_norm: list[int] | None = None  # acc_norm of each item
    chosen: list[int]  # the choice with the highest log-likelihood (the answer acc judges)
    doc_ids: list[int]
    seconds: float
    items_per_s: float
    runtime: str = ""
    cached: bool = False


class PairedDrop(BaseModel):
    task: str
    metric: str
    base: float  # accuracy of the baseline on these items, in percent
    quant: float
    drop_pp: float  # base - quant, percentage points (positive: the quantized model got fewer right)
    stderr_pp: float  # standard error of the drop from the per-item differences
    n: int
    changed: int  # items whose correctness differs between the two


def stderr_of_mean(x) -> float:
    """Standard error of a mean: sample standard deviation (n-1) over sqrt(n), as lm-eval's mean_stderr."""
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_drop(base: TaskScore, quant: TaskScore, metric: str = "acc") -> PairedDrop:
    """The drop from `base` to `quant` on the same items: mean of the per-item differences (percentage points) and
    its standard error sd(d)/sqrt(n). Refuses scores of different items or item orders."""
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', not {metric!r}")
    if base.doc_ids != quant.doc_ids:
        raise InputError(None, f"{base.task} vs {quant.task}: the two scores are not of the same items "
                         f"({len(base.doc_ids)} and {len(quant.doc_ids)} items)", "score both models with the same task and limit")
    a = base.correct if metric == "acc" else base.correct_norm
    b = quant.correct if metric == "acc" else quant.correct_norm
    if a is None or b is None:
        raise InputError(None, f"{base.task}: no per-item {metric}", "use a multiple-choice task that reports acc_norm")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return PairedDrop(task=base.task, metric=metric, base=100 * float(np.mean(a)), quant=100 * float(np.mean(b)),
                      drop_pp=100 * float(d.mean()), stderr_pp=100 * stderr_of_mean(d), n=len(d),
                      changed=int(np.count_nonzero(d)))


def merged(a: TaskScore, b: TaskScore) -> TaskScore:
    """One score of a's items followed by b's (b scored with start=a.items): what scoring both at once gives."""
    correct, norm = a.correct + b.correct, (a.correct_norm + b.correct_norm) if a.correct_norm and b.correct_norm else None
    seconds = a.seconds + b.seconds
    return a.model_copy(update={
        "items": len(correct), "acc": float(np.mean(correct)), "acc_stderr": stderr_of_mean(correct),
        "acc_norm": float(np.mean(norm)) if norm else None, "acc_norm_stderr": stderr_of_mean(norm) if norm else None,
        "correct": correct, "correct_norm": norm, "chosen": a.chosen + b.chosen, "doc_ids": a.doc_ids + b.doc_ids,
        "seconds": seconds, "items_per_s": len(correct) / seconds if seconds > 0 else float("nan"), "cached": a.cached and b.cached})


def item_order(n_docs: int, task: str) -> list[int]:
    """A fixed shuffle of a task's document ids (the same for every model)."""
    seed = int(hashlib.sha256(f"{ORDER_SEED}:{task}".encode()).hexdigest()[:8], 16)
    return [int(i) for i in np.random.default_rng(seed).permutation(n_docs)]


_DIGESTS: dict[tuple, str] = {}


def model_digest(path: str | Path) -> str:
    """sha256 of a model file, or of a checkpoint folder's weights and config (remembered per path, size and time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _digest(path)
    return _DIGESTS[key]


def _digest(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def model_file_of(model: ResolvedModel | str | Path, runtime: str) -> Path:
    """The file (or folder) a runtime runs of a model: its GGUF on llama.cpp, its HF folder on transformers."""
    if isinstance(model, ResolvedModel):
        path = model.gguf if runtime == "llama.cpp" else model.hf_dir
        if path is None:
            raise InputError(model.path, f"has no model for the {runtime} runtime", "prepare it with `quantloop prepare`")
        return Path(path)
    return Path(model)


def cache_path(digest: str, task: str, config: dict, limit: int | None, runtime: str, from_end: bool = False) -> Path:
    key = hashlib.sha256(json.dumps([digest, config, limit, runtime, ADAPTER_VERSION] + (["from_end"] if from_end else []),
                                    sort_keys=True, default=str)
                         .encode()).hexdigest()[:24]
    return CACHE_DIR / "accuracy" / f"{task}-{key}.json"


def chosen_of(sample: dict) -> int:
    lls = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
    lls = [x[0] if isinstance(x, (list, tuple)) else x for x in lls]
    return int(np.argmax(np.asarray(lls, dtype=float)))


def as_lm(runner):
    """An lm-eval LM from what the caller holds: an LM (QuantloopLM, lm-eval's HFLM, ...), an open runner
    (LlamaCppRunner, TransformersRunner), or the path of a .gguf file or checkpoint folder. Returns (lm, opened_here)."""
    from lm_eval.api.model import LM  # deferred: lm_eval

    from quantloop.benchmarks.adapter import QuantloopLM, open_lm  # deferred: lm_eval

    if isinstance(runner, LM):
        return runner, False
    if hasattr(runner, "runtime") and hasattr(runner, "tokenize"):
        return QuantloopLM(runner), True
    path = Path(runner)
    if not path.exists():
        raise InputError(path, "model not found", "pass a .gguf file, a checkpoint folder or an open runner")
    return open_lm(path), True


def evaluate_tasks(runner: Any, task_configs: dict[str, dict], limit: int | None = None,
                   model: ResolvedModel | str | Path | None = None, from_end: bool = False, start: int = 0) -> dict[str, TaskScore]:
    """Score `runner` (an open LlamaCppRunner / TransformersRunner, an lm-eval LM, or a model path) on each lm-eval
    task config (name -> config dict) over the first `limit` items of the task's fixed order (all when None).

    `model`: the model the runner runs (a ResolvedModel or its path); when given, each task's score is cached
    under CACHE_DIR/accuracy by the digest of that model's file for this runtime, and read back next time.
    `from_end`: the last `limit` items of the order instead of the first (disjoint from the acceptance bar's items
    while both counts together stay within the task: what checkpoint selection scores). `start`: skip the first
    `start` items of the order (score items start..limit-1, to extend an earlier score; see merged)."""
    from lm_eval import evaluator  # deferred: lm_eval
    from lm_eval.tasks import TaskManager  # deferred: lm_eval

    lm, opened = as_lm(runner)
    runtime = getattr(getattr(lm, "runner", None), "runtime", type(lm).__name__)
    digest = model_digest(model_file_of(model, runtime)) if model is not None else None
    out: dict[str, TaskScore] = {}
    manager = TaskManager(include_defaults=False)
    try:
        for name, config in task_configs.items():
            cfile = cache_path(digest, name, config, (start, limit) if start else limit, runtime, from_end) if digest else None
            if cfile is not None and cfile.is_file():
                try:
                    out[name] = TaskScore.model_validate_json(cfile.read_text()).model_copy(update={"cached": True})
                    continue
                except ValueError:
                    pass  # a damaged cache file is scored again and rewritten
            task_dict = manager.load([dict(config, task=name)])
            order = item_order(len(task_dict["tasks"][name].eval_docs), name)
            ids = (order[-limit:] if from_end else order[:limit]) if limit else order
            ids = ids[start:]
            t0 = time.perf_counter()
            results = evaluator.evaluate(lm=lm, task_dict=task_dict, samples={name: ids}, bootstrap_iters=0,
                                         log_samples=True, verbosity="ERROR")
            seconds = time.perf_counter() - t0
            by_id = {int(s["doc_id"]): s for s in results["samples"][name]}
            samples = [by_id[i] for i in ids]
            correct = [int(s["acc"]) for s in samples]
            norm = [int(s["acc_norm"]) for s in samples] if all("acc_norm" in s for s in samples) else None
            score = TaskScore(
                task=name, items=len(ids), acc=float(np.mean(correct)), acc_stderr=stderr_of_mean(correct),
                acc_norm=float(np.mean(norm)) if norm else None, acc_norm_stderr=stderr_of_mean(norm) if norm else None,
                correct=correct, correct_norm=norm, chosen=[chosen_of(s) for s in samples], doc_ids=ids,
                seconds=seconds, items_per_s=len(ids) / seconds if seconds > 0 else float("nan"), runtime=runtime)
            if cfile is not None:
                write_json_atomic(cfile, score)
            out[name] = score
    finally:
        if opened and hasattr(lm, "close"):
            lm.close()
    return out
