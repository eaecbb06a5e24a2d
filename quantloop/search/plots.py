"""Pictures of a search (PNG, matplotlib's Agg backend): the sensitivity heatmap (layer x module group, one
panel per type), the measured front (KLD against bits per weight, colour = measured tg speed) with the
baselines marked, and the bits of one precision map (layer x module)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from quantloop.search.schemas import SensitivityRow

GROUP_ORDER = ["attn", "ffn", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_up", "ffn_gate", "ffn_up", "ffn_down"]


def _plt():
    import matplotlib  # deferred: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def sensitivity_heatmap(rows: list[SensitivityRow], path: Path, title: str = "") -> Path:
    """log10 KLD of every (layer, module group) at every type; the embedding in its own column."""
    plt = _plt()
    types = sorted({r.type for r in rows}, key=lambda t: -min(r.bytes / r.n_weights for r in rows if r.type == t))
    groups = [g for g in GROUP_ORDER if any(r.group == g for r in rows)]
    layers = sorted({r.layer for r in rows if r.layer >= 0})
    fig, axes = plt.subplots(1, len(types), figsize=(2.2 + 1.6 * len(types) * max(1, len(groups)) / 4, 0.5 + 0.18 * max(len(layers), 8)),
                             squeeze=False)
    vals = [r.kld for r in rows if r.kld > 0]
    vmin, vmax = (np.log10(min(vals)), np.log10(max(vals))) if vals else (-6, 0)
    for ax, t in zip(axes[0], types):
        grid = np.full((len(layers), len(groups)), np.nan)
        for r in rows:
            if r.type == t and r.layer >= 0:
                grid[layers.index(r.layer), groups.index(r.group)] = np.log10(max(r.kld, 1e-9))
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        emb = [r.kld for r in rows if r.type == t and r.layer < 0]
        ax.set_title(f"{t}" + (f"\nembedding {emb[0]:.3g}" if emb else ""), fontsize=8)
        ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 mean KLD (only this unit quantized)", shrink=0.8)
    fig.suptitle(title or "per-unit sensitivity", fontsize=9)
    return _save(fig, path)


def front_plot(points: list[dict], front: list[dict], marks: list[dict], path: Path, title: str = "") -> Path:
    """points/front: {'bpw', 'kld', 'tg'}; marks: {'bpw', 'kld', 'label'} (greedy, ILP, llama.cpp's mixes)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    tg = [p["tg"] for p in points + front]
    sc = ax.scatter([p["bpw"] for p in points], [p["kld"] for p in points], c=[p["tg"] for p in points], cmap="viridis",
                    s=14, alpha=0.45, vmin=min(tg), vmax=max(tg), label="trials")
    fr = sorted(front, key=lambda p: p["bpw"])
    ax.plot([p["bpw"] for p in fr], [p["kld"] for p in fr], "-", color="k", lw=0.8)
    ax.scatter([p["bpw"] for p in fr], [p["kld"] for p in fr], c=[p["tg"] for p in fr], cmap="viridis", s=46,
               edgecolors="k", vmin=min(tg), vmax=max(tg), label="front (measured)")
    for m in marks:
        ax.scatter([m["bpw"]], [m["kld"]], marker=m.get("marker", "x"), color=m.get("color", "red"), s=50, zorder=5)
        ax.annotate(m["label"], (m["bpw"], m["kld"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KLD vs F16 (held-out text, llama.cpp)")
    fig.colorbar(sc, ax=ax, label="measured tg tokens/s (llama-bench)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "measured front", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def bits_heatmap(genome: dict[str, str], bits_of: dict[str, float], path: Path, title: str = "") -> Path:
    """Bits per weight of every linear of one precision map: layer x module."""
    plt = _plt()
    mods = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    layers = sorted({int(m.group(1)) for n in genome if (m := re.match(r"blk\.(\d+)\.", n))})
    grid = np.full((len(layers), len(mods)), np.nan)
    for n, t in genome.items():
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight", n)
        if m and m.group(2) in mods:
            grid[layers.index(int(m.group(1))), mods.index(m.group(2))] = bits_of[t]
    fig, ax = plt.subplots(figsize=(4.5, 0.6 + 0.18 * max(len(layers), 8)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(mods)), mods, rotation=60, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    emb = genome.get("token_embd.weight")
    ax.set_title((title or "precision map") + (f"\nembedding {emb}" if emb else ""), fontsize=8)
    fig.colorbar(im, ax=ax, label="bits per weight")
    return _save(fig, path)
