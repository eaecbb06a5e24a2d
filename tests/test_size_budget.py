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
    assert [(t["unit"], t["to"]) for t in taken] == [("b", "Q3_K"), ("c", "Q3_K")]
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
    from quantloop.schemas import QuantSpec
    from quantloop.tools.quantize import quantize_model

    spec = QuantSpec(method=method, gguf_type=gguf_type, group_size=32, min_size_ratio=3.5)
    with pytest.raises(InputError, match="min_size_ratio applies to methods gptq and qat"):
        quantize_model(tiny_copy, tmp_path / "q", spec)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_a_budgeted_gptq_file_meets_the_budget_and_equals_the_estimate(reference_dir, dataset_dir, tmp_path):
    """Whole-file Q4_0 GPTQ on a 256-wide Llama under a budget it misses by a little: the least sensitive units go to
    Q3_K/Q2_K, the written file equals the estimate of its types to the byte and stays under the budget."""
    from conftest import prepare_wide_llama
    from gguf import GGUFReader

    from quantloop.gguf.precision_map import estimate_bytes
    from quantloop.schemas import CalibrationSpec, QuantSpec
    from quantloop.search.budget import file_bytes, planned_types
    from quantloop.tools.quantize import quantize_model

    model = prepare_wide_llama(tmp_path, reference_dir, layers=2)
    f16 = next(model.glob("*.gguf"))
    whole = {"embeddings": "Q4_0", "attention": "Q4_0", "feed_forward": "Q4_0"}
    spec = QuantSpec(method="gptq", gguf_type="Q4_0", layer_types=whole,
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
