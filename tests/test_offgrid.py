"""The off-grid twin computes the reference's function with weights on no grid; RTN shows the grid artifact."""

import copy
import json

import numpy as np
import pytest
import torch

from quantloop.backends.rtn import rtn_fake_quantize, rtn_quantize_model_
from quantloop.errors import InputError
from quantloop.models.offgrid import LOGIT_RTOL, offgrid_transform_, prepare_offgrid

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, vocab=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains start at 1; make them generic
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


# --------------------------------------------------------------------------- fast


def test_transform_preserves_logits_and_changes_weights():
    ref = tiny_llama()
    twin = offgrid_transform_(copy.deepcopy(ref), seed=1)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    a, b = logits(ref, ids), logits(twin, ids)
    assert a.std() > 0.1  # logits are not trivially small, so the comparison means something
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    ref_p, twin_p = dict(ref.named_parameters()), dict(twin.named_parameters())
    for name, p in ref_p.items():
        changed = not torch.equal(p, twin_p[name])
        transformed = name.split(".")[-2] in LINEARS + ("input_layernorm", "post_attention_layernorm")
        assert changed == transformed, name  # embedding/lm_head and final norm untouched, everything else moved
    assert twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()


def test_transform_is_seeded_and_stays_in_range():
    ref = tiny_llama()
    a = offgrid_transform_(copy.deepcopy(ref), seed=5)
    b = offgrid_transform_(copy.deepcopy(ref), seed=5)
    c = offgrid_transform_(copy.deepcopy(ref), seed=6)
    w = "model.layers.0.input_layernorm.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    ratio = a.state_dict()[w] / ref.state_dict()[w]
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.25 + 1e-6 and ratio.std() > 0.05


def test_non_llama_is_refused(tmp_path):
    ref = tmp_path / "gpt2"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InputError, match=r"no recipe for architecture GPT2LMHeadModel .*supported: LlamaForCausalLM") as e:
        prepare_offgrid(ref, tmp_path / "out")
    assert e.value.path == str(ref / "config.json")
    assert not (tmp_path / "out").exists()

    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(InputError, match="no recipe for architecture mistral"):
        offgrid_transform_(mistral)


def test_bad_scale_range_is_refused():
    with pytest.raises(InputError, match="scale range"):
        offgrid_transform_(tiny_llama(), low=1.25, high=0.8)


def test_prepare_offgrid_writes_a_twin_and_reuses_it(tiny_prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny-offgrid"
    m = prepare_offgrid(tiny_prepared, out, seed=3)
    assert m.name == "tiny-offgrid" and m.gguf_f16 == "tiny-offgrid-f16.gguf" and m.hf_dir == "."
    assert "off-grid twin of tiny" in m.reference_note and "seed 3" in m.reference_note and "[0.8, 1.25]" in m.reference_note
    assert (out / "tiny-offgrid-f16.gguf").stat().st_size > 0 and (out / "tokenizer.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(tiny_prepared, local_files_only=True).eval()
    twin = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.arange(1, 65)[None]
    a, b = logits(ref, ids), logits(twin, ids)
    assert (a - b).abs().max() <= LOGIT_RTOL * max(1.0, float(a.abs().max()))
    assert prepare_offgrid(tiny_prepared, out, seed=99) == m  # exists: returned as is, not rewritten


def test_prepare_offgrid_writes_nothing_when_the_check_fails(tiny_prepared, tmp_path, monkeypatch):
    import quantloop.models.offgrid as offgrid

    def broken(model, seed, low, high):
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        return model

    monkeypatch.setattr(offgrid, "offgrid_transform_", broken)
    with pytest.raises(RuntimeError, match="does not compute the same function"):
        offgrid.prepare_offgrid(tiny_prepared, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_error_is_bounded(bits, symmetric):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    q = rtn_fake_quantize(w, bits, 32, symmetric)
    g, qg = w.view(16, 4, 32), q.view(16, 4, 32)
    if symmetric:
        step = g.abs().amax(-1, keepdim=True) / 2 ** (bits - 1)
        err_bound = step  # the side opposite the extreme value clamps to the last level
        # the extreme value is exact up to the fp16 rounding of the scale
        assert torch.allclose(qg.abs().amax(-1), g.abs().amax(-1), rtol=2**-10)
    else:
        step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2**bits - 1)
        err_bound = step / 2
    fp16_slack = (2**bits * step + g.abs().amax(-1, keepdim=True)) * 2**-10  # scales and offsets are fp16
    assert ((qg - g).abs() <= err_bound * (1 + 1e-5) + fp16_slack + 1e-7).all()
    assert qg.unique().numel() <= 16 * 4 * 2**bits
    for row in qg.reshape(-1, 32):
        assert row.unique().numel() <= 2**bits


def test_rtn_is_exact_on_grid_values():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 64), generator=gen).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # each group spans the whole grid
    scale = 2.0 ** -torch.randint(4, 8, (8, 2, 1), generator=gen).float()
    offset = torch.randint(-64, 0, (8, 2, 1), generator=gen).float() / 128
    w = (q.view(8, 2, 32) * scale + offset).view(8, 64)
    assert torch.equal(rtn_fake_quantize(w, 4, 32, symmetric=False), w)
    sym = ((q.view(8, 2, 32) - 8) * scale).view(8, 64)  # extreme is -8 * scale, as in Q4_0
    assert torch.equal(rtn_fake_quantize(sym, 4, 32, symmetric=True), sym)


def test_rtn_refuses_bad_settings():
    w = torch.randn(4, 96)
    with pytest.raises(InputError, match="group size 64 does not divide the weight width 96"):
        rtn_fake_quantize(w, 4, 64, False)
    with pytest.raises(InputError, match="bits must be an integer from 2 to 8"):
        rtn_fake_quantize(w, 9, 32, False)
    with pytest.raises(InputError, match="bits"):
        rtn_fake_quantize(w, 1, 32, True)


def test_rtn_model_touches_only_the_linears():
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    names = rtn_quantize_model_(model, 4, 32, symmetric=False)
    assert len(names) == 2 * 7
    for name, p in ref.named_parameters():
        changed = not torch.equal(p, dict(model.named_parameters())[name])
        assert changed == (name.split(".")[-2] in LINEARS), name
    with pytest.raises(InputError, match="does not divide"):
        rtn_quantize_model_(copy.deepcopy(ref), 4, 48, symmetric=False)


# --------------------------------------------------------------------------- slow: the real reference


@pytest.fixture(scope="module")
def real(tmp_path_factory, reference_dir, dataset_dir):
    """The reference, its off-grid twin (written by `quantloop prepare`) and 4 x 512 test tokens."""
    from quantloop.data.datasets import read_split
    from quantloop.eval.perplexity import make_chunks
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer
    from quantloop.paths import OFFGRID_MODEL_DIR

    out = OFFGRID_MODEL_DIR
    if not (out / "quantloop_model.json").is_file():
        pytest.skip("the off-grid twin is not prepared: run `quantloop prepare`")
    manifest = prepare_offgrid(reference_dir, out)  # reuses the prepared twin
    tok = load_hf_tokenizer(reference_dir)
    ids = tok(read_split(dataset_dir, "test"), add_special_tokens=False)["input_ids"]
    chunks = make_chunks(ids, 512, 4)
    assert len(chunks) == 4
    models = dict(ref=load_hf_model(reference_dir), twin=load_hf_model(out))
    ppl = {key: perplexity(model, chunks) for key, model in models.items()}
    return dict(manifest=manifest, dir=out, chunks=chunks, ppl=ppl, **models)


def perplexity(model, chunks):
    from quantloop.eval.perplexity import chunk_nll, summarize_nll

    nll = [chunk_nll(logits(model, torch.as_tensor(c)[None]).numpy(), c) for c in chunks]
    return summarize_nll(np.concatenate(nll))[0]


@pytest.mark.slow
def test_real_twin_computes_the_same_function(real):
    m = real["manifest"]
    assert m.name == "smollm2-135m-offgrid" and "seed 0" in m.reference_note and (real["dir"] / m.gguf_f16).is_file()
    ids = torch.as_tensor(real["chunks"][0])[None]
    a, b = logits(real["ref"], ids), logits(real["twin"], ids)
    diff = float((a - b).abs().max())
    print(f"\nmax |dlogit| on 512 tokens: {diff:.3g} (max |logit| {float(a.abs().max()):.3g}); manifest: {m.reference_note}")
    assert diff <= LOGIT_RTOL * float(a.abs().max())
    ppl_ref, ppl_twin = real["ppl"]["ref"], real["ppl"]["twin"]
    print(f"perplexity 4 x 512: reference {ppl_ref:.4f}, off-grid {ppl_twin:.4f} (relative change {ppl_twin / ppl_ref - 1:+.2e})")
    assert abs(ppl_twin / ppl_ref - 1) < 0.001
    w_ref = real["ref"].model.layers[0].mlp.down_proj.weight
    w_twin = real["twin"].model.layers[0].mlp.down_proj.weight
    assert (w_ref - w_twin).abs().max() > 1e-3


@pytest.mark.slow
def test_rtn4_g32_recovers_the_reference_grid_but_not_the_twins(real):
    """The grid artifact: 4-bit group-32 asymmetric RTN is near-lossless on the Q4_1-dequantized reference only."""
    chunks = real["chunks"]
    change = {}
    for key in ("ref", "twin"):
        base = real["ppl"][key]
        q = copy.deepcopy(real[key])
        rtn_quantize_model_(q, 4, 32, symmetric=False)
        ppl = perplexity(q, chunks)
        del q
        change[key] = ppl / base - 1
        print(f"\nRTN-4 g32 asym, {key}: ppl {base:.4f} -> {ppl:.4f} (relative change {change[key]:+.2e})")
    assert abs(change["ref"]) < 0.002
    assert change["twin"] > 0.03
