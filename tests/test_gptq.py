"""GPTQ and AWQ through GPTQModel on a tiny random Llama (CPU).

The model is built here: hidden 128, intermediate 256, 4 heads / 2 KV heads
(so k/v have 64 outputs, the multiple GPTQModel's AWQ clip search needs),
vocabulary 49152 with the real SmolLM2 tokenizer. Calibration is 8 x 128
tokens of the prepared calibration split. Each quantization takes a few
seconds; the first GPTQ run on a machine also JIT-compiles GPTQModel's C++
packer once (about a minute on 2 cores, cached in ~/.cache/gptqmodel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest

from quantloop.errors import InputError

needs_gptqmodel = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                     reason="gptqmodel is not installed (pip install gptqmodel==7.6.0)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_gptq_llama(tmp_path_factory, reference_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("gptq") / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # rows whose weights are all positive: asymmetric groups then get zero point 0,
        # the edge case of the GPTQ v1 "zero - 1" storage
        w = model.model.layers[0].self_attn.q_proj.weight
        w[:16] = w[:16].abs() + 0.01
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(reference_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def calibration(dataset_dir, reference_dir) -> list[list[int]]:
    from quantloop.data.datasets import read_split
    from quantloop.models.checkpoints import load_hf_tokenizer

    ids = load_hf_tokenizer(reference_dir)(read_split(dataset_dir, "calibration")[:60000])["input_ids"]
    return [ids[i * 128:(i + 1) * 128] for i in range(8)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_gptq_llama, calibration):
    """Quantize on first use, once per (method, bits, group, symmetric, run) for the whole module."""
    from quantloop.backends.gptq.gptqmodel import quantize_gptq

    root = tmp_path_factory.mktemp("gptq-out")
    done: dict = {}

    def get(method: str, bits: int, group_size: int, symmetric: bool, run: int = 0) -> tuple[Path, dict]:
        key = (method, bits, group_size, symmetric, run)
        if key not in done:
            out = root / f"{method}{bits}-g{group_size}-{'sym' if symmetric else 'asym'}-{run}"
            info = quantize_gptq(tiny_gptq_llama, out, bits, group_size, symmetric, False, calibration,
                                 method=method, seed=0)
            done[key] = (out, info)
        return done[key]

    return get


# --------------------------------------------------------------------------- helpers


def _float_weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


POSITIVE_ROWS = ("model.layers.0.self_attn.q_proj", 16)


def _step_errors(q, w):
    """|dequantized - float| in units of each weight's own quantization step (its group's scale)."""
    step = q.scales.float()[:, q.g_idx.long()]
    return (q.dequantize() - w.float()).abs() / step


def _natural_rows(name: str, err):
    """Drop the rows made all-positive on purpose. GPTQ's symmetric grid (reference code, kept by
    GPTQModel) only widens to [-max, max] when a group has a negative weight; an all-positive group
    gets scale max/15 but zero point 8, so its upper half clamps. AWQ's asymmetric zero point is
    clamped at 0, so an all-positive group's grid starts at 0 and cannot reach its maximum.
    Real 32-wide groups are almost never all positive."""
    return err[POSITIVE_ROWS[1]:] if name == POSITIVE_ROWS[0] else err


def _check_against_kernel(model, out_dir: Path, names: list[str]) -> None:
    """The loaded runtime kernel computes the weights read from the safetensors: every code, zero and
    scale decoded right (a wrong one is a whole step off). GPTQModel's int4 CPU kernels round scales
    and activations to bfloat16, so agreement is to a few hundredths of a step, not bit-exact."""
    import torch

    from quantloop.backends.gptq.checkpoint import read_quantized_linear

    modules = dict(model.model.named_modules())
    for name in names:
        q = read_quantized_linear(out_dir, name)
        ref = q.dequantize()
        step = q.scales.float()[:, q.g_idx.long()]
        mod = modules[name]
        with torch.inference_mode():
            eye = torch.eye(ref.shape[1], dtype=torch.float16)
            got = mod(eye).float().T  # [out, in]
        if getattr(mod, "bias", None) is not None:
            got = got - mod.bias.float()[:, None]
        assert ((got - ref).abs() / step).max().item() < 0.1, f"{name}: kernel disagrees with the decoded codes"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- bad input (no GPTQModel needed)


def _fake_checkpoint(root: Path, widths: dict[str, tuple[int, int]]) -> Path:
    import json

    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    save_file({f"{k}.weight": torch.zeros(shape) for k, shape in widths.items()}, str(root / "model.safetensors"))
    return root


@pytest.mark.parametrize("method,bits,group,act_order,problem", [
    ("gptq", 5, 32, False, "does not support 5 bits"),
    ("gptq", 4, 48, False, "group size 48 is not supported"),
    ("awq", 8, 32, False, "does not support 8 bits"),
    ("awq", 4, 32, True, "act-order"),
    ("awq", 4, -1, False, "AWQ needs a group size"),
    ("rtn", 4, 32, False, "unknown method"),
    ("gptq", 4, 128, False, "does not divide the input width 576"),
])
def test_bad_settings_are_one_line_errors(tmp_path, method, bits, group, act_order, problem):
    from quantloop.backends.gptq.gptqmodel import quantize_gptq

    hf = _fake_checkpoint(tmp_path / "m", {"model.layers.0.mlp.down_proj": (576, 576)})
    with pytest.raises(InputError, match=problem) as e:
        quantize_gptq(hf, tmp_path / "out", bits, group, True, act_order, [[1, 2, 3]], method=method)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_calibration_and_output_refused(tmp_path):
    from quantloop.backends.gptq.gptqmodel import quantize_gptq

    hf = _fake_checkpoint(tmp_path / "m", {"model.layers.0.mlp.down_proj": (64, 64)})
    with pytest.raises(InputError, match="calibration is empty"):
        quantize_gptq(hf, tmp_path / "out", 4, 32, True, False, [])
    with pytest.raises(InputError, match="outside"):
        quantize_gptq(hf, tmp_path / "out", 4, 32, True, False, [[1, 2, 500]])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        quantize_gptq(hf, busy, 4, 32, True, False, [[1, 2, 3]])
    awq_bad = _fake_checkpoint(tmp_path / "a", {"model.layers.0.self_attn.v_proj": (32, 64)})
    with pytest.raises(InputError, match="multiples of 64"):
        quantize_gptq(awq_bad, tmp_path / "out2", 4, 32, False, False, [[1, 2, 3]], method="awq")


# --------------------------------------------------------------------------- GPTQ / AWQ on the tiny Llama


@needs_gptqmodel
def test_gptq4_g32_reloads_runs_and_stays_within_a_step(tiny_gptq_llama, quantized, calibration):
    import torch

    from quantloop.backends.gptq.checkpoint import (
        gptq_logits,
        kernel_names,
        load_gptq,
        quantized_linear_names,
        read_quantized_linear,
    )

    out, info = quantized("gptq", 4, 32, True)
    assert info["library_version"] == "7.6.0" and info["format"] == "gptq" and info["scale_dtype"] == "float16"
    assert info["calibration_samples"] == 8 and info["calibration_tokens"] == 8 * 128
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "quantize_config.json"):
        assert (out / name).is_file(), name

    names = quantized_linear_names(out)
    assert len(names) == 2 * 7
    float_w = _float_weights(tiny_gptq_llama)
    for name in names:
        q = read_quantized_linear(out, name)
        assert q.scales.dtype == torch.float16 and q.trivial_groups
        assert torch.all(q.zeros == 8), "symmetric 4-bit GPTQ: zero point 8 everywhere"
        assert int(q.codes.max()) <= 15
        err = _natural_rows(name, _step_errors(q, float_w[f"{name}.weight"]))
        # GPTQ moves weights to compensate earlier rounding: most stay within a step, a few go further
        assert err.mean() < 0.4 and (err <= 1.0).float().mean() > 0.95 and err.max() < 3.0, name

    model = load_gptq(out)
    assert kernel_names(model) == ["TorchAtenLinear"], "4-bit reloads on the int4 CPU kernel"
    logits = gptq_logits(model, calibration[0][:32])
    assert logits.shape == (32, 49152) and torch.isfinite(logits).all()
    _check_against_kernel(model, out, names[:3])


@needs_gptqmodel
def test_gptq4_asymmetric_zero_points_decode_like_the_kernel(tiny_gptq_llama, quantized):
    import torch

    from quantloop.backends.gptq.checkpoint import (
        load_gptq,
        quantized_linear_names,
        read_quantized_linear,
    )

    out, _ = quantized("gptq", 4, 32, False)
    q = read_quantized_linear(out, "model.layers.0.self_attn.q_proj")
    assert not q.symmetric
    assert (q.zeros == 0).any(), "all-positive rows give zero point 0 (stored as -1 in the v1 layout)"
    assert int(q.zeros.max()) <= 15
    float_w = _float_weights(tiny_gptq_llama)
    err = _step_errors(q, float_w["model.layers.0.self_attn.q_proj.weight"])
    assert err.mean() < 0.4 and (err <= 1.0).float().mean() > 0.95
    _check_against_kernel(load_gptq(out), out, quantized_linear_names(out))
    assert torch.equal(read_quantized_linear(out, "model.layers.0.self_attn.q_proj").codes, q.codes)


@needs_gptqmodel
def test_gptq8_reloads_and_stays_within_a_step(tiny_gptq_llama, quantized, calibration):
    import torch

    from quantloop.backends.gptq.checkpoint import (
        gptq_logits,
        load_gptq,
        quantized_linear_names,
        read_quantized_linear,
    )

    out, info = quantized("gptq", 8, 32, True)
    assert info["bits"] == 8
    float_w = _float_weights(tiny_gptq_llama)
    for name in quantized_linear_names(out):
        q = read_quantized_linear(out, name)
        assert torch.all(q.zeros == 128) and q.trivial_groups
        err = _natural_rows(name, _step_errors(q, float_w[f"{name}.weight"]))
        assert err.mean() < 0.4 and (err <= 1.0).float().mean() > 0.95 and err.max() < 3.0, name
    logits = gptq_logits(load_gptq(out), calibration[0][:16])
    assert logits.shape == (16, 49152) and torch.isfinite(logits).all()


@needs_gptqmodel
def test_awq4_reloads_and_stays_within_a_step(tiny_gptq_llama, quantized, calibration):
    """AWQ folds a per-input-channel scale s into the RMSNorm before q/k/v/gate/up
    (W' = W * s, norm' = norm / s) and clips group ranges. Undoing s with the saved
    norms, q/k (never clipped) land within half a step; clipped layers mostly within one."""
    import torch

    from quantloop.backends.gptq.checkpoint import (
        gptq_logits,
        kernel_names,
        load_gptq,
        quantized_linear_names,
        read_quantized_linear,
    )

    out, info = quantized("awq", 4, 32, False)
    assert info["format"] == "gemm" and info["method"] == "awq"
    float_w = _float_weights(tiny_gptq_llama)
    saved = _float_weights(out)
    names = quantized_linear_names(out)
    assert len(names) == 2 * 7
    for name in names:
        layer = name.split(".layers.")[1].split(".")[0]
        kind = name.rsplit(".", 1)[-1]
        q = read_quantized_linear(out, name)
        assert q.scales.dtype == torch.float16 and int(q.codes.max()) <= 15
        if kind not in ("q_proj", "k_proj", "v_proj", "gate_proj"):
            continue  # o/down inputs and up outputs carry scales folded into neighbouring linears
        norm = f"model.layers.{layer}.{'input_layernorm' if 'self_attn' in name else 'post_attention_layernorm'}.weight"
        s = float_w[norm].float() / saved[norm].float()
        # all-positive rows: AWQ's asymmetric zero point is clamped at 0, so the grid cannot reach
        # their maximum (GPTQ widens the range to include 0 instead)
        err = _natural_rows(name, _step_errors(q, float_w[f"{name}.weight"].float() * s[None, :]))
        if kind in ("q_proj", "k_proj"):
            assert err.max() < 0.6, name
        assert err.mean() < 0.35 and (err <= 1.0).float().mean() > 0.95, name

    model = load_gptq(out)
    assert kernel_names(model) == ["TorchAtenAwqLinear"]
    logits = gptq_logits(model, calibration[1][:32])
    assert logits.shape == (32, 49152) and torch.isfinite(logits).all()
    _check_against_kernel(model, out, names[:3])


@needs_gptqmodel
@pytest.mark.parametrize("method,bits,symmetric", [("gptq", 4, True), ("awq", 4, False)])
def test_same_seed_gives_identical_files(quantized, method, bits, symmetric):
    first, _ = quantized(method, bits, 32, symmetric, run=0)
    second, _ = quantized(method, bits, 32, symmetric, run=1)
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert _sha(first / f) == _sha(second / f), f


@needs_gptqmodel
def test_act_order_permutes_groups(tmp_path, tiny_gptq_llama, calibration):
    """desc_act reorders columns: g_idx is no longer i // group, so no GGUF block type holds it."""
    from quantloop.backends.gptq.gptqmodel import quantize_gptq
    from quantloop.backends.gptq.checkpoint import read_quantized_linear

    out = tmp_path / "ao"
    info = quantize_gptq(tiny_gptq_llama, out, 4, 32, True, True, calibration[:4], seed=0)
    assert info["act_order"] is True
    q = read_quantized_linear(out, "model.layers.0.mlp.down_proj")
    assert not q.trivial_groups
    shutil.rmtree(out)
