"""Speed at batch size 1 on the deployment runtime, prompt processing (pp) and
token generation (tg) separately.

On llama.cpp the numbers are llama-bench's own (the C++ benchmark that ships
with llama.cpp, built by scripts/setup.sh): no Python call per token sits in
the timed loop, so the ratio of two models is the runtime's, not the
binding's. On transformers the forward passes are timed in Python.

Each measurement runs in its own process (`python -m quantloop.eval.speed`),
so its peak resident memory is that of one serving process holding one model; the float and the
quantized model are measured alternately, `repeats` times each, and the
best run of each is kept. Token ids are fixed pseudo-random ids (the cost
of a forward pass does not depend on which tokens it sees).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from quantloop.memory import peak_rss_bytes
from quantloop.schemas import ModelRef, SpeedReport, SpeedSettings


def _ids(n: int, n_vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(100, n_vocab - 100, size=n).tolist()


def _bench_llama_cpp(path: str, prompt_tokens: int, gen_tokens: int, threads: int) -> dict:
    """One llama-bench run (a warm-up, then one timed pass of each test) of one model."""
    import resource

    from quantloop.gguf.llamacpp import tool

    cmd = [str(tool("llama-bench")), "-m", path, "-p", str(prompt_tokens), "-n", str(gen_tokens), "-r", "1",
           "-t", str(threads), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"llama-bench failed on {path}: {tail[0][:200]}")
    tests = json.loads(proc.stdout)
    seconds = {("pp" if t["n_prompt"] else "tg"): t["avg_ns"] / 1e9 for t in tests}
    child_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"load_s": None, "pp_s": seconds["pp"], "tg_s": seconds["tg"], "peak_rss_kb": child_rss_kb}


def _bench_transformers(path: str, prompt_tokens: int, gen_tokens: int, threads: int) -> dict:
    import torch

    from quantloop.models.checkpoints import load_hf_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_hf_model(__import__("pathlib").Path(path), device=device)
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
    return {"load_s": load_s, "pp_s": pp_s, "tg_s": tg_s}


def measure_speed(refs: list[ModelRef], settings: SpeedSettings, threads: int) -> list[SpeedReport]:
    """Measure each model `settings.repeats` times, interleaved; keep each model's fastest pp and tg."""
    runs: list[list[dict]] = [[] for _ in refs]
    peak = [0] * len(refs)
    for _ in range(settings.repeats):
        for i, ref in enumerate(refs):
            result, rss_kb = _measure_once(ref, settings, threads)
            runs[i].append(result)
            peak[i] = max(peak[i], rss_kb * 1024)
    return [
        SpeedReport(
            model=ref, threads=threads, prompt_tokens=settings.prompt_tokens, gen_tokens=settings.gen_tokens,
            pp_tokens_per_s=settings.prompt_tokens / min(r["pp_s"] for r in rs),
            tg_tokens_per_s=settings.gen_tokens / min(r["tg_s"] for r in rs),
            load_s=min(r["load_s"] for r in rs) if rs[0]["load_s"] is not None else None, peak_rss_bytes=peak[i],
        )
        for i, (ref, rs) in enumerate(zip(refs, runs))
    ]


def _measure_once(ref: ModelRef, settings: SpeedSettings, threads: int) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "quantloop.eval.speed", "--runtime", ref.runtime, "--model", ref.path,
           "--prompt-tokens", str(settings.prompt_tokens), "--gen-tokens", str(settings.gen_tokens), "--threads", str(threads)]
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
    a = p.parse_args(argv)
    fn = _bench_llama_cpp if a.runtime == "llama.cpp" else _bench_transformers
    result = fn(a.model, a.prompt_tokens, a.gen_tokens, a.threads)
    result.setdefault("peak_rss_kb", peak_rss_bytes() // 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
