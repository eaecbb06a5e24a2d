"""Speed: token generation against the float baseline on the same runtime, the median of interleaved pairs judged
with its noise (eval/speed.py measures it)."""

from __future__ import annotations

from quantloop.eval.criteria.base import Measurements, RatioCriterion, Where, how_close, shown
from quantloop.eval.sequential import same_verdict_rate
from quantloop.schemas import AcceptanceCriteria, CriterionResult


class Speed(RatioCriterion):
    name = "speed"
    metric = "speedup_tg"
    needs = ("speedup_tg", "speedup_tg_stderr", "speedup_tg_pairs")
    tip = "speed falls short: measure on the deployment hardware, or use a lower-bit format with fast kernels on that target"

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        need, speedup = acceptance.min_speedup, m.speedup_tg
        if speedup is None:
            return [CriterionResult(name=self.name, passed=False, measured=None, threshold=f">= {need}x", detail="not measured")]
        se, c = m.speedup_tg_stderr, m.sigmas(self.name, sigmas)
        margin = (speedup - need) / se if se and se != float("inf") else None
        speed_shown, note = shown(margin, c)
        again = same_verdict_rate(margin, c) if c is not None else None
        rerun = f"; the same verdict on a rerun about {again:.0%} of the time" if again is not None else ""
        spread = (f" ± {se:.2f} (median of {len(m.speedup_tg_pairs or [])} interleaved pairs; {how_close(margin)}{note}{rerun})"
                  if margin is not None else "")
        return [CriterionResult(name=self.name, passed=speedup >= need and speed_shown, measured=speedup,
                                threshold=f">= {need}x token generation", margin_sigmas=margin,
                                detail=f"token generation {speedup:.2f}x{spread} the float baseline on the same runtime")]

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str:
        return f"{'speed' if where == 'line' else 'token generation'} >= {acceptance.min_speedup}x"
