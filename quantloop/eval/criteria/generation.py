"""Generation: no empty output, no repetition loop, no nonsense in the quantized model's continuations of the
spec's prompts, beyond what the float model shows itself (eval/generation.py checks them)."""

from __future__ import annotations

from quantloop.eval.criteria.base import Criterion, Measurements, Where
from quantloop.schemas import AcceptanceCriteria, CriterionResult


class Generation(Criterion):
    name = "generation"
    needs = ("generation",)
    tip = "generations fail the checks: read the side-by-side generations and review the prompts and limits in the acceptance spec"

    def applies(self, acceptance: AcceptanceCriteria) -> bool:
        return acceptance.no_generation_failures

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        gen = m.generation
        if gen is None:
            return [CriterionResult(name=self.name, passed=False, measured=None, threshold="0 failures", detail="not checked")]
        bad = [f"'{s.prompt}': {', '.join(s.failures)}" for s in gen.samples if s.failures]
        return [CriterionResult(name=self.name, passed=gen.passed, measured=float(gen.failures), threshold="0 failures",
                                detail="; ".join(bad) if bad else f"{len(gen.samples)} prompts, no failure")]

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str:
        required = acceptance.no_generation_failures
        return f"no generation failures: {required if where == 'line' else ('required' if required else 'not required')}"

    def describe_failure(self, c: CriterionResult) -> str:
        return f"generation {int(c.measured)} failure(s) ({c.detail})"
