"""The real SmolLM2-135M reference: both runtimes agree, Q8_0 passes the quality bar,
and the generation checks pass the float model while failing a broken one."""

import pytest

from quantloop.backends.gguf import quantize_gguf
from quantloop.eval.generation import check_generations
from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner
from quantloop.eval.session import perplexity, split_chunks
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import ValidationRequest
from quantloop.specs import load_quality_spec
from quantloop.tools import validate_quantization

pytestmark = pytest.mark.slow


def test_runtimes_agree_on_the_float_reference(reference_dir, dataset_dir):
    m = resolve_model(reference_dir)
    chunks = split_chunks(dataset_dir, m, 512, 4)
    hf = perplexity(TransformersRunner(reference_dir), chunks, "hf")
    cpp = perplexity(LlamaCppRunner(m.gguf), chunks, "cpp")
    assert 5 < hf.ppl < 100
    assert abs(cpp.ppl / hf.ppl - 1) < 0.005


def test_q8_0_of_the_reference_is_near_lossless(reference_dir, dataset_dir, tmp_path):
    q = quantize_gguf(reference_dir / "smollm2-135m-f16.gguf", tmp_path / "q8_0.gguf", "Q8_0")
    r = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(reference_dir), dataset_dir=str(dataset_dir), chunks=4,
                                                measure_speed=False))  # speed is bench/bench_speed_verdict.py's
    assert abs(r.kld.ppl_increase_pct) < 2.0
    assert r.kld.kld_mean < 0.02
    assert r.kld.same_top_rate > 0.9
    assert 1.8 < r.size_ratio < 2.0  # F16 -> Q8_0 (8.5 bits/weight)
    assert r.generation.passed
    assert "dequantized" in r.reference_note  # the report says which reference this is


def test_generation_checks_pass_the_float_model_and_fail_a_broken_one(reference_dir, tiny_prepared):
    spec = load_quality_spec()
    float_runner = LlamaCppRunner(resolve_model(reference_dir).gguf)
    ok = check_generations(float_runner, float_runner, spec.generation)
    assert ok.passed, [s.failures for s in ok.samples]
    broken = LlamaCppRunner(resolve_model(tiny_prepared).gguf)  # random weights, same tokenizer
    bad = check_generations(broken, float_runner, spec.generation)
    assert bad.failures == len(spec.generation.prompts)
    assert all(any("nonsense" in f or "repetition" in f or "empty" in f for f in s.failures) for s in bad.samples)
