"""The report's plots (matplotlib, Agg backend, PNG): perplexity increase and mean KLD against file size for
every measured attempt, with the acceptance bars drawn and the Pareto front of size against quality."""

from __future__ import annotations

from pathlib import Path

from quantloop.eval.criteria.accuracy import mean_drop
from quantloop.eval.criteria.size import required_size_ratio
from quantloop.report.records import AttemptRow, RunRecord

MIB = 2**20
SIZE_BAR_COLOURS = ("#9a6700", "#8250df", "#bf3989", "#57606a")
SIZE_BAR_DASHES = ("--", "-.", ":", (0, (5, 1)))
VERDICT_COLOURS = {"accepted": "#1a7f37", "fallback": "#cf222e", "rejected": "#cf222e"}


def measured(record: RunRecord) -> list[AttemptRow]:
    return [a for a in record.attempts if a.bytes_on_disk and a.ppl_increase_pct is not None]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and loss (smaller is better on both), by size."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def size_bars(record: RunRecord) -> list[tuple[float, str]]:
    """(largest file size in MiB, label) allowed at each nominal bit width the attempts used."""
    base = record.baseline.bytes_on_disk
    if not base:
        return []

    widths = sorted({a.nominal_bits for a in measured(record) if a.nominal_bits})
    return [(base / required_size_ratio(record.acceptance, b) / MIB, f"size bar at {b} bits ({required_size_ratio(record.acceptance, b)}x)")
            for b in widths]


def scatter_plot(record: RunRecord, value, error, ylabel: str, title: str, bar: float | None, bar_label: str, path: Path) -> Path:
    import matplotlib  # deferred: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib

    rows = [a for a in measured(record) if value(a) is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    for a in rows:
        x, y = a.bytes_on_disk / MIB, value(a)
        ax.errorbar([x], [y], yerr=[error(a) or 0.0], fmt="o", ms=7, capsize=3, color=VERDICT_COLOURS.get(a.verdict, "#6e7781"))
        ax.annotate(f"{a.index}: {a.step}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    front = pareto_front([(a.bytes_on_disk / MIB, value(a)) for a in rows])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#0969da", lw=1, ls=":", label="Pareto front")
    if bar is not None:
        ax.axhline(bar, color="#cf222e", ls="--", lw=1, label=bar_label)
    for (x, label), colour, dashes in zip(size_bars(record), SIZE_BAR_COLOURS, SIZE_BAR_DASHES):
        ax.axvline(x, color=colour, ls=dashes, lw=1, label=f"{label}: <= {x:.1f} MiB")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_plots(record: RunRecord, out_dir: Path) -> list[Path]:
    """ppl_vs_size.png and kld_vs_size.png in out_dir, and accuracy_vs_size.png when the attempts' benchmark accuracy
    was measured (none when no attempt was measured)."""
    if not measured(record):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    acc = record.acceptance
    drops = {a.index: mean_drop(a.metrics) for a in measured(record)}  # (mean accuracy drop, its standard error)
    return [
        scatter_plot(record, lambda a: a.ppl_increase_pct, lambda a: a.ppl_increase_stderr_pct, "perplexity increase (%)",
                     f"run {record.run_id}: perplexity increase against size", acc.max_ppl_increase_pct,
                     f"perplexity bar (< {acc.max_ppl_increase_pct} %)", out_dir / "ppl_vs_size.png"),
        scatter_plot(record, lambda a: a.kld_mean, lambda a: a.kld_mean_stderr, "mean KL divergence (nats/token)",
                     f"run {record.run_id}: mean KLD against size", None, "", out_dir / "kld_vs_size.png"),
    ] + ([scatter_plot(record, lambda a: drops[a.index][0], lambda a: drops[a.index][1],
                       "accuracy drop (points, mean over tasks)", f"run {record.run_id}: benchmark accuracy drop against size",
                       acc.accuracy.max_drop_pp, f"accuracy bar (< {acc.accuracy.max_drop_pp:g} points)", out_dir / "accuracy_vs_size.png")]
         if acc.accuracy is not None and any(d[0] is not None for d in drops.values()) else [])
