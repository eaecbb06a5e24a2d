"""Speed at batch size 1 on the deployment runtime, prompt processing (pp) and
token generation (tg) separately.

On llama.cpp the numbers are llama-bench's own (the C++ benchmark that ships
with llama.cpp, built by scripts/setup.sh): no Python call per token sits in
the timed loop, so the ratio of two models is the runtime's, not the
binding's. On transformers the forward passes are timed in Python.

Each measurement runs in its own process (`python -m quantloop.eval.speed`),
so its peak resident memory is that of one serving process holding one model. Two models are measured
in interleaved pairs (float, quantized, float, quantized, ...): each pair gives one ratio, measured
seconds apart on the same machine, so a slow spell of the machine hits both sides of a pair; a model's
speed is the median of its runs, and a ratio's verdict the median of the pair ratios with its standard
error (speed_pairs, tools/validate.py). Token ids are fixed pseudo-random ids (the cost of a forward pass
does not depend on which tokens it sees).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantloop.eval.runtimes import default_threads
from quantloop.eval.sequential import boundary_for, every, run_looks
from quantloop.gguf.llamacpp import tool
from quantloop.memory import peak_rss_bytes
from quantloop.models.checkpoints import load_hf_model
from quantloop.schemas import ModelRef, SpeedReport, SpeedSettings


def _ids(n: int, n_vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(100, n_vocab - 100, size=n).tolist()


def _bench_llama_cpp(path: str, prompt_tokens: int, gen_tokens: int, threads: int, reps: int = 1) -> dict:
    """One llama-bench run (a warm-up, then `reps` timed passes of each test, averaged) of one model."""
    cmd = [str(tool("llama-bench")), "-m", path, "-p", str(prompt_tokens), "-n", str(gen_tokens), "-r", str(reps),
           "-t", str(threads), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"llama-bench failed on {path}: {tail[0][:200]}")
    tests = json.loads(proc.stdout)
    seconds = {("pp" if t["n_prompt"] else "tg"): t["avg_ns"] / 1e9 for t in tests}
    child_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"load_s": None, "pp_s": seconds["pp"], "tg_s": seconds["tg"], "peak_rss_kb": child_rss_kb,
            "threads": int(tests[0]["n_threads"])}  # as llama-bench reports it


def _bench_transformers(path: str, prompt_tokens: int, gen_tokens: int, threads: int, reps: int = 1) -> dict:
    import torch  # deferred: torch


    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_hf_model(Path(path), device=device)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_ids(prompt_tokens + gen_tokens, model.config.vocab_size)], device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        sync(); t0 = time.perf_counter(); model(ids[:, :prompt_tokens]); sync(); pp_s = time.perf_counter() - t0
        out = model(ids[:, :1], use_cache=True)
        past = out.past_key_values
        sync(); t0 = time.perf_counter()
        for i in range(1, gen_tokens + 1):
            out = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
        sync(); tg_s = time.perf_counter() - t0
    return {"load_s": load_s, "pp_s": pp_s, "tg_s": tg_s, "threads": torch.get_num_threads()}


def speed_threads(settings: SpeedSettings) -> int:
    """The thread count of the speed runs: the spec's speed.threads, else QUANTLOOP_THREADS or every core."""
    return settings.threads or default_threads()


def measure_runs(refs: list[ModelRef], settings: SpeedSettings, threads: int, rounds: int, progress=None) -> list[list[dict]]:
    """`rounds` rounds of one run of each model in turn (interleaved); runs[i] are model i's results."""
    runs: list[list[dict]] = [[] for _ in refs]
    for _ in range(rounds):
        for i, ref in enumerate(refs):
            result, rss_kb = _measure_once(ref, settings, threads)
            runs[i].append(result | {"peak_rss_kb": rss_kb})
        if progress is not None:
            progress.update(1)
    return runs


def speed_report(ref: ModelRef, runs: list[dict], settings: SpeedSettings, threads: int) -> SpeedReport:
    """A model's speed from its runs: the median run's pp and tg rates, the largest peak memory."""
    return SpeedReport(
        model=ref, threads=runs[0].get("threads", threads), prompt_tokens=settings.prompt_tokens, gen_tokens=settings.gen_tokens,
        pp_tokens_per_s=settings.prompt_tokens / float(np.median([r["pp_s"] for r in runs])),
        tg_tokens_per_s=settings.gen_tokens / float(np.median([r["tg_s"] for r in runs])),
        load_s=float(np.median([r["load_s"] for r in runs])) if runs[0]["load_s"] is not None else None,
        peak_rss_bytes=max(r["peak_rss_kb"] for r in runs) * 1024,
    )


def measure_speed(refs: list[ModelRef], settings: SpeedSettings, threads: int) -> list[SpeedReport]:
    """Measure each model `settings.repeats` times, interleaved; each model's median run."""
    runs = measure_runs(refs, settings, threads, settings.repeats)
    return [speed_report(ref, rs, settings, threads) for ref, rs in zip(refs, runs)]


def pair_ratios(base_runs: list[dict], quant_runs: list[dict]) -> list[float]:
    """Token-generation speed ratio quantized / float of each interleaved pair."""
    return [b["tg_s"] / q["tg_s"] for b, q in zip(base_runs, quant_runs)]


def median_and_stderr(values: list[float]) -> tuple[float, float]:
    """The median and its standard error (1.2533 * sd / sqrt(n), the normal approximation)."""
    v = np.asarray(values, dtype=float)
    sd = float(v.std(ddof=1)) if len(v) > 1 else float("inf")
    return float(np.median(v)), 1.2533 * sd / np.sqrt(len(v))


def ratio_and_stderr(ratios: list[float], settings: SpeedSettings) -> tuple[float, float]:
    """The median pair ratio and its standard error: the spread of the pairs within this validation, plus (in
    quadrature) how much the ratio moves between validations on this machine (speed.between_run_sd_pct, a bench's
    number), which no amount of pairs measured back to back can show."""
    median, within = median_and_stderr(ratios)
    between = median * settings.between_run_sd_pct / 100
    return median, float(np.hypot(within, between))


def speed_looks(settings: SpeedSettings) -> list[int]:
    """Pair counts at which the speed verdict is looked at: every `repeats` pairs up to max_repeats."""
    return every(settings.repeats, max(settings.max_repeats or settings.repeats, settings.repeats))


def speed_pairs(base: ModelRef, quant: ModelRef, settings: SpeedSettings, threads: int, bar: float, decide_sigmas: float,
                sequential: bool = True) -> tuple[SpeedReport, SpeedReport, list[float], float]:
    """Interleaved pairs, `repeats` at a time, until a look decides the median ratio against `bar` or max_repeats pairs
    are measured. (float report, quantized report, pair ratios, the boundary in standard errors the verdict uses:
    sequential: raised for the number of looks (eval/sequential.py); else decide_sigmas at every look)."""
    looks = speed_looks(settings)
    c = boundary_for(looks, decide_sigmas, sequential)
    runs: list[list[dict]] = [[], []]
    with tqdm(total=looks[-1], desc="speed pairs", unit="pair", leave=False) as bar_:
        def margin_after(n: int) -> float | None:
            more = measure_runs([base, quant], settings, threads, n - len(runs[0]), bar_)
            runs[0] += more[0]
            runs[1] += more[1]
            median, se = ratio_and_stderr(pair_ratios(*runs), settings)
            return (median - bar) / se if n > 1 and se > 0 else None
        run_looks(looks, c, margin_after)
    return speed_report(base, runs[0], settings, threads), speed_report(quant, runs[1], settings, threads), pair_ratios(*runs), c


def _measure_once(ref: ModelRef, settings: SpeedSettings, threads: int) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "quantloop.eval.speed", "--runtime", ref.runtime, "--model", ref.path,
           "--prompt-tokens", str(settings.prompt_tokens), "--gen-tokens", str(settings.gen_tokens), "--threads", str(threads),
           "--reps", str(settings.bench_reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise RuntimeError(f"speed measurement of {ref.path} failed: {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, result["peak_rss_kb"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one speed measurement (used by quantloop.eval.speed.measure_speed)")
    p.add_argument("--runtime", choices=["llama.cpp", "transformers"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=1, help="llama-bench repetitions (-r)")
    a = p.parse_args(argv)
    fn = _bench_llama_cpp if a.runtime == "llama.cpp" else _bench_transformers
    result = fn(a.model, a.prompt_tokens, a.gen_tokens, a.threads, a.reps)
    result.setdefault("peak_rss_kb", peak_rss_bytes() // 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
