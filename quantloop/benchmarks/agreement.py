"""Does quantloop's scoring agree with lm-eval's own transformers backend (HFLM)? The same items scored both ways
on the float model: the two accuracies, whether they differ by less than the standard error of their paired
difference, and the share of items where both pick the same answer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from quantloop.benchmarks.score import TaskScore, evaluate_tasks, paired_drop


class Agreement(BaseModel):
    task: str
    items: int
    acc_ours: float
    acc_hflm: float
    acc_norm_ours: float | None
    acc_norm_hflm: float | None
    acc_diff_pp: float  # ours - HFLM, percentage points
    acc_stderr_pp: float  # standard error of one accuracy (ours), points
    within_stderr: bool  # |diff| <= the accuracy's standard error
    same_answer: float  # share of items where both chose the same answer (acc's argmax)


def agreement(ours: TaskScore, hflm: TaskScore) -> Agreement:
    """Compare two scores of the same items (paired_drop refuses different ones)."""
    d = paired_drop(hflm, ours, "acc")  # refuses different items
    diff = -d.drop_pp
    se = 100 * ours.acc_stderr
    same = float(np.mean(np.asarray(ours.chosen) == np.asarray(hflm.chosen)))
    return Agreement(task=ours.task, items=ours.items, acc_ours=ours.acc, acc_hflm=hflm.acc, acc_norm_ours=ours.acc_norm,
                     acc_norm_hflm=hflm.acc_norm, acc_diff_pp=diff, acc_stderr_pp=se,
                     within_stderr=bool(abs(diff) <= se or (math.isnan(se) and diff == 0)), same_answer=same)


def open_hflm(hf_dir: str | Path, batch_size: int = 8):
    """lm-eval's transformers backend on a local checkpoint folder, float32 on the CPU, offline."""
    from lm_eval.models.huggingface import HFLM  # deferred: lm_eval

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch_size)


def agreement_with_hflm(ours: dict[str, TaskScore], hf_dir: str | Path, task_configs: dict[str, dict],
                        limit: int | None) -> tuple[dict[str, TaskScore], dict[str, Agreement]]:
    """Score the float checkpoint `hf_dir` with HFLM on the tasks and items of `ours`; return its scores and the
    agreement per task."""
    theirs = evaluate_tasks(open_hflm(hf_dir), {t: task_configs[t] for t in ours}, limit=limit)
    return theirs, {t: agreement(ours[t], theirs[t]) for t in ours}
