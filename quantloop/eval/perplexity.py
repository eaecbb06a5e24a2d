"""Perplexity with llama-perplexity's chunking, on any runtime that returns logits.

The test text is tokenized once and cut into consecutive chunks of `context`
tokens. Each chunk is evaluated from an empty cache; only its second half is
scored: logits at positions context/2 .. context-2 predict tokens
context/2+1 .. context-1 (255 tokens per 512-token chunk), so every scored
token has at least context/2 tokens of context. No BOS is inserted: both
runtimes see exactly the same token ids.
"""

from __future__ import annotations

import math

import numpy as np


def make_chunks(ids: np.ndarray | list[int], context: int, max_chunks: int | None = None) -> list[np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // context
    if max_chunks is not None:
        n = min(n, max_chunks)
    return [ids[i * context:(i + 1) * context] for i in range(n)]


def first_scored(context: int) -> int:
    return context // 2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (full vocabulary)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chunk_nll(logits: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of the scored tokens of one chunk."""
    first = first_scored(len(chunk))
    lp = log_softmax(logits[first:len(chunk) - 1])
    targets = chunk[first + 1:]
    return -lp[np.arange(len(targets)), targets]


def summarize_nll(nll: np.ndarray) -> tuple[float, float, float]:
    """(perplexity, its standard error, mean NLL); the error by the delta method, as llama-perplexity."""
    nll = np.asarray(nll, dtype=np.float64)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * se, mean
