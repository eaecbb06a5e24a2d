"""Progress of a running tool call, as text: the progress bars (tqdm) the tools show while they work.

The tools report their long loops (perplexity chunks, GPTQ layers, QAT steps) through tqdm; a served call
reads the live bars every second and forwards what they say as MCP progress notifications.
"""

from __future__ import annotations

import time

from tqdm import tqdm


def live_progress_bars() -> list[str]:
    """'desc n/total unit' of every progress bar open in this process, oldest first."""
    with tqdm.get_lock():
        bars = list(getattr(tqdm, "_instances", ()))
    out = []
    for bar in sorted(bars, key=lambda b: getattr(b, "start_t", 0.0)):
        total = f"/{bar.total}" if bar.total else ""
        out.append(f"{bar.desc or 'working'} {bar.n}{total} {bar.unit}".strip())
    return out


def progress_message(tool: str, started: float) -> str:
    bars = live_progress_bars()
    elapsed = f"{time.monotonic() - started:.0f} s"
    return f"{tool}: {'; '.join(bars)} ({elapsed})" if bars else f"{tool}: running ({elapsed})"
