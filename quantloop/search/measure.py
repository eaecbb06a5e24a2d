"""Measure a candidate GGUF on llama.cpp: mean KLD against the F16 GGUF on held-out text of several domains
(full vocabulary, llama-perplexity's scoring: the second half of every window), the perplexity change, and
token-generation speed from llama-bench (the C++ benchmark; best of the repeats)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np

from quantloop.eval.kld import KLDAccumulator
from quantloop.eval.perplexity import first_scored, log_softmax
from quantloop.eval.runtimes import LlamaCppRunner, default_threads
from quantloop.gguf.llamacpp import tool
from quantloop.models.checkpoints import load_hf_tokenizer
from quantloop.search.schemas import TextSpec
from quantloop.search.sensitivity import text_chunks


class Baseline:
    """The F16 GGUF's log-probabilities on every domain's windows, computed once per process."""

    def __init__(self, f16_gguf: Path, tokenizer_dir: Path, text: list[TextSpec], threads: int | None = None):
        tok = load_hf_tokenizer(tokenizer_dir)
        self.threads = threads
        self.n_ctx = max(s.seqlen for s in text)
        self.domains: dict[str, list[np.ndarray]] = {}
        for s in text:
            name = Path(s.dataset_dir).name if s.source == "dataset" else "synthetic"
            self.domains[name if name not in self.domains else f"{name}:{s.split}"] = text_chunks(s, tok, tokenizer_dir)[0]
        runner = LlamaCppRunner(f16_gguf, n_ctx=self.n_ctx, threads=threads)
        try:
            self.logprobs = {d: [log_softmax(runner.logits(c)[first_scored(len(c)):len(c) - 1]) for c in cs]
                             for d, cs in self.domains.items()}
        finally:
            runner.close()

    def kld(self, gguf: Path) -> dict[str, dict[str, float]]:
        """Per domain: mean KLD and perplexity increase (%) of `gguf` against the F16 model."""
        runner = LlamaCppRunner(gguf, n_ctx=self.n_ctx, threads=self.threads)
        out = {}
        try:
            for d, chunks in self.domains.items():
                acc = KLDAccumulator()
                for c, lb in zip(chunks, self.logprobs[d]):
                    first = first_scored(len(c))
                    acc.add_logprobs(lb, log_softmax(runner.logits(c)[first:len(c) - 1]), np.asarray(c[first + 1:]))
                r = acc.report()
                out[d] = {"kld_mean": r.kld_mean, "ppl_increase_pct": r.ppl_increase_pct, "ln_ppl_ratio": r.ln_ppl_ratio}
        finally:
            runner.close()
        return out


def summarize(by_domain: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(mean over domains of the mean KLD, perplexity increase in % from the mean ln ratio)."""
    kld = float(np.mean([v["kld_mean"] for v in by_domain.values()]))
    ln = float(np.mean([v["ln_ppl_ratio"] for v in by_domain.values()]))
    return kld, (math.exp(ln) - 1) * 100


def tg_speed(gguf: Path, tokens: int = 32, repeats: int = 2, threads: int | None = None) -> float:
    """Token-generation speed (tokens/s, batch 1) of llama-bench on `gguf`; the best of `repeats` runs."""
    cmd = [str(tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-r", "1",
           "-t", str(threads or default_threads()), "-o", "json"]
    best = 0.0
    for _ in range(repeats):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
            raise RuntimeError(f"llama-bench failed on {gguf}: {tail[0][:200]}")
        tests = [t for t in json.loads(proc.stdout) if t["n_gen"] > 0]
        best = max(best, tests[0]["n_gen"] / (tests[0]["avg_ns"] / 1e9))
    return best
