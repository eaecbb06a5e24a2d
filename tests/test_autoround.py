"""AutoRound (auto-round 0.15.1) on the tiny prepared Llama (hidden 64, CPU).

GGUF is tested with ``gguf:q4_0``: every linear of the tiny model is 64 or 128
wide, a multiple of Q4_0's 32-wide blocks, so the whole decoder really is
4-bit Q4_0. With ``gguf:q4_k_m`` none of them is a multiple of 256 (a k-quant
super-block), and AutoRound falls every linear back to Q5_0 / Q8_0, so that
file tests AutoRound's fallback rather than k-quants; it is checked to load
too. Calibration is 4 x 128 tokens of the prepared calibration split; one
quantization takes about 20 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from quantloop.errors import InputError
from quantloop.schemas import quant_spec

needs_autoround = pytest.mark.skipif(importlib.util.find_spec("auto_round") is None,
                                     reason="auto-round is not installed (pip install auto-round==0.15.1)")
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows"


@pytest.fixture(scope="module")
def tiny_hf(tiny_prepared) -> Path:
    from quantloop.models.checkpoints import resolve_model

    return resolve_model(tiny_prepared).hf_dir


@pytest.fixture(scope="module")
def calibration(tiny_hf, dataset_dir) -> list[list[int]]:
    from quantloop.data.calibration import calibration_sequences
    from quantloop.models.checkpoints import load_hf_tokenizer
    from quantloop.schemas import CalibrationSpec

    seqs, _ = calibration_sequences(CalibrationSpec(samples=4, seqlen=128, dataset_dir=str(dataset_dir)),
                                    load_hf_tokenizer(tiny_hf))
    return seqs


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_hf, calibration):
    """Quantize on first use, once per (gguf type, run) for the whole module."""
    from quantloop.backends.autoround import quantize_autoround

    root = tmp_path_factory.mktemp("autoround-out")
    done: dict = {}

    def get(gguf_type: str, run: int = 0) -> Path:
        key = (gguf_type, run)
        if key not in done:
            spec = quant_spec(method="autoround", gguf_type=gguf_type, seed=0)
            done[key] = quantize_autoround(tiny_hf, root / f"{gguf_type}-{run}", spec, calibration)
        return done[key]

    return get


def _types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


# --------------------------------------------------------------------------- GGUF


@needs_autoround
def test_q4_0_gguf_loads_in_llama_cpp_close_to_float(quantized, tiny_prepared):
    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.models.checkpoints import resolve_model

    path = quantized("Q4_0")
    assert path.suffix == ".gguf" and path.parent.is_dir()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no staging left behind
    types = _types(path)
    linears = {n: t for n, t in types.items() if n.startswith("blk.") and t not in ("F32",)}
    assert len(linears) == 14 and set(linears.values()) == {"Q4_0"}, linears

    ref = LlamaCppRunner(resolve_model(tiny_prepared).gguf, n_ctx=64)  # the F16 float model, same runtime
    ids = ref.tokenize(TEXT)
    a = ref.logits(ids)
    del ref
    b = LlamaCppRunner(path, n_ctx=64).logits(ids)
    assert a.shape == b.shape and np.isfinite(b).all()
    rel = np.sqrt(((a - b) ** 2).mean() / ((a - a.mean()) ** 2).mean())
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert rel < 0.25 and corr > 0.97, (rel, corr)  # measured 0.10, 0.995 (top-1 agreement 0.96)


@needs_autoround
def test_same_seed_gives_identical_gguf(quantized):
    a, b = quantized("Q4_0", 0), quantized("Q4_0", 1)
    assert a.name == b.name and a.read_bytes() == b.read_bytes()


@needs_autoround
def test_q4_k_m_falls_back_on_narrow_rows_and_loads(quantized):
    from quantloop.eval.runtimes import LlamaCppRunner

    path = quantized("Q4_K_M")
    types = _types(path)
    linears = {n: t for n, t in types.items() if n.startswith("blk.") and t != "F32"}
    # 64- and 128-wide rows cannot hold 256-wide k-quant super-blocks
    assert set(linears.values()) <= {"Q5_0", "Q5_1", "Q8_0"}, linears
    runner = LlamaCppRunner(path, n_ctx=64)
    assert np.isfinite(runner.logits(runner.tokenize(TEXT))).all()


# --------------------------------------------------------------------------- bad input (no AutoRound run)


def test_refuses_unknown_gguf_type(tiny_hf, tmp_path, calibration):
    from quantloop.backends.autoround import quantize_autoround

    with pytest.raises(InputError, match="cannot export GGUF type"):
        quantize_autoround(tiny_hf, tmp_path / "out", quant_spec(method="autoround", gguf_type="IQ2_XXS"), calibration)
    assert not (tmp_path / "out").exists()


def test_refuses_bad_settings(tiny_hf, tmp_path, calibration):
    from quantloop.backends.autoround import quantize_autoround

    out = tmp_path / "out"
    with pytest.raises(InputError, match="group size 48"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", group_size=48), calibration)
    with pytest.raises(InputError, match="does not divide"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", group_size=128), calibration)  # hidden 64
    with pytest.raises(InputError, match="bits"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", bits=5, group_size=32), calibration)
    with pytest.raises(InputError, match="not 'autoround'"):
        quantize_autoround(tiny_hf, out, quant_spec(method="gptq", gguf_type="Q4_0"), calibration)
    with pytest.raises(InputError, match="calibration is empty"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", gguf_type="Q4_0"), [])
    with pytest.raises(InputError, match="token ids outside"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", gguf_type="Q4_0"), [[0, 10**6]])
    with pytest.raises(InputError, match="no config.json"):
        quantize_autoround(tmp_path, out, quant_spec(method="autoround", gguf_type="Q4_0"), calibration)
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        quantize_autoround(tiny_hf, out, quant_spec(method="autoround", gguf_type="Q4_0"), calibration)
