"""GPTQ onto llama.cpp's exact grids (quantloop.backends.gptq.grid): every block type, precision maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import prepare_wide_llama

from quantloop.backends.gptq.grid import grid_gptq_weight
from quantloop.gguf import blocks as gb


def _weight_and_hessian(rows: int, cols: int, seed: int = 0):
    """A weight with outlier rows and a Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05 * (1 + 4 * torch.rand(rows, 1, generator=g))
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(2048, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))) @ mix
    return w, x.T @ x


def _loss(w, q, h):
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("type_name", list(gb.TYPES))
def test_gptq_lands_on_the_grid_and_beats_llama_cpp_rounding(type_name, act_order):
    """The GPTQ weight is blocks of the type: gguf-py's dequantizer of the codes and scales GPTQ reports gives it
    back bit for bit, and so does a fit from the weight alone. Its output error under the Hessian is below that of
    llama.cpp's own rounding."""
    w, h = _weight_and_hessian(16, 512)
    q, t, qb = grid_gptq_weight(w, h, type_name, act_order=act_order)
    assert t == type_name
    deq = gb.dequantize(gb.pack(qb.codes, qb.scales, qb.mins, type_name, qb.d, qb.dmin), type_name)
    np.testing.assert_array_equal(deq, q.numpy())
    gb.fit_blocks(q.numpy(), type_name)
    rtn = torch.from_numpy(gb.fake_quantize(w.numpy(), type_name))
    assert _loss(w, q, h) < 0.95 * _loss(w, rtn, h)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_gptq_with_uncorrelated_inputs_is_nearest_rounding_on_llama_cpp_grid(type_name):
    """With a diagonal Hessian no error is carried to other columns: every weight goes to the nearest level of
    llama.cpp's grid for its block. llama.cpp picks codes with the float32 scale before storing it as fp16, so a
    few of its codes are one level off the nearest; GPTQ's are never farther than llama.cpp's."""
    w, _ = _weight_and_hessian(8, 256, seed=1)
    q = grid_gptq_weight(w, torch.diag(torch.rand(256) + 0.5), type_name)[0].numpy()
    rtn = gb.fake_quantize(w.numpy(), type_name)
    assert (np.abs(w.numpy() - q) <= np.abs(w.numpy() - rtn) + 1e-6).all()
    assert (q == rtn).mean() > 0.99


def test_k_quant_falls_back_where_the_super_block_does_not_divide_the_width():
    w, h = _weight_and_hessian(8, 96)
    q, t, qb = grid_gptq_weight(w, h, "Q4_K")  # 96 columns: llama.cpp writes Q5_0 instead
    assert t == gb.fallback_type("Q4_K", 96) == "Q5_0"
    np.testing.assert_array_equal(gb.dequantize(gb.pack(qb.codes, qb.scales, None, t), t), q.numpy())


@pytest.mark.slow
def test_gptq_with_the_arch_default_preset_writes_the_planned_mixed_file(reference_dir, dataset_dir, tmp_path):
    """GPTQ under the arch-default map on a 256-wide Llama: the GGUF has exactly the planned types, loads in
    llama.cpp, and its blocks dequantize to the GPTQ checkpoint's weights."""
    import json

    from gguf import GGUFReader
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.gguf.precision_map import plan_mixed_file
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    model = prepare_wide_llama(tmp_path, reference_dir, layers=2)
    spec = quant_spec(method="gptq", preset="arch-default",
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=8, seqlen=64))
    r = quantize_model(model, tmp_path / "q", spec)
    assert r.format == "gguf:mixed-arch-default" and spec.tag() == "gptq-arch-default"
    _, _, planned = plan_mixed_file(next(model.glob("*.gguf")), None, "arch-default", {}, {})
    tensors = {t.name: t for t in GGUFReader(r.model_path).tensors}
    assert {n: t.tensor_type.name for n, t in tensors.items()} == planned
    res = json.loads((tmp_path / "q" / "gptq_result.json").read_text())
    assert res["linear_types"] == {"Q4_K": 8, "Q6_K": 6} and res["calibration_tokens"] == 8 * 64
    state = load_file(tmp_path / "q" / "model.safetensors")
    for gguf_name, hf_name in [("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")]:
        t = tensors[gguf_name]
        np.testing.assert_array_equal(gb.dequantize(t.data, t.tensor_type.name), state[hf_name])
    raw = LlamaForCausalLM.from_pretrained(model).state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    assert not np.array_equal(state["model.layers.1.mlp.down_proj.weight"], gb.fake_quantize(raw, "Q6_K"))  # GPTQ moved codes
    runner = LlamaCppRunner(r.model_path, n_ctx=64)
    logits = runner.logits(runner.tokenize("To be, or not to be"))
    assert logits.shape[1] == 49152 and np.isfinite(logits).all()


def test_export_refuses_blocks_that_do_not_hold_the_checkpoint_weights(tiny_copy, tmp_path):
    """A quantizer's blocks are written only when they dequantize to the checkpoint's weights; otherwise one clear
    error and no file."""
    from safetensors.numpy import load_file

    from quantloop.errors import InputError
    from quantloop.gguf.export import export_hf_to_gguf

    w = load_file(next(tiny_copy.glob("*.safetensors")))["model.layers.0.self_attn.v_proj.weight"]
    qb = gb.quantize_blocks(w, "Q8_0")  # llama.cpp's rounding of the float weights: not the weights themselves
    out = tmp_path / "x.gguf"
    with pytest.raises(InputError, match="blk.0.attn_v.weight: row 0 is not one the quantizer's Q8_0 blocks hold"):
        export_hf_to_gguf(tiny_copy, out, "Q8_0", tensor_types={"attn_v": "Q8_0", ".": "F16"}, embedding_type="F16",
                          blocks={"blk.0.attn_v.weight": ("Q8_0", qb)})
    assert not out.exists()


def test_which_gptq_runs_on_the_gguf_grid():
    from quantloop.schemas import quant_spec

    plain = quant_spec(method="gptq", bits=4, group_size=32, gguf_type="Q4_0")  # GPTQModel's layout is Q4_0 already
    assert not plain.gptq_on_gguf_grid() and plain.tag() == "gptq-w4g32"
    for spec, tag in [(quant_spec(method="gptq", gguf_type="Q4_K"), "gptq-q4_k"),
                      (quant_spec(method="gptq", gguf_type="Q4_0", act_order=True), "gptq-q4_0-act"),
                      (quant_spec(method="gptq", preset="arch-default"), "gptq-arch-default"),
                      (quant_spec(method="gptq", layer_types={"attention": "Q4_K"}), "gptq-mix")]:
        assert spec.gptq_on_gguf_grid() and spec.tag() == tag
    from quantloop.backends.base import backend_for

    assert type(backend_for(quant_spec(method="awq", gguf_type="Q4_K"))).__name__ == "GPTQModelBackend"
