"""Plain-text summary tables for the terminal."""

from __future__ import annotations

from quantloop.schemas import EvaluationReport, ValidationReport


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_evaluation(r: EvaluationReport) -> str:
    out = [f"reference: {r.reference_note}", f"text: {r.dataset}", ""]
    out.append(table(["runtime", "format", "PPL", "± err", "tokens scored"],
                     [[p.model.runtime, p.model.format, f"{p.ppl:.4f}", f"{p.ppl_stderr:.4f}", p.tokens_scored] for p in r.perplexity]))
    if len(r.perplexity) == 2:
        a, b = r.perplexity
        out.append(f"runtimes agree within {abs(b.ppl / a.ppl - 1) * 100:.3f} % on perplexity")
    if r.speed:
        out += ["", table(["runtime", "format", "pp tok/s", "tg tok/s", "peak RSS", "threads"],
                          [[s.model.runtime, s.model.format, f"{s.pp_tokens_per_s:.1f}", f"{s.tg_tokens_per_s:.1f}",
                            mib(s.peak_rss_bytes), s.threads] for s in r.speed])]
    z = r.size
    out += ["", f"size: {mib(z.bytes_on_disk)} on disk, {z.n_weights:,} weights, {z.bits_per_weight:.2f} bits/weight "
                f"({z.linear_bits_per_weight:.2f} over the linear weights)"]
    if r.generation:
        out.append(f"generation checks: {len(r.generation.samples) - r.generation.failures}/{len(r.generation.samples)} prompts pass")
    return "\n".join(out)


def format_validation(r: ValidationReport) -> str:
    k = r.kld
    out = [f"reference: {r.reference_note}", f"text: {r.dataset}", f"runtime: {r.runtime}", ""]
    out.append(table(["", "baseline", "quantized"], [
        ["model", r.baseline.path, r.quantized.path],
        ["format", r.baseline.format, r.quantized.format],
        ["PPL", f"{k.ppl_base:.4f}", f"{k.ppl_quant:.4f}"],
        ["size", mib(r.size_baseline.bytes_on_disk), mib(r.size_quantized.bytes_on_disk)],
        ["bits/weight (all)", f"{r.size_baseline.bits_per_weight:.3f}", f"{r.size_quantized.bits_per_weight:.3f}"],
        ["bits/weight (linear)", f"{r.size_baseline.linear_bits_per_weight:.3f}", f"{r.size_quantized.linear_bits_per_weight:.3f}"],
        *([["pp tok/s", f"{r.speed_baseline.pp_tokens_per_s:.1f}", f"{r.speed_quantized.pp_tokens_per_s:.1f}"],
           ["tg tok/s", f"{r.speed_baseline.tg_tokens_per_s:.1f}", f"{r.speed_quantized.tg_tokens_per_s:.1f}"],
           ["peak RSS", mib(r.speed_baseline.peak_rss_bytes), mib(r.speed_quantized.peak_rss_bytes)]] if r.speed_baseline else []),
    ]))
    out += ["",
            f"Mean ln(PPL(Q)/PPL(base)): {k.ln_ppl_ratio:.6f} ± {k.ln_ppl_ratio_stderr:.6f}   PPL ratio {k.ppl_ratio:.4f} ({k.ppl_increase_pct:+.2f} %)",
            f"Mean KLD: {k.kld_mean:.6f} ± {k.kld_mean_stderr:.6f}   max {k.kld.max:.4f}  99.9% {k.kld.p99_9:.4f}  99% {k.kld.p99:.4f}  "
            f"95% {k.kld.p95:.4f}  median {k.kld.median:.6f}",
            f"Same top token: {k.same_top_rate * 100:.2f} ± {k.same_top_rate_stderr * 100:.2f} %   RMS Δp {k.rms_delta_p * 100:.3f} ± {k.rms_delta_p_stderr * 100:.3f} %",
            ""]
    if r.held_out_kld:
        out += [table(["held-out test split", "PPL base", "PPL quantized", "ppl increase", "mean KLD", "same top", "tokens"],
                      [[name, f"{h.ppl_base:.4f}", f"{h.ppl_quant:.4f}", f"{h.ppl_increase_pct:+.2f} %", f"{h.kld_mean:.4f}",
                        f"{h.same_top_rate * 100:.1f} %", str(h.tokens)] for name, h in r.held_out_kld.items()]), ""]
    out.append(table(["criterion", "verdict", "threshold", "measured"],
                     [[c.name, "pass" if c.passed else "FAIL", c.threshold, c.detail] for c in r.criteria]))
    out += ["", f"verdict: {'ACCEPTED' if r.passed else 'REJECTED'}   report: {r.report_path}"]
    return "\n".join(out)
