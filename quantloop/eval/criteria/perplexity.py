"""Perplexity: the increase against the float baseline on the test split, and on each held-out domain
('perplexity:<domain>'), judged with its paired noise (eval/kld.py measures it)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from quantloop.eval.criteria.base import Cell, Criterion, Measurements, Where, fmt, how_close, number, shown
from quantloop.schemas import AcceptanceCriteria, CriterionResult, KLDReport


def ppl_increase_stderr(kld: KLDReport) -> float:
    """Standard error of the perplexity increase in percent, from the paired error of ln(PPL ratio)."""
    return 100 * kld.ppl_ratio * kld.ln_ppl_ratio_stderr if kld.ln_ppl_ratio_stderr > 0 else float("inf")


def ppl_increase_stderr_pct(metrics: Mapping[str, float]) -> float | None:
    """The same from an attempt's flattened metrics."""
    ln, se = number(metrics, "kld.ln_ppl_ratio"), number(metrics, "kld.ln_ppl_ratio_stderr")
    return None if ln is None or se is None else 100 * math.exp(ln) * se


def held_out_increases(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k.split(".")[1]: v for k, v in metrics.items() if k.startswith("held_out_kld.") and k.endswith(".ppl_increase_pct")}


def perplexity_criterion(kld: KLDReport, criteria: AcceptanceCriteria, sigmas: float | None, name: str) -> CriterionResult:
    """The perplexity bar on one text: cleared by `sigmas` standard errors (see shown)."""
    se = ppl_increase_stderr(kld)
    below = kld.ppl_increase_pct < criteria.max_ppl_increase_pct
    if se == float("inf"):  # no paired spread at all (identical outputs): the point estimate is exact
        se, ppl_margin = 0.0, float("inf") if below else float("-inf")
    else:
        ppl_margin = (criteria.max_ppl_increase_pct - kld.ppl_increase_pct) / se
    ppl_shown, ppl_note = shown(ppl_margin, sigmas)
    return CriterionResult(
        name=name, passed=below and ppl_shown, measured=kld.ppl_increase_pct,
        threshold=f"< {criteria.max_ppl_increase_pct} % increase", margin_sigmas=ppl_margin,
        detail=f"PPL {kld.ppl_quant:.4f} vs {kld.ppl_base:.4f} ({kld.ppl_increase_pct:+.2f} % ± {se:.2f} %, "
               f"mean KLD {kld.kld_mean:.4f}, {kld.tokens} tokens; {how_close(ppl_margin)}{ppl_note})",
    )


class Perplexity(Criterion):
    name = "perplexity"
    needs = ("kld", "held_out")
    quality = True
    tip = ("perplexity is the binding limit: try QAT, mixed precision (keep attention or the most sensitive layers at 8 bits), "
           "more or more representative calibration text, or an earlier/later training checkpoint")

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        out = [perplexity_criterion(m.kld, acceptance, m.sigmas(self.name, sigmas), self.name)]
        return out + [perplexity_criterion(k, acceptance, m.sigmas(name, sigmas), name)
                      for domain, k in m.held_out.items() if (name := f"{self.name}:{domain}")]

    def cells(self, metrics: Mapping[str, float], where: Where) -> list[Cell]:
        if where == "line":
            return [Cell("ppl Δ", fmt(metrics.get("kld.ppl_increase_pct"), "{:+.2f} %"), label="ppl"),
                    Cell("KLD", fmt(metrics.get("kld.kld_mean"), "{:.4f}"))]
        pct, se = number(metrics, "kld.ppl_increase_pct"), ppl_increase_stderr_pct(metrics)
        ppl = "-" if pct is None else f"{pct:+.2f} %" + (f" ± {se:.2f}" if se is not None else "")
        kld, kld_se = number(metrics, "kld.kld_mean"), number(metrics, "kld.kld_mean_stderr")
        kld_text = "-" if kld is None else f"{kld:.4g}" + (f" ± {kld_se:.2g}" if kld_se is not None else "")
        held = "; ".join(f"{name} {v:+.2f} %" for name, v in sorted(held_out_increases(metrics).items())) or "-"
        return [Cell("ppl increase", ppl), Cell("held-out ppl increase", held, numeric=False), Cell("mean KLD", kld_text)]

    def summary(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        return {"ppl_increase_pct": metrics.get("kld.ppl_increase_pct"), "kld_mean": metrics.get("kld.kld_mean")}

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str:
        return f"{'PPL' if where == 'line' else 'perplexity'} increase < {acceptance.max_ppl_increase_pct} %"

    def describe_failure(self, c: CriterionResult) -> str:  # "perplexity:bible" is the same bar on a held-out domain
        return f"{c.name.replace(':', ' on ')} {c.measured:+.2f} % (needs {c.threshold})"
