"""Exact GGUF block packers against llama.cpp itself (ggml_quantize_chunk) and gguf-py; lossless export."""

import shutil
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from conftest import llama_cpp_logits_match
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from gguf_block_helpers import dequant_formula, ggml_quantize, packed
from quantloop.errors import InputError
from quantloop.gguf import blocks as gb

TYPES = list(gb.TYPES)
BLOCK32 = [t for t in TYPES if not gb.TYPES[t].kquant and not gb.TYPES[t].levels]  # gguf-py quantizes these too


def weights(seed=0, rows=8, cols=512):
    """Random weights with the awkward cases: zero and constant blocks, one sign, a spike, tiny and large rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :256] = 0
    w[0, 256:300] = 0.25
    w[1] = np.abs(w[1])
    w[2] = -np.abs(w[2])
    w[3, 7] = 3.0
    w[4] *= 1e-6
    w[5] = rng.laplace(size=cols) * 300
    w[6, :32] = -0.0
    w[6, 32:64] = np.where(rng.random(32) < 0.5, -0.0, 0.0)
    return w


def random_blocks(type_name: str, seed=0, rows=8, cols=512) -> gb.QuantBlocks:
    """Codes and scales an optimizer could choose: codes that rarely reach both ends of the range."""
    rng = np.random.default_rng(seed)
    bt = gb.TYPES[type_name]
    top = 2**bt.bits - 1
    lo = rng.integers(0, top // 3 + 1, (rows, cols))
    codes = rng.integers(lo, rng.integers(2 * top // 3, top + 1, (rows, cols)) + 1)
    if not bt.kquant:
        d = rng.uniform(1e-4, 1e-2, (rows, cols // 32))
        if bt.symmetric:  # llama.cpp's d is negative when the largest magnitude is positive
            d *= rng.choice([-1, 1], d.shape)
        d = d.astype(np.float16)
        if bt.bits == 8:
            return gb.QuantBlocks(codes - 128, d, None)
        m = (-d.astype(np.float64) * rng.uniform(0, top, d.shape)).astype(np.float16)  # a zero point inside the range
        return gb.QuantBlocks(codes, d, None if bt.symmetric else m)
    nb = cols // 256
    ns, (lo, hi, mmax) = nb * 256 // bt.sub, gb.KQUANT_RANGES[type_name]
    d = rng.uniform(1e-5, 2e-4, (rows, nb)).astype(np.float16)
    if bt.symmetric:  # Q6_K, Q3_K
        return gb.QuantBlocks(codes, rng.integers(lo, hi + 1, (rows, ns)), None, d)
    return gb.QuantBlocks(codes, rng.integers(lo, hi + 1, (rows, ns)), rng.integers(0, mmax + 1, (rows, ns)), d,
                          rng.uniform(1e-5, 2e-3, (rows, nb)).astype(np.float16))


# --------------------------------------------------------------------------- block packers


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_llama_cpp_bytes(type_name):
    for seed in range(2):
        w = weights(seed)
        mine = gb.quantize_to_bytes(w, type_name)
        assert mine.shape == (8, 512 // gb.TYPES[type_name].block * GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1])
        np.testing.assert_array_equal(mine, ggml_quantize(w, type_name))
        if type_name in BLOCK32:  # gguf-py's numpy reference quantizers (which differ on the sign of a zero d)
            keep = np.arange(8) != 6
            np.testing.assert_array_equal(mine[keep], gguf.quants.quantize(w[keep], GGMLQuantizationType[type_name]))


@pytest.mark.parametrize("type_name", TYPES)
def test_codes_and_scales_round_trip_through_gguf_py(type_name):
    w = weights(3)
    qb = gb.quantize_blocks(w, type_name)
    raw = packed(qb, type_name)
    back = gb.unpack(raw, type_name)
    for a, b in zip(qb, back):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_array_equal(packed(back, type_name), raw)
    ref = gguf.quants.dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(dequant_formula(qb, type_name), ref)
    np.testing.assert_array_equal(gb.fake_quantize(w, type_name), ref)
    # the layout, spelled out for Q4_0: d, then byte j = element j (low nibble) | element j+16 (high nibble)
    if type_name == "Q4_0":
        blk = raw[1, :18]
        assert blk[:2].view(np.float16)[0] == qb.scales[1, 0]
        np.testing.assert_array_equal(blk[2:] & 0xF, qb.codes[1, :16])
        np.testing.assert_array_equal(blk[2:] >> 4, qb.codes[1, 16:32])


@pytest.mark.parametrize("type_name", TYPES)
def test_optimizer_codes_pack_exactly_and_are_recovered_from_floats(type_name):
    qb = random_blocks(type_name, seed=1)
    raw = packed(qb, type_name)
    w = gguf.quants.dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(dequant_formula(qb, type_name), w)
    fit = gb.fit_blocks(w, type_name)  # codes the float weights hold, though llama.cpp would round them differently
    np.testing.assert_array_equal(gb.dequantize(packed(fit, type_name), type_name), w)
    grid = gb.fake_quantize(weights(4), type_name)  # llama.cpp's own grid points
    raw = packed(gb.fit_blocks(grid, type_name), type_name)
    np.testing.assert_array_equal(gb.dequantize(raw, type_name), grid)
    if type_name in BLOCK32:  # where llama.cpp's rounding is idempotent, its bytes
        np.testing.assert_array_equal(raw, ggml_quantize(grid, type_name))


@pytest.mark.parametrize("type_name", TYPES)
def test_off_grid_weights_are_refused(type_name):
    w = weights(5)
    with pytest.raises(gb.OffGridError, match=f"not on the {type_name} grid"):
        gb.fit_blocks(w, type_name)
    grid = gb.fake_quantize(w, type_name)
    grid[3, 40] += 0.004 * np.abs(grid[3, 32:64]).max()  # one value off by 0.4 % of its block's largest magnitude
    with pytest.raises(gb.OffGridError, match="1 of"):
        gb.fit_blocks(grid, type_name)


def test_fp16_rounding_is_tolerated():
    """RTN with float32 scales (quantloop.backends.rtn) is on the Q4_0 grid to fp16 rounding."""
    import torch

    from quantloop.backends.rtn import rtn_fake_quantize

    w = weights(6)
    for bits, sym, t in [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")]:
        r = rtn_fake_quantize(torch.from_numpy(w), bits, 32, sym).numpy()
        back = gb.dequantize(packed(gb.fit_blocks(r, t), t), t)
        blockmax = np.repeat(np.abs(r).reshape(-1, 32).max(axis=1).reshape(8, -1), 32, axis=1)
        assert (np.abs(back - r) <= 2.0**-10 * blockmax).all()
    # GPTQ's asymmetric groups, w = s*(q - z) in float32: the offset -s*z is rounded to fp16
    rng = np.random.default_rng(8)
    codes, z = rng.integers(0, 16, (8, 512)), np.repeat(rng.integers(0, 16, (8, 16)), 32, axis=1)
    s = np.repeat(rng.uniform(1e-3, 1e-2, (8, 16)).astype(np.float16).astype(np.float32), 32, axis=1)
    r = s * (codes - z).astype(np.float32)
    back = gb.dequantize(packed(gb.fit_blocks(r, "Q4_1"), "Q4_1"), "Q4_1")
    assert (np.abs(back - r) <= 2.0**-11 * (np.abs(r) + 2 * s * z)).all() and not np.array_equal(back, r)


def test_fallback_types_follow_llama_quantize():
    assert gb.fallback_type("Q4_K", 512) == "Q4_K"
    assert [gb.fallback_type(t, 576) for t in ("Q4_K", "Q5_K", "Q6_K", "Q4_0")] == ["Q5_0", "Q5_1", "Q8_0", "Q4_0"]
    assert gb.fallback_type("Q4_K", 40) == gb.fallback_type("Q8_0", 40) == "F16"


def test_layout_to_type():
    assert gb.gguf_type_for_layout(4, 32, True) == "Q4_0"
    assert gb.gguf_type_for_layout(4, 32, False) == "Q4_1"
    assert gb.gguf_type_for_layout(5, 32, True) == "Q5_0"
    assert gb.gguf_type_for_layout(5, 32, False) == "Q5_1"
    assert gb.gguf_type_for_layout(8, 32, True) == "Q8_0"
    assert gb.gguf_type_for_layout(8, 32, False) is None
    assert gb.gguf_type_for_layout(4, 128, True) is None
    assert gb.gguf_type_for_layout(3, 32, True) is None


@pytest.mark.parametrize("type_name,bits,sym", [("Q4_0", 4, True), ("Q4_1", 4, False), ("Q5_0", 5, True),
                                                ("Q5_1", 5, False), ("Q8_0", 8, True)])
def test_pack_from_gptq_codes(type_name, bits, sym):
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 2**bits, (4, 128))
    scales = rng.uniform(1e-3, 1e-2, (4, 4)).astype(np.float16)
    zeros = None if sym else rng.integers(0, 2**bits, (4, 4))
    w = gb.dequantize(gb.pack_from_codes(codes, scales, type_name, zeros), type_name)
    z = 2 ** (bits - 1) if sym else np.repeat(zeros, 32, axis=1)
    expect = np.repeat(scales.astype(np.float64), 32, axis=1) * (codes - z)
    offset = np.repeat(np.abs(scales.astype(np.float64) * (0 if sym else zeros)), 32, axis=1)
    assert (np.abs(w - expect) <= 2.0**-11 * offset + 1e-12).all()  # exact, but for the fp16 offset of Q4_1/Q5_1
    if sym:
        np.testing.assert_array_equal(w, expect.astype(np.float32))
    # refusals: the block type cannot hold these
    with pytest.raises(ValueError, match="groups of 32"):
        gb.pack_from_codes(codes, scales[:, :2], type_name, zeros, group_size=64)
    with pytest.raises(ValueError, match=f"0..{2**bits - 1}"):
        gb.pack_from_codes(codes + 2**bits, scales, type_name, zeros)
    with pytest.raises(ValueError, match="fp16"):
        gb.pack_from_codes(codes, scales.astype(np.float32) * np.float32(1.0001), type_name, zeros)
    if sym:
        with pytest.raises(ValueError, match="symmetric"):
            gb.pack_from_codes(codes, scales, type_name, np.full((4, 4), 3))
    else:
        with pytest.raises(ValueError, match="asymmetric"):
            gb.pack_from_codes(codes, scales, type_name, None)


def test_pack_refuses_what_the_type_cannot_hold():
    codes = np.full((2, 64), 3)
    d = np.ones((2, 2), np.float16)
    with pytest.raises(ValueError, match="0..15"):
        gb.pack(codes + 13, d, None, "Q4_0")
    with pytest.raises(ValueError, match="stores no mins"):
        gb.pack(codes, d, d, "Q4_0")
    with pytest.raises(ValueError, match="mins are required"):
        gb.pack(codes, d, None, "Q4_1")
    with pytest.raises(ValueError, match="fp16"):
        gb.pack(codes, np.full((2, 2), 0.1), None, "Q4_0")
    with pytest.raises(ValueError, match="fp16 range"):
        gb.pack(codes, np.full((2, 2), 1e6), None, "Q8_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        gb.pack(codes, d, None, "Q6_K")
    with pytest.raises(ValueError, match="unknown GGUF block type"):
        gb.pack(codes, d, None, "IQ2_XS")
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        gb.quantize_blocks(np.zeros((2, 64), np.float32), "Q4_K")


# --------------------------------------------------------------------------- export


def _permute(w, n_head, n_head_kv=None):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: the q/k row order of the rotary halves."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fake_quantize_checkpoint(src: Path, dst: Path, type_name: str, overrides: dict[str, str]) -> dict[str, np.ndarray]:
    """Copy an HF folder with every linear weight put on its type's grid; returns the new weights and the config."""
    import json

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.gguf"):
        f.unlink()
    path = dst / "model.safetensors"
    state = load_file(path)
    for k, v in state.items():
        if k.endswith("_proj.weight"):
            state[k] = gb.fake_quantize(v, next((t for pat, t in overrides.items() if pat in k), type_name))
    save_file(state, path, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    return state, config


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_export_is_lossless_and_loads_in_llama_cpp(tiny_prepared, tmp_path, type_name):
    from quantloop.gguf.export import export_hf_to_gguf

    hf = tmp_path / "hf"
    mixed = type_name == "Q4_0"  # per-tensor types, as llama-quantize --tensor-type: down_proj in Q8_0
    state, config = _fake_quantize_checkpoint(tiny_prepared, hf, type_name, {"down_proj": "Q8_0"} if mixed else {})
    out = export_hf_to_gguf(hf, tmp_path / f"tiny-{type_name}.gguf", type_name, {r"ffn_down": "Q8_0"} if mixed else None,
                            embedding_type="F16")  # float embeddings: llama.cpp must then compute what transformers does
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))

    # (a) the file's blocks dequantize (gguf-py) to the checkpoint's weights, exactly
    reader = GGUFReader(out)
    assert reader.get_field("general.file_type").contents() == {"Q4_0": 2, "Q8_0": 7}[type_name]
    tensors = {t.name: t for t in reader.tensors}
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(config["num_hidden_layers"]):
        for g, h in names.items():
            t = tensors[f"blk.{i}.{g}.weight"]
            assert t.tensor_type == GGMLQuantizationType["Q8_0" if mixed and g == "ffn_down" else type_name]
            w = state[f"model.layers.{i}.{h}.weight"]
            w = _permute(w, heads) if g == "attn_q" else _permute(w, heads, kv) if g == "attn_k" else w
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), w)
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    del reader

    # (b) llama.cpp runs it and computes what transformers computes with the same weights (measured 0.004, top-1 1.0)
    llama_cpp_logits_match(hf, out, "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer", top1=0.95)


def test_export_refuses_off_grid_weights(tiny_prepared, tmp_path, monkeypatch):
    import quantloop.gguf.llamacpp
    from quantloop.gguf.export import export_hf_to_gguf

    hf = tmp_path / "hf"
    shutil.copytree(tiny_prepared, hf)
    out = tmp_path / "x.gguf"
    # the float weights as llama.cpp's converter writes them, without running it again (F16 holds them closely enough)
    monkeypatch.setattr(quantloop.gguf.llamacpp, "convert_hf_to_gguf", lambda src, dst, outtype: shutil.copy(hf / "tiny-f16.gguf", dst))
    with pytest.raises(InputError, match="not on the Q5_0 grid"):  # 64-wide rows: llama.cpp's fallback for Q4_K
        export_hf_to_gguf(hf, out, "Q4_K")
    with pytest.raises(InputError, match=r"tensor blk\.\d+\.\w+\.weight is not on the Q4_0 grid: \d+ of \d+ blocks are off \(max dev"):
        export_hf_to_gguf(hf, out, "Q4_0")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]
    with pytest.raises(InputError, match="unknown GGUF type 'IQ2_XS'"):
        export_hf_to_gguf(hf, out, "IQ2_XS")
