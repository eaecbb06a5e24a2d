"""How many QAT steps each stage takes, and how that plan shrinks to meet a time limit.

A QAT run is planned in steps (progressive stages, then a global fine-tune). With a time limit
(`QATConfig.max_s`), the plan is re-fitted after every step: the measured seconds per step so far
(held-out checks included) say how many more steps fit before the limit, and the steps still to take are
cut in proportion, every stage keeping its share, so the run ends with its global fine-tune on time
rather than stopping in the middle of a stage. The cosine learning rate follows the shrunk total.

Public: StepPlan, fit_counts.
"""

from __future__ import annotations

import time


def fit_counts(counts: list[int], limit: int) -> list[int]:
    """`counts` scaled down so that they sum to at most `limit` (largest remainders first, order kept);
    unchanged when they already fit."""
    total = sum(counts)
    limit = max(0, int(limit))
    if total <= limit:
        return list(counts)
    exact = [c * limit / total for c in counts]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in by_remainder[: limit - sum(out)]:
        out[i] += 1
    return out


class StepPlan:
    """Steps per stage (the last entry: the global fine-tune) and a deadline (time.perf_counter seconds) or None."""

    def __init__(self, counts: list[int], deadline: float | None = None, clock=time.perf_counter):
        self.counts = list(counts)
        self.deadline = deadline
        self.clock = clock
        self.started: float | None = None
        self.taken = [0] * len(counts)
        self.shrunk = False

    @property
    def total(self) -> int:
        """Steps of the whole run as now planned (taken + still to take)."""
        return sum(self.counts)

    @property
    def steps_taken(self) -> int:
        return sum(self.taken)

    def begin(self) -> None:
        """Start the clock of the training steps; fits the plan to the time left (none when the limit has passed)."""
        self.started = self.clock()
        if self.deadline is not None and self.started >= self.deadline:
            self._fit(0)

    def step_done(self, stage: int) -> None:
        """One step of `stage` is done: count it and, under a deadline, fit the remaining steps to the time left
        at the rate measured so far."""
        self.taken[stage] += 1
        if self.deadline is None or self.started is None:
            return
        now = self.clock()
        rate = (now - self.started) / self.steps_taken
        self._fit(int((self.deadline - now) / rate) if rate > 0 else 0)

    def stop_stage(self, stage: int) -> None:
        """The stage ended early (its held-out check): it takes no more steps."""
        self.counts[stage] = self.taken[stage]

    def left(self, stage: int) -> int:
        return self.counts[stage] - self.taken[stage]

    def _fit(self, affordable: int) -> None:
        remaining = [c - t for c, t in zip(self.counts, self.taken)]
        fitted = fit_counts(remaining, affordable)
        if fitted != remaining:
            self.shrunk = True
            self.counts = [t + f for t, f in zip(self.taken, fitted)]
