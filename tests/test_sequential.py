"""Sequential verdicts (quantloop/eval/sequential.py): a bar is looked at after each round and decided at the first look
that shows its verdict, never earlier, with a boundary raised for the number of looks so that a measurement sitting on
the bar passes no more often than with one look."""

from __future__ import annotations

import numpy as np
import pytest

from quantloop.backends.gguf import quantize_gguf
from quantloop.schemas import ValidationRequest
from quantloop.tools.validate import validate_quantization
from spec_helpers import validation_spec
from quantloop.eval.sequential import boundary, decide, doubling, every, final, one_sided_alpha, run_looks, same_verdict_rate


def looked_at(margins: dict[int, float | None], looks: list[int], c: float) -> tuple[list[int], int, str | None]:
    """Run the looks on constructed margins; (the looks measured, where it stopped, its decision)."""
    seen: list[int] = []

    def margin_after(n: int) -> float | None:
        seen.append(n)
        return margins[n]

    n, d = run_looks(looks, c, margin_after)
    return seen, n, d


LOOKS = [4, 8, 16, 32, 64]


@pytest.mark.parametrize("side, sign", [("pass", 1.0), ("fail", -1.0)])
def test_stops_at_the_first_look_that_decides_and_never_earlier(side, sign):
    c = boundary(tuple(LOOKS), 2.0)
    # within the boundary at 4 and 8 chunks (2.4 < c), across it at 16: measured up to 16 and no further
    margins = {4: sign * 1.1, 8: sign * 2.4, 16: sign * (c + 0.01), 32: sign * 9.0, 64: sign * 9.0}
    seen, n, d = looked_at(margins, LOOKS, c)
    assert (seen, n, d) == ([4, 8, 16], 16, side)
    # a margin of exactly decide_sigmas at an interim look does not decide: the boundary is above it
    assert decide(sign * 2.0, c) is None and c > 2.0


def test_a_margin_within_the_boundary_stays_undecided_until_the_cap_and_then_fails():
    c = boundary(tuple(LOOKS), 2.0)
    margins = {n: 2.3 for n in LOOKS}  # it would pass one look at 2 standard errors, not this sequence
    seen, n, d = looked_at(margins, LOOKS, c)
    assert (seen, n, d) == (LOOKS, 64, None)
    assert not final(margins[64], c) and final(c, c)
    assert decide(float("inf"), c) == "pass" and decide(float("-inf"), c) == "fail" and decide(None, c) is None


def test_look_schedules():
    assert doubling(4, 64) == [4, 8, 16, 32, 64]
    assert doubling(16, 50) == [16, 32, 50]
    assert doubling(8, 2) == [2]  # a cap below the first look: one look at the cap
    assert every(5, 15) == [5, 10, 15] and every(4, 15) == [4, 8, 12, 15] and every(5, 5) == [5]


def test_one_look_keeps_decide_sigmas_and_more_looks_raise_the_boundary():
    assert boundary((16,), 2.0) == 2.0
    cs = [boundary(tuple(doubling(64 >> k, 64)), 2.0) for k in range(5)]  # 1, 2, ..., 5 looks
    assert cs[0] == 2.0 and all(a < b for a, b in zip(cs, cs[1:]))
    # the equally spaced five-look constant boundary at this error rate is Pocock's, about 2.45 (2.41 at 2.5 %)
    assert boundary((1, 2, 3, 4, 5), 2.0) == pytest.approx(2.45, abs=0.02)


def test_a_measurement_on_the_bar_passes_no_more_often_than_with_one_look():
    """Simulated sequences of a measurement whose true value is the bar: with the raised boundary the sequence passes
    (crosses +c at some look) at the one-look error rate; at 2 standard errors at every look it would pass far more."""
    rng = np.random.default_rng(7)
    n = np.asarray(LOOKS, dtype=float)
    z = np.cumsum(rng.standard_normal((40_000, len(n))) * np.sqrt(np.diff(n, prepend=0.0)), axis=1) / np.sqrt(n)
    c = boundary(tuple(LOOKS), 2.0)
    sequential = float(np.mean(z.max(axis=1) >= c))
    naive = float(np.mean(z.max(axis=1) >= 2.0))
    alpha = one_sided_alpha(2.0)
    assert abs(sequential - alpha) < 0.004
    assert naive > 2 * alpha


def test_same_verdict_rate():
    assert same_verdict_rate(float("inf"), 2.5) == 1.0 and same_verdict_rate(None, 2.5) is None
    assert same_verdict_rate(2.5, 2.5) == pytest.approx(0.5)
    assert 0.99 < same_verdict_rate(8.0, 2.5) < 1.0 and same_verdict_rate(-8.0, 2.5) > same_verdict_rate(8.0, 2.5)


def test_a_validation_stops_at_the_first_chunk_when_the_bar_is_far(tiny_copy, dataset_dir, tmp_path):
    """On the tiny model: a bar far above Q8_0's increase is decided at the first look, 1 chunk, where the fixed rule
    scores its 4; the verdict is the same. (The tiny model is random: no quantization moves its perplexity far from
    the float model's, so the failing side is shown on constructed measurements above.)"""
    max_ppl, passed = 500.0, True
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q8_0.gguf", "Q8_0")

    def validate(rule: str, **eval_settings):
        spec = validation_spec(tmp_path / f"{rule}.yaml", max_ppl=max_ppl, chunks=4, max_chunks=8, **eval_settings)
        return validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                       spec_file=spec, measure_speed=False, check_generation=False,
                                                       report_path=str(tmp_path / f"{rule}.json")))

    sequential = validate("sequential", first_chunks=1)
    fixed = validate("fixed", sequential=False)
    assert sequential.kld.tokens == 31 and fixed.kld.tokens == 4 * 31  # chunks of 64 tokens score their second half
    ppl = [next(c for c in r.criteria if c.name == "perplexity") for r in (sequential, fixed)]
    assert ppl[0].passed is ppl[1].passed is passed
    assert abs(ppl[0].margin_sigmas) >= boundary((1, 2, 4, 8), 2.0) and abs(ppl[1].margin_sigmas) >= 2.0
