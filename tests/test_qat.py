"""QAT onto the exact GGUF grid (quantloop.backends.qat.backend) and LLM-QAT synthetic data (quantloop.data.synthetic)."""

import math

import numpy as np
import pytest
import torch
from conftest import llama_cpp_logits_match, prepare_wide_llama

from quantloop.backends.qat.backend import QATConfig, kl_divergence
from quantloop.gguf.torch_grid import QAT_TYPES, check_grid_model, check_grid_type, fake_quantize_torch, ste_fake_quantize
from quantloop.errors import InputError
from quantloop.gguf import blocks as gb


def _weights(rows=48, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :32] = 0  # all-zero block
    w[1, :32] = 0.01  # flat block
    w[2, :32] *= 40  # large block
    w[3, 32:64] = np.abs(w[3, 32:64])  # one-signed blocks
    w[4, 32:64] = -np.abs(w[4, 32:64])
    w[5, :] = rng.standard_t(2, cols).astype(np.float32) * 0.01  # heavy tails
    return w


@pytest.mark.parametrize("type_name", QAT_TYPES)
def test_torch_fake_quantizer_equals_gguf_grid(type_name):
    w = _weights()
    ref = gb.fake_quantize(w, type_name)
    got = fake_quantize_torch(torch.from_numpy(w), type_name).numpy()
    # bit-exact in practice; the contract is fp16 rounding of the scales
    np.testing.assert_allclose(got, ref, rtol=2**-11, atol=0)
    assert np.array_equal(got, ref)
    # its output is on the grid: requantizing changes nothing (IQ4_NL: llama.cpp's scale search may pick another
    # grid for a grid point, e.g. d of the other sign for a flat block), and export's fitter accepts it
    if type_name != "IQ4_NL":
        np.testing.assert_array_equal(fake_quantize_torch(torch.from_numpy(got), type_name).numpy(), got)
    gb.fit_blocks(got, type_name)


def test_ste_gradient_passes_straight_through():
    torch.manual_seed(0)
    w = (torch.randn(8, 64) * 0.02).requires_grad_(True)
    x = torch.randn(5, 64)
    target = torch.randn(5, 8)
    for t in QAT_TYPES:
        w.grad = None
        q = ste_fake_quantize(w, t)
        np.testing.assert_array_equal(q.detach().numpy(), fake_quantize_torch(w, t).numpy())
        q.retain_grad()
        loss = ((x @ q.T - target) ** 2).sum()
        loss.backward()
        # d loss / d w == d loss / d fake_quant(w): the grid's range is set by each block's own
        # extremes, so no weight is clipped and every weight is in the pass-through region
        torch.testing.assert_close(w.grad, q.grad, rtol=0, atol=0)
        assert w.grad.abs().sum() > 0


def test_kl_loss_on_known_distributions():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.25, 0.5])
    hand = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)  # = 0.25 ln 2
    got = kl_divergence(p.log()[None, None], q.log()[None, None] + 3.0)  # logits: any offset
    assert abs(float(got) - hand) < 1e-6
    assert abs(hand - 0.25 * math.log(2)) < 1e-12
    # mean over positions; identical distributions give 0
    two = kl_divergence(torch.stack([p.log(), p.log()])[None], torch.stack([q.log(), p.log()])[None])
    assert abs(float(two) - hand / 2) < 1e-6
    # temperature T: T^2 * KL(softmax(t/T) || softmax(s/T))
    T = 2.0
    pt, qt = torch.softmax(p.log() / T, -1), torch.softmax(q.log() / T, -1)
    hand_t = T * T * float((pt * (pt / qt).log()).sum())
    assert abs(float(kl_divergence(p.log()[None, None], q.log()[None, None], T)) - hand_t) < 1e-6


def test_bad_settings_are_input_errors():
    for bad in ("IQ4_XS", "F16", "Q3"):
        with pytest.raises(InputError):
            check_grid_type(bad)
    for bits in (1, 9, 3.5):
        with pytest.raises(InputError, match="bits"):
            check_grid_type(bits=bits)
    with pytest.raises(InputError):
        check_grid_type(bits=8, symmetric=False)
    assert check_grid_type(bits=4, symmetric=False) == "Q4_1"
    assert check_grid_type("q5_0") == "Q5_0"

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 64)
            self.o_proj = torch.nn.Linear(48, 64)  # 48 is not a multiple of 32

    with pytest.raises(InputError, match="o_proj"):
        check_grid_model(Attn(), "Q4_0")


def test_synthetic_generator_is_deterministic():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantloop.data.synthetic import generate_synthetic

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    a = generate_synthetic(model, 300, 5, 12, seed=1, batch_size=2, progress=False)
    b = generate_synthetic(model, 300, 5, 12, seed=1, batch_size=2, progress=False)
    c = generate_synthetic(model, 300, 5, 12, seed=2, batch_size=2, progress=False)
    assert a == b and a != c
    assert len(a) == 5 and all(len(s) == 12 for s in a) and all(0 <= t < 300 for s in a for t in s)
    # positions 1..greedy_tokens are the model's argmax
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(a)).logits
    assert (logits[:, :3].argmax(-1) == torch.tensor(a)[:, 1:4]).all()


class _Tok:
    def __init__(self, n, special):
        self.n, self.all_special_ids = n, special

    def __len__(self):
        return self.n


def test_synthetic_first_tokens_skip_special_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantloop.data.synthetic import generate_synthetic

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = generate_synthetic(model, _Tok(8, [0, 1, 2, 3, 4, 5]), 40, 2, seed=0, progress=False)
    assert {s[0] for s in ids} == {6, 7}


def test_cached_synthetic_reuses_the_cache(tiny_prepared, tmp_path, monkeypatch):
    import json

    import quantloop.data.synthetic as syn

    a = syn.cached_synthetic(tiny_prepared, 3, 6, 0, tmp_path)
    manifest = json.loads(next(tmp_path.glob("synthetic-*.json")).read_text())
    assert manifest["seed"] == 0 and manifest["n"] == 3 and manifest["seqlen"] == 6 and len(manifest["sha256"]) == 64
    monkeypatch.setattr(syn, "generate_synthetic", lambda *a, **k: pytest.fail("cache not reused"))
    assert syn.cached_synthetic(tiny_prepared, 3, 6, 0, tmp_path) == a


@pytest.mark.slow
def test_short_qat_lowers_kl_and_exports_exactly(tiny_prepared, tmp_path):
    """30 steps of data-free QAT on the tiny model: lower KL than round-to-nearest, lossless GGUF export."""
    import json

    import gguf
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.numpy import load_file

    from quantloop.backends.qat.backend import qat_checkpoint
    from quantloop.data.synthetic import generate_synthetic
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

    teacher = load_hf_model(tiny_prepared)
    seqs = generate_synthetic(teacher, load_hf_tokenizer(tiny_prepared), 12, 24, seed=0, batch_size=12, progress=False)
    del teacher
    out = tmp_path / "qat"
    path = qat_checkpoint(tiny_prepared, out, "Q4_0", seqs, steps=30, seed=0,
                          config=QATConfig(lr=1e-4, batch_size=4, groups=2, progress=False, device="cpu"))
    res = json.loads((out / "qat_result.json").read_text())
    assert res["steps"] > 0 and len(res["stages"]) == 3
    assert res["final_kl"] < res["rtn_kl"], res  # measured 1.14e-4 -> 0.88e-4

    # the student's weights are on the grid, and the GGUF's blocks dequantize to them
    state = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for i in range(config["num_hidden_layers"]):
        for g, h in names.items():
            w = state[f"model.layers.{i}.{h}.weight"]
            np.testing.assert_array_equal(gb.fake_quantize(w, "Q4_0"), w)
            w = permute(w, heads) if g == "attn_q" else permute(w, kv) if g == "attn_k" else w
            t = tensors[f"blk.{i}.{g}.weight"]
            assert t.tensor_type == GGMLQuantizationType.Q4_0
            np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), w, rtol=2**-11, atol=0)
    del reader

    # llama.cpp loads it and agrees with transformers on the same weights
    llama_cpp_logits_match(out, path, "To be, or not to be, that is the question")


def test_quantize_model_qat_data_free_is_deterministic(tiny_prepared, tmp_path):
    """`quantloop quantize --method qat --data-free`: synthetic calibration, a GGUF on the Q4_0 grid, same tensors twice."""
    import json

    from quantloop.gguf.llamacpp import read_metadata
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    spec = quant_spec(method="qat", gguf_type="Q4_0", qat_steps=3, calibration=CalibrationSpec(source="synthetic", samples=6, seqlen=32))
    a = quantize_model(tiny_prepared, tmp_path / "a", spec)
    b = quantize_model(tiny_prepared, tmp_path / "b", spec)
    assert a.format == "gguf:Q4_0" and a.model_path.endswith(".gguf") and "-synth" in spec.tag()
    from gguf import GGUFReader

    ta, tb = GGUFReader(a.model_path).tensors, GGUFReader(b.model_path).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    assert all(x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data) for x, y in zip(ta, tb))
    assert a.calibration_manifest_sha256 == b.calibration_manifest_sha256 and len(a.calibration_manifest_sha256) == 64
    assert read_metadata(a.model_path).file_type == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    saved = json.loads((tmp_path / "a" / "quantization_config.json").read_text())["quantloop"]
    assert saved["spec"]["method"] == "qat" and saved["spec"]["calibration"]["source"] == "synthetic"
    assert json.loads((tmp_path / "a" / "qat_result.json").read_text())["steps"] == 3


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_frozen_grid_starts_at_llama_cpp_rounding(type_name):
    from quantloop.gguf.torch_grid import kquant_fake_quantize, kquant_grid

    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 512, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    step, off = kquant_grid(w, type_name)
    fq = kquant_fake_quantize(w, type_name, step, off)
    np.testing.assert_array_equal(fq.numpy(), gb.fake_quantize(w.numpy(), type_name))
    # a weight that moved a little stays on the frozen grid: every value is step * q - offset
    moved = kquant_fake_quantize(w + 0.002 * torch.randn(6, 512, generator=g), type_name, step, off)
    sub = 16 if type_name == "Q6_K" else 32
    s = step.repeat_interleave(sub, dim=1)
    o = 0 if off is None else off.repeat_interleave(sub, dim=1)
    q = torch.where(s == 0, torch.zeros(()), (moved + o) / torch.where(s == 0, torch.ones(()), s))
    assert torch.allclose(q, q.round(), atol=1e-3)


@pytest.mark.slow
def test_kquant_qat_exports_llama_cpp_rounding_exactly(reference_dir, tmp_path):
    """Q4_K QAT on a 256-wide Llama: 256-wide rows are Q4_K in the GGUF, the 512-wide ffn_down too, and the file's
    blocks dequantize to the student's weights; the embedding sits on llama-quantize's Q6_K grid."""
    import json

    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantloop.backends.qat.backend import qat_checkpoint

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(reference_dir).save_pretrained(src)
    seqs = torch.randint(3, 49152, (6, 16), generator=torch.Generator().manual_seed(0)).tolist()
    out = tmp_path / "qat"
    path = qat_checkpoint(src, out, "Q4_K", seqs, steps=3, config=QATConfig(batch_size=2, groups=1, progress=False, device="cpu"))
    res = json.loads((out / "qat_result.json").read_text())
    assert res["gguf_type"] == "Q4_K" and res["embedding_type"] == "Q6_K"
    state = load_file(out / "model.safetensors")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == GGMLQuantizationType.Q4_K
    np.testing.assert_allclose(gb.dequantize(t.data, "Q4_K"), state["model.layers.0.mlp.down_proj.weight"], rtol=2**-11, atol=0)
    t = tensors["token_embd.weight"]
    assert t.tensor_type == GGMLQuantizationType.Q6_K
    np.testing.assert_allclose(gb.dequantize(t.data, "Q6_K"), state["model.embed_tokens.weight"], rtol=2**-11, atol=0)
    assert tensors["blk.0.attn_v.weight"].tensor_type == GGMLQuantizationType.Q4_K


@pytest.mark.slow
def test_qat_with_the_arch_default_preset_writes_the_planned_mixed_file(reference_dir, tmp_path):
    """QAT under the arch-default precision map on a 256-wide Llama: attention trains for Q4_K, the feed-forward for
    Q6_K, the embedding sits on Q8_0; the GGUF has exactly the types `quantloop estimate` plans, its size, and blocks
    that dequantize to the student's weights."""
    import json

    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from quantloop.gguf.precision_map import estimate_bytes, plan_mixed_file
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    model = prepare_wide_llama(tmp_path, reference_dir, layers=1)
    spec = quant_spec(method="qat", preset="arch-default", qat_steps=2,
                     calibration=CalibrationSpec(source="synthetic", samples=6, seqlen=16))
    r = quantize_model(model, tmp_path / "q", spec)
    assert r.format == "gguf:mixed-arch-default" and spec.tag() == "qat-arch-default-s2-synth"
    f16 = next(model.glob("*.gguf"))
    _, _, planned = plan_mixed_file(f16, None, "arch-default", {}, {})
    tensors = {t.name: t for t in GGUFReader(r.model_path).tensors}
    assert {n: t.tensor_type.name for n, t in tensors.items()} == planned
    assert planned["blk.0.attn_q.weight"] == "Q4_K" and planned["blk.0.ffn_up.weight"] == "Q6_K"
    assert planned["token_embd.weight"] == "Q8_0" and planned["blk.0.attn_norm.weight"] == "F32"
    assert estimate_bytes(f16, planned)["bytes"] == pytest.approx(r.bytes_on_disk, rel=0.01)
    res = json.loads((tmp_path / "q" / "qat_result.json").read_text())
    assert res["linear_types"] == {"Q4_K": 4, "Q6_K": 3} and res["embedding_type"] == "Q8_0"
    state = load_file(tmp_path / "q" / "model.safetensors")
    for gguf_name, hf_name in [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),  # q/k rows are permuted by the converter
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")]:
        t = tensors[gguf_name]
        np.testing.assert_allclose(gb.dequantize(t.data, t.tensor_type.name), state[hf_name], rtol=2**-11, atol=0)


def test_qat_preset_naming_a_missing_layer_type_is_an_input_error(tiny_prepared, tmp_path):
    from quantloop.schemas import quant_spec
    from quantloop.tools.quantize import quantize_model

    with pytest.raises(InputError, match="layer type 'output'"):
        quantize_model(tiny_prepared, tmp_path / "q", quant_spec(method="qat", layer_types={"output": "Q8_0"}, qat_steps=1))
    assert not (tmp_path / "q").exists()


def test_quantize_model_qat_from_gptq_starts_at_gptqs_solution(tiny_prepared, tmp_path):
    """`--qat-init gptq` reaches the trainer: with no steps the file holds GPTQ's solution, not the rounded float
    weights, and the spec's tag and the result say where training started."""
    import json

    from gguf import GGUFReader

    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    cal = CalibrationSpec(samples=8, seqlen=32)
    rounded = quant_spec(method="qat", gguf_type="Q4_0", qat_steps=0, calibration=cal)
    from_gptq = rounded.model_copy(update={"qat_init": "gptq"})
    assert from_gptq.tag() == "qat-q4_0-s0-from-gptq" and rounded.tag() == "qat-q4_0-s0"
    a = quantize_model(tiny_prepared, tmp_path / "a", rounded)
    b = quantize_model(tiny_prepared, tmp_path / "b", from_gptq)
    assert json.loads((tmp_path / "a" / "qat_result.json").read_text())["init"] == "teacher"
    assert json.loads((tmp_path / "b" / "qat_result.json").read_text())["init"] == "gptq"
    ta = {t.name: t for t in GGUFReader(a.model_path).tensors}
    tb = {t.name: t for t in GGUFReader(b.model_path).tensors}
    moved = [n for n in ta if n.endswith("attn_q.weight") and not np.array_equal(ta[n].data, tb[n].data)]
    assert moved  # GPTQ moved codes off round-to-nearest
    # the tied embedding starts from GPTQ as the output projection too (the GPTQ step's head), not from rounding
    assert ta["token_embd.weight"].tensor_type == tb["token_embd.weight"].tensor_type
    assert not np.array_equal(ta["token_embd.weight"].data, tb["token_embd.weight"].data)
    # from GPTQ every weight is on its grid already: one global stage, no per-layer sensitivity pass
    result_b = json.loads((tmp_path / "b" / "qat_result.json").read_text())
    assert result_b["sensitivity"] == {} and [s["stage"] for s in result_b["stages"]] == ["global"]
