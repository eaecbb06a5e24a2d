"""IQ4_NL, Q3_K and Q2_K as exact grids: llama.cpp's own bytes (ggml_quantize_chunk and llama-quantize), gguf-py's
dequantizer, the torch grid, GPTQ and QAT exports read back bit for bit."""

import subprocess

import gguf.quants
import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits_match
from gguf import GGMLQuantizationType, GGUFReader

import gguf_block_helpers as ref
from quantloop.gguf import blocks as gb
from quantloop.gguf.torch_grid import fake_quantize_torch, ste_fake_quantize

NEW = [t for t in ("IQ4_NL", "Q3_K", "Q2_K") if t in gb.TYPES]


def awkward(seed: int = 0, cols: int = 512) -> np.ndarray:
    """One awkward case per row: zeros, a huge outlier, all equal, negative only, tiny, signed zeros, large, mixed blocks."""
    rng = np.random.default_rng(seed)
    n = lambda: rng.standard_normal(cols).astype(np.float32)  # noqa: E731
    rows = [np.zeros(cols, np.float32), n() * 0.01, np.full(cols, 0.3, np.float32), -np.abs(n()) * 0.05, n() * 1e-8,
            np.where(rng.random(cols) < 0.5, -0.0, 0.0).astype(np.float32), (rng.laplace(size=cols) * 300).astype(np.float32),
            np.full(cols, -0.7, np.float32), n() * 0.05, np.abs(n()) * 0.02]
    rows[1][5] = 50.0  # one huge outlier
    rows[8][::64] = 0.0  # blocks with some exact zeros
    rows[8][:32] = 1e-20  # a block below GROUP_MAX_EPS: all its weights round to zero
    rows[9][256:] = rows[9][256:] * 1e-6  # a super-block thousands of times smaller than its neighbour
    return np.stack(rows)


def random_normal(seed: int, rows: int = 64, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 1.0, (rows, 1))).astype(np.float32)


@pytest.mark.parametrize("type_name", NEW)
def test_rounding_is_byte_equal_to_llama_cpp(type_name):
    for w in [awkward(0), awkward(1)] + [random_normal(s) for s in range(3)]:
        mine = gb.quantize_to_bytes(w, type_name)
        np.testing.assert_array_equal(mine, ref.ggml_quantize(w, type_name))


@pytest.mark.parametrize("type_name", NEW)
def test_blocks_unpack_and_dequantize_as_gguf_py(type_name):
    w = np.concatenate([awkward(2), random_normal(4, rows=8)])
    qb = gb.quantize_blocks(w, type_name)
    raw = ref.packed(qb, type_name)
    back = gb.unpack(raw, type_name)
    for a, b in zip(qb, back):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_array_equal(ref.packed(back, type_name), raw)
    deq = gguf.quants.dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(gb.dequantize(raw, type_name), deq)
    np.testing.assert_array_equal(ref.dequant_formula(qb, type_name), deq)
    assert np.abs(deq - w).max(axis=1)[8] < 0.3 * np.abs(w[8]).max()  # a rounding, not garbage
    if type_name == "IQ4_NL":  # block_iq4_nl: d, then byte j = code j (low nibble) | code j+16 (high nibble)
        blk = raw[8, 18:36]
        assert blk[:2].view(np.float16)[0] == qb.scales[8, 1]
        np.testing.assert_array_equal(blk[2:] & 0xF, qb.codes[8, 32:48])
        np.testing.assert_array_equal(blk[2:] >> 4, qb.codes[8, 48:64])
        assert (qb.codes[0] == 8).all() and (deq[0] == 0).all()  # zero blocks: d = 0, level 1


@pytest.fixture(scope="module")
def wide_prepared(tmp_path_factory, reference_dir):
    from conftest import prepare_wide_llama

    return prepare_wide_llama(tmp_path_factory.mktemp("wide"), reference_dir, layers=1)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", NEW)
def test_llama_quantize_writes_the_same_bytes(request, tmp_path, type_name):
    """llama-quantize --pure on a model's F16 GGUF (the tiny one, 64 wide; k-quants: a 256-wide one): every tensor it
    stores as the type holds our bytes for the same weights."""
    from quantloop.gguf.llamacpp import tool

    model = request.getfixturevalue("wide_prepared" if gb.TYPES[type_name].kquant else "tiny_prepared")
    src = next(model.glob("*.gguf"))
    out = tmp_path / f"tiny-{type_name}.gguf"
    subprocess.run([str(tool("llama-quantize")), "--pure", str(src), str(out), type_name, "1"], check=True,
                   capture_output=True)
    f16 = {t.name: np.asarray(t.data) for t in GGUFReader(src).tensors}
    checked = 0
    for t in GGUFReader(out).tensors:
        if t.tensor_type == GGMLQuantizationType[type_name] and t.name.startswith("blk."):
            w = f16[t.name].astype(np.float32).reshape(-1, f16[t.name].shape[-1])
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape[0], -1), gb.quantize_to_bytes(w, type_name))
            checked += 1
    assert checked >= 7


@pytest.mark.parametrize("type_name", [t for t in NEW if not gb.TYPES[t].kquant])
def test_torch_grid_is_bit_equal_and_passes_gradients_straight_through(type_name):
    for w in [awkward(3), random_normal(5)]:
        got = fake_quantize_torch(torch.from_numpy(w), type_name).numpy()
        np.testing.assert_array_equal(got, gb.fake_quantize(w, type_name))
    w = torch.from_numpy(random_normal(6, rows=8, cols=64)).requires_grad_(True)
    q = ste_fake_quantize(w, type_name)
    (q * torch.arange(64.0)).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.broadcast_to(np.arange(64.0, dtype=np.float32), (8, 64)))


def test_iq4_nl_fits_on_grid_weights_and_refuses_others():
    """Codes an optimizer chose (any of the 16 levels, either sign of d) are recovered from the float weights.
    llama.cpp's own rounding is not idempotent: a flat block's grid point is rounded again with d of the other sign."""
    flat = gb.fake_quantize(np.full((1, 32), 0.01, np.float32), "IQ4_NL")
    again = gb.quantize_blocks(flat, "IQ4_NL")
    assert gb.quantize_blocks(np.full((1, 32), 0.01, np.float32), "IQ4_NL").scales[0, 0] < 0 < again.scales[0, 0]
    np.testing.assert_array_equal(ref.packed(again, "IQ4_NL"), ref.ggml_quantize(flat, "IQ4_NL"))
    np.testing.assert_array_equal(gb.dequantize(ref.packed(gb.fit_blocks(flat, "IQ4_NL"), "IQ4_NL"), "IQ4_NL"), flat)
    rng = np.random.default_rng(9)
    codes = rng.integers(2, 14, (8, 256))
    d = (rng.uniform(1e-4, 1e-2, (8, 8)) * rng.choice([-1, 1], (8, 8))).astype(np.float16)
    w = gb.dequantize(gb.pack(codes, d, None, "IQ4_NL"), "IQ4_NL")
    fit = gb.fit_blocks(w, "IQ4_NL")
    np.testing.assert_array_equal(gb.dequantize(ref.packed(fit, "IQ4_NL"), "IQ4_NL"), w)
    w[2, 70] += 0.01 * np.abs(w[2, 64:96]).max()
    with pytest.raises(gb.OffGridError, match="1 of 64 blocks of 32 are not on the IQ4_NL grid"):
        gb.fit_blocks(w, "IQ4_NL")
    with pytest.raises(ValueError, match="non-uniform levels"):
        gb.pack_from_codes(codes, d, "IQ4_NL")


LINEARS = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
           "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # (attn_q/attn_k: rows permuted by the converter)


def _check_file_holds_the_checkpoint(gguf_path, out_dir, type_name: str, result_name: str) -> dict:
    """Every linear of the GGUF is `type_name` and dequantizes to the saved checkpoint's weight bit for bit; the export
    wrote the quantizer's own blocks for every linear. Returns the result JSON."""
    import json

    from safetensors.numpy import load_file

    state = load_file(out_dir / "model.safetensors")
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    layers = sum(1 for n in tensors if n.endswith("attn_v.weight"))
    for i in range(layers):
        for g in ("attn_q", "attn_k", *LINEARS):
            assert tensors[f"blk.{i}.{g}.weight"].tensor_type.name == type_name
        for g, h in LINEARS.items():
            t = tensors[f"blk.{i}.{g}.weight"]
            np.testing.assert_array_equal(gb.dequantize(t.data, type_name), state[f"model.layers.{i}.{h}.weight"])
    res = json.loads((out_dir / result_name).read_text())
    assert res["export"]["from_quantizer"] >= 7 * layers
    assert res["export"]["quantized_tensors_read_back"] == len([t for t in tensors.values() if t.tensor_type.name not in ("F32", "F16")])
    return res


def _logits_agree(hf_dir, gguf_path) -> float:
    return llama_cpp_logits_match(hf_dir, gguf_path, "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
                                  top1=0.95)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", NEW)
def test_gptq_export_reads_back_and_runs_in_llama_cpp(request, dataset_dir, tmp_path, type_name):
    """`quantize --method gptq --type T`: GPTQ on the grid (the tiny model; k-quants: a 256-wide one), every linear
    written as GPTQ's own blocks, and llama.cpp computes what transformers computes with the checkpoint."""
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    model = request.getfixturevalue("wide_prepared" if gb.TYPES[type_name].kquant else "tiny_copy")
    spec = quant_spec(method="gptq", gguf_type=type_name, calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=8, seqlen=64))
    assert spec.gptq_on_gguf_grid()
    r = quantize_model(model, tmp_path / "q", spec)
    assert r.format == f"gguf:{type_name}"
    _check_file_holds_the_checkpoint(r.model_path, tmp_path / "q", type_name, "gptq_result.json")
    raw = LlamaForCausalLM.from_pretrained(model).state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    got = load_file(tmp_path / "q" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert not np.array_equal(got, gb.fake_quantize(raw, type_name))  # GPTQ moved codes off llama.cpp's rounding
    _logits_agree(tmp_path / "q", r.model_path)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["IQ4_NL", "Q2_K"])
def test_qat_export_reads_back_and_runs_in_llama_cpp(request, tmp_path, type_name):
    """QAT on the torch grid (IQ4_NL: the bit-exact fake quantizer, scales not learned; Q2_K: the frozen k-quant grid)
    exports blocks that hold the trained checkpoint bit for bit."""
    from quantloop.backends.qat.backend import QATConfig, qat_checkpoint

    model = request.getfixturevalue("wide_prepared" if gb.TYPES[type_name].kquant else "tiny_prepared")
    seqs = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(0)).tolist()
    out = tmp_path / "qat"
    cfg = QATConfig(lr=1e-4, batch_size=4, groups=2, progress=False, device="cpu", learn_scales=False)
    path = qat_checkpoint(model, out, type_name, seqs, steps=4, seed=0, config=cfg)
    _check_file_holds_the_checkpoint(path, out, type_name, "qat_result.json")
    _logits_agree(out, path)


@pytest.mark.parametrize("type_name", [t for t in NEW if gb.TYPES[t].kquant])
def test_kquant_frozen_grid_starts_at_llama_cpp_rounding(type_name):
    from quantloop.gguf.torch_grid import kquant_fake_quantize, kquant_grid

    w = torch.from_numpy(np.concatenate([awkward(4), random_normal(7, rows=6)]))
    step, off = kquant_grid(w, type_name)
    np.testing.assert_array_equal(kquant_fake_quantize(w, type_name, step, off).numpy(), gb.fake_quantize(w.numpy(), type_name))
    moved = kquant_fake_quantize(w + 0.002 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)), type_name, step, off)
    gb.fit_blocks(moved.numpy(), type_name)  # still blocks of the type


@pytest.mark.slow
def test_fallbacks_follow_llama_quantize(tiny_prepared, tmp_path):
    """llama-quantize --pure Q3_K and Q2_K on 64-wide rows write Q4_0 (llama-quant.cpp tensor_type_fallback), with the
    bytes of llama.cpp's Q4_0 rounding; our fallback table and storable types agree."""
    from quantloop.gguf.block_types import stored_type
    from quantloop.gguf.llamacpp import tool
    from quantloop.search.tensors import storable_types

    assert [gb.fallback_type(t, 576) for t in ("Q2_K", "Q3_K", "IQ4_NL")] == ["Q4_0", "Q4_0", "IQ4_NL"]
    assert gb.fallback_type("Q3_K", 1536) == "Q3_K" and gb.fallback_type("IQ4_NL", 40) == "F16"
    assert "IQ4_NL" in storable_types(576) and not {"Q2_K", "Q3_K"} & set(storable_types(576))
    assert {"Q2_K", "Q3_K", "IQ4_NL"} <= set(storable_types(1536))
    src = next(tiny_prepared.glob("*.gguf"))
    f16 = {t.name: np.asarray(t.data) for t in GGUFReader(src).tensors}
    for type_name in ("Q3_K", "Q2_K"):
        out = tmp_path / f"{type_name}.gguf"
        subprocess.run([str(tool("llama-quantize")), "--pure", str(src), str(out), type_name, "1"], check=True, capture_output=True)
        written = [t for t in GGUFReader(out).tensors if len(t.shape) == 2]
        assert len(written) >= 14
        for t in written:
            w = f16[t.name].astype(np.float32).reshape(-1, f16[t.name].shape[-1])
            assert t.tensor_type.name == stored_type(type_name, w.shape[1]) == "Q4_0"
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape[0], -1), gb.quantize_to_bytes(w, "Q4_0"))


def test_a_type_the_rows_cannot_hold_is_one_clear_error(tiny_prepared):
    from quantloop.errors import InputError
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.tensors import check_genome, model_tensors

    mt = model_tensors(resolve_model(tiny_prepared).gguf)
    genome = {t.name: "Q8_0" for t in mt.tensors} | {"blk.0.ffn_down.weight": "Q3_K"}
    with pytest.raises(InputError, match=r"tensor blk\.0\.ffn_down\.weight \(rows of 128\) cannot be stored as Q3_K") as e:
        check_genome(mt, genome)
    assert "\n" not in str(e.value) and "IQ4_NL" in str(e.value)
    assert check_genome(mt, genome | {"blk.0.ffn_down.weight": "IQ4_NL"})["blk.0.ffn_down.weight"] == "IQ4_NL"


def test_search_candidates_and_sensitivity_take_the_new_types(tiny_prepared):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.sensitivity import fake_quantized
    from quantloop.search.tensors import model_tensors

    mt = model_tensors(resolve_model(tiny_prepared).gguf, candidates=("IQ4_NL", "Q3_K", "Q2_K"))
    assert {t.types for t in mt.tensors} == {("IQ4_NL",)}  # 64- and 128-wide rows: no k-quant
    w = random_normal(10, rows=4, cols=256)
    for t in ("IQ4_NL", "Q3_K", "Q2_K"):
        np.testing.assert_array_equal(fake_quantized(w, t), gb.fake_quantize(w.astype(np.float16).astype(np.float32), t))


def test_iq4_nl_nearest_level_is_best_index_int8_at_every_midpoint():
    """best_index_int8 (binary search, then x - lo < hi - x in float32) equals counting the midpoints <= x, checked on
    the 2001 float32 values around every midpoint and level, both signs."""
    from quantloop.gguf.rounding_lowbit import IQ4NL_LEVELS as L
    from quantloop.gguf.rounding_lowbit import best_index

    def c_best_index(x):
        if x <= L[0]:
            return 0
        if x >= L[-1]:
            return 15
        ml, mu = 0, 15
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < L[mav]:
                mu = mav
            else:
                ml = mav
        return mu - 1 if x - L[mu - 1] < L[mu] - x else mu

    centres = np.concatenate([L, (L[:-1] + L[1:]) / np.float32(2)]).astype(np.float32)
    x = (centres.view(np.int32)[:, None] + np.arange(-1000, 1001, dtype=np.int32)).view(np.float32).ravel()
    x = np.concatenate([x, -x])
    np.testing.assert_array_equal(best_index(x), [c_best_index(v) for v in x])


def test_iq4nl_level_lookup_equals_a_binary_search_at_every_midpoint():
    """best_index reads a table by floor(2 x); it must count the midpoints <= x exactly as a binary search does,
    at the midpoints, one float32 step either side, and at NaN, infinities, huge and tiny values."""
    import numpy as np

    from quantloop.gguf.rounding_lowbit import IQ4NL_MIDS, best_index

    m = IQ4NL_MIDS.astype(np.float32)
    edge = np.concatenate([m, np.nextafter(m, np.float32(-1e9)), np.nextafter(m, np.float32(1e9)),
                           np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 1e-30, -1e-30, 256, -256, 255.9,
                                     -255.9, 128.5], np.float32)]).astype(np.float32)
    x = (np.random.default_rng(0).standard_normal((4096, 32)) * 90).astype(np.float32)
    for arr in (edge, x):
        np.testing.assert_array_equal(best_index(arr), np.searchsorted(m, arr, side="right"))
