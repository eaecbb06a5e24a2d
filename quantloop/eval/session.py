"""Shared steps of the measurement tools: open runners, read the test tokens, score chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantloop.data.datasets import read_split
from quantloop.errors import InputError
from quantloop.eval.kld import KLDAccumulator
from quantloop.eval.perplexity import first_scored, make_chunks, scored_nll, summarize_nll
from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner
from quantloop.eval.sequential import run_looks
from quantloop.models.checkpoints import ResolvedModel, load_hf_tokenizer
from quantloop.schemas import KLDReport, PerplexityReport


def open_runner(model: ResolvedModel, runtime: str, n_ctx: int):
    if runtime == "llama.cpp":
        if model.gguf is None:
            raise InputError(model.path, "no GGUF file for the llama.cpp runtime", "run `quantloop prepare` on it or pass a .gguf")
        return LlamaCppRunner(model.gguf, n_ctx=n_ctx)
    if model.hf_dir is None:
        raise InputError(model.path, "no transformers checkpoint (config.json) for the transformers runtime", "pass a checkpoint folder")
    return TransformersRunner(model.hf_dir)


def split_chunks(dataset_dir: Path, tokenizer_model: ResolvedModel, context: int, chunks: int, fallback_runner=None) -> list[np.ndarray]:
    """Tokenize the test split once (HF tokenizer when there is one, else llama.cpp's) and cut it into chunks."""
    text = read_split(dataset_dir, "test")
    if tokenizer_model.hf_dir is not None:
        ids = load_hf_tokenizer(tokenizer_model.hf_dir)(text, add_special_tokens=False)["input_ids"]
    elif fallback_runner is not None:
        ids = fallback_runner.tokenize(text)
    else:
        raise InputError(tokenizer_model.path, "no tokenizer available", "pass a checkpoint folder or a .gguf")
    out = make_chunks(ids, context, chunks)
    if not out:
        raise InputError(Path(dataset_dir) / "test.txt", f"test split too short: {len(ids)} tokens, one chunk needs {context}", "prepare the dataset from more text")
    return out


def perplexity(runner, chunks: list[np.ndarray], desc: str) -> PerplexityReport:
    nll = [scored_nll(runner.logits(c, first_scored(len(c))), c) for c in tqdm(chunks, desc=desc, unit="chunk", leave=False)]
    ppl, err, mean = summarize_nll(np.concatenate(nll))
    return PerplexityReport(model=runner.ref, context=len(chunks[0]), chunks=len(chunks), tokens_scored=sum(len(n) for n in nll),
                            ppl=ppl, ppl_stderr=err, mean_nll=mean)


def kl_divergence(base_runner, quant_runner, chunks: list[np.ndarray], desc: str = "KLD"):
    acc = KLDAccumulator()
    for c in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        first = first_scored(len(c))
        acc.add_scored(base_runner.logits(c, first), quant_runner.logits(c, first), c)
    return acc.report()


def kld_in_rounds(base_runner, quant_runner, chunks: list[np.ndarray], looks: list[int], margin, c: float,
                  desc: str = "KLD") -> tuple[KLDReport, int]:
    """KLD statistics over the first looks[0] chunks, then the next ones up to each later look, until `margin(report)`
    (standard errors from the bar, > 0 passing) is decided against the boundary c (eval/sequential.py) or the last look
    is reached. Each chunk is scored once. (report, chunks scored)."""
    acc = KLDAccumulator()
    done = [0]
    with tqdm(total=looks[-1], desc=desc, unit="chunk", leave=False) as bar:
        def margin_after(n: int) -> float | None:
            for ch in chunks[done[0]:n]:
                first = first_scored(len(ch))
                acc.add_scored(base_runner.logits(ch, first), quant_runner.logits(ch, first), ch)
                bar.update(1)
            done[0] = n
            return margin(acc.report())
        run_looks(looks, c, margin_after)
    return acc.report(), done[0]
