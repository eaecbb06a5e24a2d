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
    """Negative log-likelihood of the scored tokens of one chunk (logits of every position; float64 throughout)."""
    first = first_scored(len(chunk))
    lp = log_softmax(logits[first:len(chunk) - 1])
    targets = chunk[first + 1:]
    return -lp[np.arange(len(targets)), targets]


def scored_nll(logits: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """The same from the logits of positions first_scored(len(chunk)) .. len(chunk)-1 only (what the runners return
    with start), by logsumexp: within 1e-5 of chunk_nll."""
    targets = np.asarray(chunk[first_scored(len(chunk)) + 1:])
    return logsumexp(logits[:len(targets)]) - np.asarray(logits, dtype=np.float64)[np.arange(len(targets)), targets]


def logsumexp(logits: np.ndarray, rows: int = 8) -> np.ndarray:
    """Row-wise log-sum-exp in float64, the exponentials in float32 a few rows at a time (a 262,144-token
    vocabulary makes a float64 copy of the logits the slow part of scoring)."""
    out = np.empty(len(logits))
    for i in range(0, len(logits), rows):
        x = np.asarray(logits[i:i + rows], dtype=np.float32)
        m = x.max(-1, keepdims=True)
        out[i:i + rows] = m[:, 0] + np.log(np.exp(x - m).sum(-1, dtype=np.float64))
    return out


def summarize_nll(nll: np.ndarray) -> tuple[float, float, float]:
    """(perplexity, its standard error, mean NLL); the error by the delta method, as llama-perplexity."""
    nll = np.asarray(nll, dtype=np.float64)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * se, mean
