"""KL divergence of a quantized model against its float baseline, full vocabulary.

Reports the statistics of llama-perplexity --kl-divergence: mean KLD with its
standard error, max, percentiles and min; delta-p (probability of the correct
token, quantized minus base) statistics and RMS; same-top-token rate; and
mean ln(PPL(Q)/PPL(base)) with its paired uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from quantloop.eval.perplexity import first_scored, log_softmax
from quantloop.schemas import KLDReport, Percentiles


@dataclass
class KLDAccumulator:
    kld: list[np.ndarray] = field(default_factory=list)
    nll_base: list[np.ndarray] = field(default_factory=list)
    nll_quant: list[np.ndarray] = field(default_factory=list)
    p_base: list[np.ndarray] = field(default_factory=list)
    p_quant: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)

    def add_logprobs(self, lp_base: np.ndarray, lp_quant: np.ndarray, targets: np.ndarray) -> None:
        """Add rows of log-probabilities (same positions, full vocabulary) and the tokens they predict."""
        if lp_base.shape != lp_quant.shape:
            raise ValueError(f"vocabulary mismatch: base {lp_base.shape} vs quantized {lp_quant.shape}")
        pb = np.exp(lp_base)
        self.kld.append(np.maximum((pb * (lp_base - lp_quant)).sum(axis=-1), 0.0))
        rows = np.arange(len(targets))
        self.nll_base.append(-lp_base[rows, targets])
        self.nll_quant.append(-lp_quant[rows, targets])
        self.p_base.append(pb[rows, targets])
        self.p_quant.append(np.exp(lp_quant[rows, targets]))
        self.same_top.append(lp_base.argmax(-1) == lp_quant.argmax(-1))

    def add_chunk(self, logits_base: np.ndarray, logits_quant: np.ndarray, chunk: np.ndarray) -> None:
        """Logits of every position of the chunk (float64 throughout)."""
        first = first_scored(len(chunk))
        end = len(chunk) - 1
        self.add_logprobs(log_softmax(logits_base[first:end]), log_softmax(logits_quant[first:end]), chunk[first + 1:])

    def add_scored(self, logits_base: np.ndarray, logits_quant: np.ndarray, chunk: np.ndarray) -> None:
        """Logits of positions first_scored(len(chunk)) .. len(chunk)-1 only (what the runners return with start)."""
        n = len(chunk) - 1 - first_scored(len(chunk))
        self.add_logits(logits_base[:n], logits_quant[:n], np.asarray(chunk[-n:]))

    def add_logits(self, logits_base: np.ndarray, logits_quant: np.ndarray, targets: np.ndarray, rows: int = 8) -> None:
        """The same statistics as add_logprobs, from raw logits, without full-vocabulary log-probability arrays:
        KL = sum_v p_base (x_base - x_quant) - (lse_base - lse_quant), two exponentials per logit in float32 (sums in
        float64) instead of three in float64, a few rows at a time."""
        if logits_base.shape != logits_quant.shape:
            raise ValueError(f"vocabulary mismatch: base {logits_base.shape} vs quantized {logits_quant.shape}")
        targets = np.asarray(targets)
        for i in range(0, len(targets), rows):
            xb = np.asarray(logits_base[i:i + rows], dtype=np.float32)
            xq = np.asarray(logits_quant[i:i + rows], dtype=np.float32)
            r = np.arange(len(xb))
            t = targets[i:i + rows]
            mb, mq = xb.max(-1, keepdims=True), xq.max(-1, keepdims=True)
            eb = np.exp(xb - mb)
            sb = eb.sum(-1, dtype=np.float64)
            sq = np.exp(xq - mq).sum(-1, dtype=np.float64)
            lse_b, lse_q = mb[:, 0] + np.log(sb), mq[:, 0] + np.log(sq)
            dot = np.einsum("rv,rv->r", eb, xb - xq, dtype=np.float64) / sb
            self.kld.append(np.maximum(dot - lse_b + lse_q, 0.0))
            lt_b, lt_q = xb[r, t] - lse_b, xq[r, t] - lse_q
            self.nll_base.append(-lt_b)
            self.nll_quant.append(-lt_q)
            self.p_base.append(np.exp(lt_b))
            self.p_quant.append(np.exp(lt_q))
            self.same_top.append(xb.argmax(-1) == xq.argmax(-1))

    def report(self) -> KLDReport:
        return kld_report(
            np.concatenate(self.kld),
            np.concatenate(self.nll_base),
            np.concatenate(self.nll_quant),
            np.concatenate(self.p_base),
            np.concatenate(self.p_quant),
            np.concatenate(self.same_top),
        )


def _percentiles(x: np.ndarray) -> Percentiles:
    q = np.percentile(x, [99.9, 99, 95, 90, 50, 10, 5, 1, 0.1])
    return Percentiles(
        max=float(x.max()), p99_9=float(q[0]), p99=float(q[1]), p95=float(q[2]), p90=float(q[3]),
        median=float(q[4]), p10=float(q[5]), p5=float(q[6]), p1=float(q[7]), p0_1=float(q[8]), min=float(x.min()),
    )


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def kld_report(kld, nll_base, nll_quant, p_base, p_quant, same_top) -> KLDReport:
    n = len(kld)
    d = nll_quant - nll_base  # per-token ln ratio, paired
    ln_ratio = float(d.mean())
    dp = p_quant - p_base
    msq = float((dp**2).mean())
    rms = math.sqrt(msq)
    rms_se = _se(dp**2) / (2 * rms) if rms > 0 else 0.0
    top = float(np.mean(same_top))
    return KLDReport(
        tokens=n,
        ppl_base=math.exp(float(nll_base.mean())),
        ppl_quant=math.exp(float(nll_quant.mean())),
        ln_ppl_ratio=ln_ratio,
        ln_ppl_ratio_stderr=_se(d),
        ppl_ratio=math.exp(ln_ratio),
        ppl_increase_pct=(math.exp(ln_ratio) - 1) * 100,
        kld_mean=float(kld.mean()),
        kld_mean_stderr=_se(kld),
        kld=_percentiles(kld),
        delta_p_mean=float(dp.mean()),
        delta_p_mean_stderr=_se(dp),
        delta_p=_percentiles(dp),
        rms_delta_p=rms,
        rms_delta_p_stderr=rms_se,
        same_top_rate=top,
        same_top_rate_stderr=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
    )
