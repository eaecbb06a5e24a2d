"""A size budget: the least sensitive tensors go below their planned type until the whole file fits."""

from __future__ import annotations

import pytest

from quantloop.search.budget import downgrades
from quantloop.search.schemas import SensitivityRow


def row(unit: str, typ: str, nbytes: int, kld: float) -> SensitivityRow:
    return SensitivityRow(unit=unit, tensors=[f"{unit}.weight"], layer=0, group="ffn_down", n_weights=1024, type=typ,
                          bytes=nbytes, kld=kld)


def test_downgrades_take_the_least_kld_per_byte_until_the_file_fits():
    types = {"a.weight": "Q4_0", "b.weight": "Q4_0", "c.weight": "Q4_0"}
    rows = [row("a", "Q4_0", 100, 0.010), row("a", "Q3_K", 80, 0.050),   # +0.040 for 20 bytes: 0.002 per byte
            row("b", "Q4_0", 100, 0.010), row("b", "Q3_K", 80, 0.014),   # +0.004 for 20 bytes: 0.0002 per byte
            row("c", "Q4_0", 100, 0.010), row("c", "Q3_K", 80, 0.020), row("c", "Q2_K", 60, 0.034)]  # 0.0005, then 0.0007 per byte
    out, taken = downgrades(dict(types), rows, budget=1000 - 30, size=1000)
    assert [(t.unit, t.to_type) for t in taken] == [("b", "Q3_K"), ("c", "Q3_K")]
    assert taken[0].from_type == "Q4_0" and taken[0].bytes_saved == 20 and taken[0].kld_added == pytest.approx(0.004)
    assert out == {"a.weight": "Q4_0", "b.weight": "Q3_K", "c.weight": "Q3_K"}
    out, taken = downgrades(dict(types), rows, budget=1000 - 60, size=1000)  # c goes on down to Q2_K before a moves
    assert out == {"a.weight": "Q4_0", "b.weight": "Q3_K", "c.weight": "Q2_K"} and len(taken) == 3
    out, taken = downgrades(dict(types), rows, budget=1000, size=1000)
    assert out == types and taken == []


def test_downgrades_stop_when_nothing_smaller_is_left():
    types = {"a.weight": "Q4_0"}
    out, taken = downgrades(dict(types), [row("a", "Q4_0", 100, 0.01), row("a", "Q3_K", 80, 0.02)], budget=10, size=1000)
    assert out == {"a.weight": "Q3_K"} and len(taken) == 1


@pytest.mark.parametrize("method, gguf_type", [("gguf", "Q4_0"), ("rtn", None), ("gptq", None)])
def test_a_budget_on_a_method_that_cannot_take_it_is_one_error(tiny_copy, tmp_path, method, gguf_type):
    from quantloop.errors import InputError
    from quantloop.schemas import quant_spec
    from quantloop.tools.quantize import quantize_model

    with pytest.raises(InputError, match="min_size_ratio applies to methods gptq and qat"):
        quantize_model(tiny_copy, tmp_path / "q", quant_spec(method=method, gguf_type=gguf_type, group_size=32, min_size_ratio=3.5))
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_a_budgeted_gptq_file_meets_the_budget_and_equals_the_estimate(reference_dir, dataset_dir, tmp_path):
    """Whole-file Q4_0 GPTQ on a 256-wide Llama under a budget it misses by a little: the least sensitive units go to
    Q3_K/Q2_K, the written file equals the estimate of its types to the byte and stays under the budget."""
    from conftest import prepare_wide_llama
    from gguf import GGUFReader

    from quantloop.gguf.precision_map import estimate_bytes
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.search.budget import file_bytes, planned_types
    from quantloop.tools.quantize import quantize_model

    model = prepare_wide_llama(tmp_path, reference_dir, layers=2)
    f16 = next(model.glob("*.gguf"))
    whole = {"embeddings": "Q4_0", "attention": "Q4_0", "feed_forward": "Q4_0"}
    spec = quant_spec(method="gptq", gguf_type="Q4_0", layer_types=whole,
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=64))
    pure = file_bytes(f16, planned_types(f16, spec))
    ratio = f16.stat().st_size / (pure - 40_000)  # about 40 kB under the pure 4.5-bit file
    r = quantize_model(model, tmp_path / "q", spec.model_copy(update={"min_size_ratio": ratio}))
    written = {t.name: t.tensor_type.name for t in GGUFReader(r.model_path).tensors}
    lower = sorted(n for n, t in written.items() if t in ("Q3_K", "Q2_K"))
    size = r.bytes_on_disk
    assert lower and size <= f16.stat().st_size / ratio
    assert size == estimate_bytes(f16, written)["bytes"]
    assert any("size budget" in n and lower[0].rsplit(".", 1)[0] in n for n in r.notes), r.notes


def prepare_down_wide_llama(root, tokenizer_dir):
    """A random Llama like SmolLM2 in miniature: 128-wide rows everywhere (no k-quant fits) except ffn_down, whose
    768-wide rows take Q3_K/Q2_K, and which holds over a quarter of the linear weights. Prepared like any checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantloop.models.checkpoints import prepare_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(root / "raw")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "raw")
    prepare_model(root / "raw", "down-wide", root / "checkpoints")
    return root / "checkpoints" / "down-wide"


def test_a_budget_that_leaves_one_plan_is_decided_before_any_measurement(reference_dir, tmp_path):
    """When every tensor that can go below 4 bits must go to its smallest type to fit, the plan is taken as it is
    (nothing is measured), a budget below even that file is one error before any work, and the agent skips the
    step up front when that forced file misses the size bar of the bit width it is judged at (its linear weights
    average under 4 bits: judged at 3, 4.67x)."""
    from types import SimpleNamespace

    from quantloop.agents.quantization import QuantizationAgent
    from quantloop.agents.state import PlannedAttempt
    from quantloop.errors import InputError
    from quantloop.models.checkpoints import resolve_model
    from quantloop.schemas import quant_spec
    from quantloop.search.budget import file_bytes, fit_to_budget, plan_without_measuring, planned_types
    from quantloop.search.tensors import model_tensors

    model = prepare_down_wide_llama(tmp_path, reference_dir)
    f16 = next(model.glob("*.gguf"))
    whole = {"embeddings": "Q4_0", "attention": "Q4_0", "feed_forward": "Q4_0"}
    spec = quant_spec(method="gptq", gguf_type="Q4_0", layer_types=whole)
    planned = planned_types(f16, spec)
    floor = dict(planned) | {t.name: "Q2_K" for t in model_tensors(f16, ("Q2_K", "Q4_0")).tensors if "Q2_K" in t.types}
    assert sorted(n for n in floor if floor[n] == "Q2_K") == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    floor_bytes = file_bytes(f16, floor)
    forced = spec.model_copy(update={"min_size_ratio": f16.stat().st_size / (floor_bytes + 1)})

    types, record = plan_without_measuring(f16, forced)
    assert types == floor and record.forced and record.bytes == floor_bytes
    assert all(d.forced and d.to_type == "Q2_K" for d in record.downgrades)
    new, record = fit_to_budget(resolve_model(model), forced)
    assert record.sensitivity_cache is None  # nothing measured
    assert {r: t for r, t in new.gguf_tensor_types.items() if "ffn_down" in r} == {
        r"^blk\.0\.ffn_down\.weight$": "Q2_K", r"^blk\.1\.ffn_down\.weight$": "Q2_K"}
    with pytest.raises(InputError, match="the smallest file these types allow"):
        plan_without_measuring(f16, spec.model_copy(update={"min_size_ratio": f16.stat().st_size / (floor_bytes - 1000)}))

    step = PlannedAttempt(index=0, step="int4", kind="quantize", spec=forced, checkpoint=str(model), output_dir=None)
    reason = QuantizationAgent.budget_precheck(step, SimpleNamespace(acceptance_spec=None))
    assert reason and "budget leaves one plan" in reason and "judged at 3 bits" in reason, reason
    roomy = step.model_copy(update={"spec": spec.model_copy(update={"min_size_ratio": 1.01})})  # the planned file fits
    assert QuantizationAgent.budget_precheck(roomy, SimpleNamespace(acceptance_spec=None)) is None
