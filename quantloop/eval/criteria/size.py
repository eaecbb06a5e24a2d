"""Size: the whole file against the F16 file of the same weights, at the bar of its nominal bit width
(eval/size.py measures it)."""

from __future__ import annotations

from quantloop.eval.criteria.base import Measurements, RatioCriterion, Where
from quantloop.schemas import AcceptanceCriteria, CriterionResult


def required_size_ratio(criteria: AcceptanceCriteria, bits: int) -> float:
    """The ratio the spec names for these bits; otherwise the INT4 rule scaled to the bit width."""
    if bits in criteria.min_size_ratio:
        return criteria.min_size_ratio[bits]
    ref_bits, ref_ratio = min(criteria.min_size_ratio.items())
    return round(ref_ratio * ref_bits / bits, 2)


class Size(RatioCriterion):
    name = "size"
    metric = "size_ratio"
    needs = ("size_ratio", "bits")
    tip = "size falls short: quantize the embeddings and output layer too, or choose a lower-bit type"

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        if m.bits is None:
            return [CriterionResult(name=self.name, passed=False, measured=m.size_ratio, threshold="unknown bit width",
                                    detail="nominal bit width unknown; pass --bits")]
        need = required_size_ratio(acceptance, m.bits)
        return [CriterionResult(name=self.name, passed=m.size_ratio >= need, measured=m.size_ratio, threshold=f">= {need}x at {m.bits} bits",
                                detail=f"{m.size_ratio:.2f}x smaller than the float baseline")]

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str:
        items = acceptance.min_size_ratio.items()
        return f"size >= {', '.join(f'{v}x at {k} bits' for k, v in (items if where == 'line' else sorted(items)))}"
