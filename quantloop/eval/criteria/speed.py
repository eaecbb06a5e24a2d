"""Speed: token generation against the float baseline on the same runtime, the median of interleaved pairs judged
with its noise (eval/speed.py measures it)."""

from __future__ import annotations

from collections.abc import Mapping

from quantloop.eval.criteria.base import Cell, Criterion, Measurements, Where, fmt, how_close, number, shown
from quantloop.schemas import AcceptanceCriteria, CriterionResult


class Speed(Criterion):
    name = "speed"
    needs = ("speedup_tg", "speedup_tg_stderr", "speedup_tg_pairs")
    tip = "speed falls short: measure on the deployment hardware, or use a lower-bit format with fast kernels on that target"

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        need, speedup = acceptance.min_speedup, m.speedup_tg
        if speedup is None:
            return [CriterionResult(name=self.name, passed=False, measured=None, threshold=f">= {need}x", detail="not measured")]
        se = m.speedup_tg_stderr
        margin = (speedup - need) / se if se and se != float("inf") else None
        speed_shown, note = shown(margin, sigmas)
        spread = (f" ± {se:.2f} (median of {len(m.speedup_tg_pairs or [])} interleaved pairs; {how_close(margin)}{note})"
                  if margin is not None else "")
        return [CriterionResult(name=self.name, passed=speedup >= need and speed_shown, measured=speedup,
                                threshold=f">= {need}x token generation", margin_sigmas=margin,
                                detail=f"token generation {speedup:.2f}x{spread} the float baseline on the same runtime")]

    def cells(self, metrics: Mapping[str, float], where: Where) -> list[Cell]:
        value = metrics.get("speedup_tg") if where == "line" else number(metrics, "speedup_tg")
        return [Cell("speed", fmt(value, "{:.2f}x"))]

    def summary(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        return {"speedup_tg": metrics.get("speedup_tg")}

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str:
        return f"{'speed' if where == 'line' else 'token generation'} >= {acceptance.min_speedup}x"

    def describe_failure(self, c: CriterionResult) -> str:
        return f"{c.name} {c.measured:.2f}x (needs {c.threshold})"
