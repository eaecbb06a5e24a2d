"""Every metric against a hand-computed value."""

import math

import numpy as np
import pytest

from quantloop.eval.generation import repeated_ngram_rate
from quantloop.eval.kld import KLDAccumulator
from quantloop.eval.perplexity import chunk_nll, log_softmax, make_chunks, summarize_nll


def test_chunks_score_second_half_like_llama_perplexity():
    ids = np.arange(1100)
    chunks = make_chunks(ids, 512)
    assert len(chunks) == 2 and all(len(c) == 512 for c in chunks)
    nll = chunk_nll(np.zeros((512, 2000)), chunks[0])
    assert len(nll) == 255  # positions 256..510 predict tokens 257..511
    assert len(make_chunks(ids, 512, max_chunks=1)) == 1


def test_uniform_model_perplexity_equals_vocabulary_size():
    vocab = 1000
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, vocab, size=64)
    ppl, err, mean = summarize_nll(chunk_nll(np.zeros((64, vocab)), chunk))
    assert ppl == pytest.approx(vocab, rel=1e-9)
    assert err == pytest.approx(0.0, abs=1e-9)
    assert mean == pytest.approx(math.log(vocab))


def test_perplexity_of_known_probabilities():
    # 8-token chunk: positions 4, 5, 6 are scored and predict tokens 5, 6, 7
    logits = np.zeros((8, 3))
    logits[4] = np.log([0.5, 0.25, 0.25])
    logits[5] = np.log([0.25, 0.5, 0.25])
    logits[6] = np.log([0.25, 0.25, 0.5])
    chunk = np.array([0, 0, 0, 0, 0, 0, 2, 1])
    nll = chunk_nll(logits, chunk)
    assert nll == pytest.approx([math.log(2), math.log(4), math.log(4)])
    ppl, _, _ = summarize_nll(nll)
    assert ppl == pytest.approx((2 * 4 * 4) ** (1 / 3))


def test_kld_of_two_known_distributions():
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.25, 0.75]])
    acc = KLDAccumulator()
    acc.add_logprobs(np.log(p), np.log(q), np.array([0]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    r = acc.report()
    assert r.kld_mean == pytest.approx(expected)
    assert r.delta_p_mean == pytest.approx(0.25 - 0.5)
    assert r.rms_delta_p == pytest.approx(0.25)
    assert r.ln_ppl_ratio == pytest.approx(-math.log(0.25) + math.log(0.5))
    assert r.ppl_increase_pct == pytest.approx(100.0)  # ppl 2 -> 4
    assert r.same_top_rate == 0.0  # argmax 0 (tie broken to first) vs 1


def test_model_against_itself():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(512, 300))
    chunk = rng.integers(0, 300, size=512)
    acc = KLDAccumulator()
    acc.add_chunk(logits, logits.copy(), chunk)
    r = acc.report()
    assert r.tokens == 255
    assert r.kld_mean == pytest.approx(0.0, abs=1e-12)
    assert r.same_top_rate == 1.0
    assert r.ppl_ratio == pytest.approx(1.0)
    assert r.kld.max == pytest.approx(0.0, abs=1e-12)


def test_kld_percentiles_and_ln_ratio_stderr_are_paired():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(512, 50))
    quant = base + rng.normal(scale=0.1, size=base.shape)
    chunk = rng.integers(0, 50, size=512)
    acc = KLDAccumulator()
    acc.add_chunk(base, quant, chunk)
    r = acc.report()
    lb, lq = log_softmax(base[256:511]), log_softmax(quant[256:511])
    kl = (np.exp(lb) * (lb - lq)).sum(-1)
    assert r.kld_mean == pytest.approx(kl.mean())
    assert r.kld.median == pytest.approx(np.median(kl))
    assert r.kld.min <= r.kld.p0_1 <= r.kld.p1 <= r.kld.median <= r.kld.p99 <= r.kld.max
    d = -lq[np.arange(255), chunk[257:]] + lb[np.arange(255), chunk[257:]]
    assert r.ln_ppl_ratio_stderr == pytest.approx(d.std(ddof=1) / math.sqrt(255))


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6], 2) == 0.0
    # bigrams: (1,2) (2,1) (1,2) (2,1) (1,2): 3 of 5 seen before
    assert repeated_ngram_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(3 / 5)
    assert repeated_ngram_rate([7], 4) == 0.0
