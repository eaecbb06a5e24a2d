"""Sequential verdicts: measure in rounds and decide at the first look that shows the verdict.

A bar with a standard error is judged at planned looks (perplexity after 4, 8, 16, ... chunks; speed after every few
interleaved pairs; accuracy after 200, 400, 800 items). Looking more than once gives chance more than one try at
crossing the boundary, so the boundary is raised to keep the error of a whole sequence equal to that of one look at
`decide_sigmas` (2 standard errors: a file exactly at the bar passes 2.3 % of the time): a constant (Pocock-type)
boundary c for the planned looks, such that a measurement whose true value sits on the bar crosses +c at some look with
probability P(Z >= decide_sigmas). c is computed for the information at each look (the amount measured: chunks, pairs
or items), by simulating the standardized running mean of a random walk (a fixed seed, so the same looks always give
the same c). At each look:

    margin >= +c          decided: passes
    margin <= -c          decided: fails
    otherwise             measure the next round; at the last look it fails, not shown (as with one look)

Stopping early never decides more often than one look would: a pass still needs the margin above c at the look it
stops, and c >= decide_sigmas. One look (the cap reached at once) gives c = decide_sigmas exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np

Decision = Literal["pass", "fail"] | None

_PATHS = 200_000


def doubling(first: int, cap: int) -> list[int]:
    """Looks at first, 2*first, 4*first, ... and the cap (first is capped too)."""
    first = max(1, min(first, cap))
    looks = [first]
    while looks[-1] < cap:
        looks.append(min(2 * looks[-1], cap))
    return looks


def every(step: int, cap: int) -> list[int]:
    """Looks every `step` (step, 2*step, ...) and at the cap."""
    step = max(1, min(step, cap))
    return list(range(step, cap, step)) + [cap]


def one_sided_alpha(sigmas: float) -> float:
    """P(Z >= sigmas) for a standard normal Z."""
    return 0.5 * math.erfc(sigmas / math.sqrt(2))


@lru_cache(maxsize=64)
def boundary(looks: tuple[int, ...], sigmas: float) -> float:
    """The constant boundary for these looks (amounts measured at each, increasing) with the error of one look at
    `sigmas`: P(max over looks of the standardized running mean >= c) = P(Z >= sigmas) on the bar."""
    if len(looks) <= 1:
        return float(sigmas)
    n = np.asarray(looks, dtype=float)
    rng = np.random.default_rng(31)
    steps = rng.standard_normal((_PATHS, len(n))) * np.sqrt(np.diff(n, prepend=0.0))
    z = np.cumsum(steps, axis=1) / np.sqrt(n)
    return float(max(np.quantile(z.max(axis=1), 1 - one_sided_alpha(sigmas)), sigmas))


def boundary_for(looks: list[int], sigmas: float, sequential: bool) -> float:
    """The boundary a bar measured at these looks is decided with: raised for the looks when sequential, else the
    fixed rule's decide_sigmas at every look."""
    return boundary(tuple(looks), sigmas) if sequential else sigmas


def decide(margin: float | None, c: float) -> Decision:
    """The verdict a look shows, or None while the margin lies within +-c (margin: (value - bar) / standard error,
    signed so that > 0 passes; +-inf for an exact measurement)."""
    if margin is None or margin != margin:
        return None
    if margin >= c:
        return "pass"
    if margin <= -c:
        return "fail"
    return None


def run_looks(looks: list[int], c: float, margin_after: Callable[[int], float | None]) -> tuple[int, Decision]:
    """Measure up to each look in turn (margin_after(n) measures up to n and returns the margin there) and stop at the
    first look that decides. (the amount measured, the decision; None: undecided at the last look)."""
    for n in looks:
        if (d := decide(margin_after(n), c)) is not None:
            return n, d
    return looks[-1], None


def final(margin: float | None, c: float) -> bool:
    """The verdict at the last look: a pass only when shown by c standard errors."""
    return decide(margin, c) == "pass"


def same_verdict_rate(margin: float | None, c: float) -> float | None:
    """An estimate of how often a second, independent validation gives the same verdict: the difference of two
    measurements has twice the variance of one, so P(same side of c) = Phi(|margin - c| / sqrt(2))."""
    if margin is None or margin != margin:
        return None
    if abs(margin) == float("inf"):
        return 1.0
    return 0.5 * math.erfc(-abs(margin - c) / 2)
