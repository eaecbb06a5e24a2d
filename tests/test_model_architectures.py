"""Every step on every architecture in the table: tiny random Llama, Qwen2, Qwen3, Gemma 3 and Phi-3 models built
here from transformers configs (with the SmolLM2 tokenizer) go through RTN and GPTQ on llama.cpp's grid, the exact
export, and llama.cpp, whose logits must match transformers' within the grid's error; bad input is one line."""

import copy
import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from model_arch_helpers import (ARCHS, VOCAB, build_tiny, check_quantized_run, hf_logits, llama_logits, text_ids, tiny_config,
                                tiny_models)
from quantloop.errors import InputError
from quantloop.gguf.architectures import ARCHITECTURES, STEPS, check_config, of_config
from quantloop.schemas import CalibrationSpec, quant_spec


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, reference_dir):
    return tiny_models(tmp_path_factory.mktemp("archs"), reference_dir)


# --------------------------------------------------------------------------- the table


def test_every_architecture_has_a_consistent_table_entry():
    from transformers import AutoModelForCausalLM

    from quantloop.gguf.tensor_names import gguf_tensor_name, linear_modules

    assert [a.hf_class for a in ARCHITECTURES] == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                                    "Gemma3ForCausalLM", "Phi3ForCausalLM"]
    for arch, a in zip(ARCHS, ARCHITECTURES):
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        assert of_config(model.config) is a and type(model).__name__ == a.hf_class
        names = [n for n, _ in linear_modules(model)]
        assert sorted(names) == sorted(f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers) for m in a.linears)
        assert {gguf_tensor_name(n).split(".")[2] for n in names} == {g for _, g in a.gguf_names}
        for norm in (a.attn_norm, a.mlp_norm):
            assert model.model.layers[0].get_submodule(norm).weight.shape == (64,)
        # every step runs on these five but AWQ (GPTQModel's) on Gemma 3 and Phi-3: test_library_architectures
        assert all(a.refusal(s) is None for s in STEPS if s != "awq"), a.steps_line()
    assert "attn_qkv" in gguf_tensor_name("model.layers.1.self_attn.qkv_proj")
    assert gguf_tensor_name("model.layers.1.mlp.gate_up_proj") == "blk.1.ffn_up.weight"


# --------------------------------------------------------------------------- every step, every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_file_matches_transformers(arch, prepared):
    ckpt = prepared(arch)
    ids = text_ids(ckpt)
    ref, f16 = hf_logits(ckpt, ids), llama_logits(ckpt / f"{ckpt.name}-f16.gguf", ids)
    assert ref.std() > 0.05
    assert np.abs(f16 - ref).max() < 0.02 * np.abs(ref).max(), arch  # same network on both runtimes


@pytest.mark.slow  # about a minute per architecture on 2 cores (three runtimes load the model)
@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_exports_exactly_and_runs_on_llama_cpp(arch, prepared, tmp_path):
    from quantloop.tools.quantize import quantize_model

    ckpt = prepared(arch)
    spec = quant_spec(method="rtn", bits=4, group_size=32, symmetric=True, gguf_type="Q4_0")
    check_quantized_run(arch, ckpt, quantize_model(ckpt, tmp_path / "rtn", spec))


@pytest.mark.slow  # about a minute per architecture on 2 cores (three runtimes load the model)
@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_on_the_grid_exports_exactly_and_runs_on_llama_cpp(arch, prepared, tmp_path, dataset_dir):
    from quantloop.tools.quantize import quantize_model

    ckpt = prepared(arch)
    spec = quant_spec(method="gptq", bits=4, group_size=32, symmetric=True, gguf_type="Q4_0", act_order=True,
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=64))
    result = quantize_model(ckpt, tmp_path / "gptq", spec)
    assert result.format == "gguf:Q4_0"
    check_quantized_run(arch, ckpt, result)


@pytest.mark.slow  # about a minute per architecture on 2 cores (three runtimes load the model)
@pytest.mark.parametrize("arch", ARCHS)
def test_qat_exports_exactly_and_runs_on_llama_cpp(arch, prepared, tmp_path):
    from quantloop.tools.quantize import quantize_model

    ckpt = prepared(arch)
    spec = quant_spec(method="qat", gguf_type="Q4_0", qat_steps=3, calibration=CalibrationSpec(source="synthetic", samples=6, seqlen=32))
    check_quantized_run(arch, ckpt, quantize_model(ckpt, tmp_path / "qat", spec))


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_types_run(arch, prepared, tmp_path):
    from quantloop.tools.quantize import quantize_model

    ckpt = prepared(arch)
    result = quantize_model(ckpt, tmp_path / "q8", quant_spec(method="gguf", gguf_type="Q8_0"))
    ids = text_ids(ckpt)
    ref, q8 = hf_logits(ckpt, ids), llama_logits(result.model_path, ids)
    assert np.abs(q8 - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_offgrid_twin_computes_the_same_function(arch, tmp_path, reference_dir):
    from transformers import AutoModelForCausalLM

    from quantloop.models.offgrid import offgrid_transform_

    ref = AutoModelForCausalLM.from_pretrained(build_tiny(arch, tmp_path / arch, reference_dir)).eval()
    twin = offgrid_transform_(copy.deepcopy(ref), seed=1)
    ids = torch.tensor([text_ids(tmp_path / arch)])
    with torch.no_grad():
        a, b = ref(ids).logits[0], twin(ids).logits[0]
    assert a.std() > 0.05 and (a - b).abs().max() <= 1e-4 * a.abs().max()
    a_params, moved = dict(ref.named_parameters()), 0
    for name, p in twin.named_parameters():
        moved += not torch.equal(p, a_params[name])
    # per layer: every linear, the two norms feeding them, and Qwen2's v bias
    per_layer = len(of_config(ref.config).linears) + 2 + (arch == "qwen2")
    assert moved == per_layer * ref.config.num_hidden_layers


def test_offgrid_twin_of_gemma3_runs_on_llama_cpp(prepared, tmp_path):
    from quantloop.models.offgrid import prepare_offgrid

    ckpt = prepared("gemma3")
    twin = tmp_path / "gemma3-offgrid"
    prepare_offgrid(ckpt, twin, seed=2)
    ids = text_ids(ckpt)
    ref, runtime = hf_logits(ckpt, ids), llama_logits(twin / "gemma3-offgrid-f16.gguf", ids)
    assert np.abs(runtime - ref).max() < 0.02 * np.abs(ref).max()  # the converter's 1 + w holds the scaled gains


# --------------------------------------------------------------------------- bad input


def test_an_architecture_nothing_supports_is_one_line(capsys, tmp_path, reference_dir):
    raw = build_tiny("llama", tmp_path / "raw", reference_dir)
    cfg = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(cfg | {"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    code, lines = run_cli(capsys, "prepare", "--model", raw, "--name", "foo")
    assert_one_line_error(code, lines, "FooForCausalLM", "supported by no step", "supported: LlamaForCausalLM, Qwen2ForCausalLM")
    code, lines = run_cli(capsys, "quantize", raw, "--method", "rtn", "--out", tmp_path / "q")
    assert_one_line_error(code, lines, "FooForCausalLM is not supported by rtn", "Gemma3ForCausalLM, Phi3ForCausalLM")
    assert not (tmp_path / "q").exists()


def test_a_gguf_llama_cpp_cannot_load_is_refused_by_prepare(capsys, tmp_path):
    from gguf import GGUFWriter

    g = tmp_path / "odd.gguf"
    w = GGUFWriter(str(g), "no-such-arch")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    code, lines = run_cli(capsys, "prepare", "--model", g, "--name", "odd")
    assert_one_line_error(code, lines, g, "llama.cpp cannot load GGUF architecture 'no-such-arch'")


def test_a_config_with_missing_fields_is_one_line(capsys, tmp_path, tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers"):
        cfg.pop(key)
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    code, lines = run_cli(capsys, "quantize", tiny_copy, "--method", "rtn", "--out", tmp_path / "q")
    assert_one_line_error(code, lines, "config lacks hidden_size, num_hidden_layers")
    assert not (tmp_path / "q").exists()
    (tiny_copy / "config.json").write_text(json.dumps({"vocab_size": 8}))
    with pytest.raises(InputError, match="names no architecture"):
        check_config(tiny_copy / "config.json", "gguf")


# --------------------------------------------------------------------------- big vocabularies


def test_scoring_from_the_scored_positions_matches_the_full_computation():
    """Validation asks the runtimes for the scored half of each chunk only and scores it with float32 exponentials
    (a 262,144-token vocabulary made the float64 log-softmax as slow as the model); the numbers stay those of the
    full float64 computation."""
    from quantloop.eval.kld import KLDAccumulator
    from quantloop.eval.perplexity import chunk_nll, first_scored, scored_nll

    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 4096, size=64)
    base = rng.normal(0, 3, (64, 4096)).astype(np.float32)
    quant = base + rng.normal(0, 0.05, base.shape).astype(np.float32)
    first = first_scored(64)
    full, fast = KLDAccumulator(), KLDAccumulator()
    full.add_chunk(base, quant, chunk)
    fast.add_scored(base[first:], quant[first:], chunk)
    a, b = full.report(), fast.report()
    assert a.tokens == b.tokens == 31 and a.kld_mean > 1e-3
    for field in ("kld_mean", "ln_ppl_ratio", "rms_delta_p", "same_top_rate", "ppl_base"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-4, abs=1e-9), field
    assert np.allclose(scored_nll(base[first:], chunk), chunk_nll(base, chunk), rtol=1e-5)


def test_llama_cpp_computes_logits_only_where_asked(prepared):
    from quantloop.eval.runtimes import LlamaCppRunner

    ckpt = prepared("gemma3")
    runner = LlamaCppRunner(ckpt / f"{ckpt.name}-f16.gguf", n_ctx=64)
    ids = text_ids(ckpt)[:40]
    try:
        everything, tail = runner.logits(ids), runner.logits(ids, start=25)
    finally:
        runner.close()
    assert tail.shape == (15, VOCAB) and np.array_equal(tail, everything[25:])


def test_sensitivity_probe_resumes_at_a_later_layer_with_that_layers_own_masks(prepared, dataset_dir):
    """Gemma 3 mixes sliding-window and global attention layers: resuming the forward at layer k must give the same
    KLD as the full forward (it would not if every layer got layer 0's mask and rotary table)."""
    from quantloop.search.schemas import TextSpec
    from quantloop.search.sensitivity import KLDProbe

    ckpt = prepared("gemma3")
    probe = KLDProbe(ckpt, [TextSpec(dataset_dir=str(dataset_dir), split="calibration", chunks=1, seqlen=64)], threads=1)
    start = len(probe.layers) - 2  # a sliding-window layer; the global one after it has another rotary table
    name = next(n for n in probe.params if n.startswith(f"model.layers.{start}.") and n.endswith("down_proj.weight"))
    w = probe.weight(name) * 0.5
    full, resumed = probe.kld({name: w}), probe.kld({name: w}, start_layer=start)
    assert full > 0 and abs(full - resumed) <= 1e-5 * full + 1e-9, (full, resumed)
