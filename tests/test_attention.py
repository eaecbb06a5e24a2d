"""Attention on measurement: related checkpoints' sensitivities as priors, the units measured in order of importance
x uncertainty, and an allocation equal to the fully measured one."""

from __future__ import annotations

import pytest

from quantloop.search.attention import margin, open_units, order_by_attention
from quantloop.search.schemas import SensitivityRow


def row(unit: str, typ: str, nbytes: int, kld: float) -> SensitivityRow:
    return SensitivityRow(unit=unit, tensors=[f"{unit}.weight"], layer=0, group="ffn_down", n_weights=1024, type=typ,
                          bytes=nbytes, kld=kld)


def test_the_measure_first_order_follows_importance_times_uncertainty():
    """Four units with priors, one downgrade each of 100 bytes; the allocation's margin c* is 1e-4 per byte.
    near:  cost at the margin, sigma 50 %        -> importance 1.00, uncertainty 0.50 -> 0.50 (first)
    far:   cost 10x the margin, sigma 80 %       -> importance 0.30, uncertainty 0.80 -> 0.24
    sure:  cost at the margin, sigma 10 %        -> importance 1.00, uncertainty 0.10 -> 0.10
    done:  measured (no sigma)                   -> not in the order"""
    units, sigmas = {}, {}
    for name, cost, rel in (("far", 1e-3, 0.8), ("sure", 1e-4, 0.1), ("near", 1e-4, 0.5), ("done", 1e-4, 0.0)):
        added = cost * 100
        units[name] = {"Q4_0": row(name, "Q4_0", 500, 0.01), "Q3_K": row(name, "Q3_K", 400, 0.01 + added)}
        sigmas[name] = {"Q3_K": rel * added, "Q4_0": 0.0}
    planned = {u: "Q4_0" for u in units}
    order = order_by_attention(units, sigmas, planned, c_star=1e-4)
    assert [a.unit for a in order] == ["near", "far", "sure"]
    assert [round(a.importance, 2) for a in order] == [1.0, 0.3, 1.0]
    assert [round(a.uncertainty, 2) for a in order] == [0.5, 0.8, 0.1]
    # far's decision cannot flip within 2 sigma (its cost is 9e-4 from the margin, sigma 8e-4 ... 2 sigma = 1.6e-3: it can)
    assert [a.unit for a in open_units(order, 1e-4)] == ["near", "far", "sure"]
    sigmas["far"]["Q3_K"] = 0.2 * 1e-3 * 100  # a surer prior: 2 sigma = 4e-4 < 9e-4 from the margin, settled
    assert [a.unit for a in open_units(order_by_attention(units, sigmas, planned, 1e-4), 1e-4)] == ["near", "sure"]


def test_the_margin_lies_between_the_dearest_step_taken_and_the_cheapest_left():
    assert margin([1e-5, 4e-5], [1e-4, 3e-4]) == pytest.approx(2e-5 ** 0 * (4e-5 * 1e-4) ** 0.5)
    assert margin([], [2e-4]) == 2e-4 and margin([3e-5], []) == 3e-5 and margin([], []) is None


@pytest.mark.slow
def test_the_allocation_with_priors_from_an_identical_twin_equals_the_full_one(reference_dir, dataset_dir, tmp_path, monkeypatch):
    """A 256-wide Llama and its twin (the same weights but for one final-norm value moved by 1e-6: another digest):
    the twin's sensitivities are stored, then the model's size budget is fitted with them as priors and without
    memory. Same types for every tensor, fewer units measured, the rest marked as priors."""
    import shutil

    from conftest import prepare_wide_llama
    from safetensors.torch import load_file, save_file

    import quantloop.search.sensitivity as sensitivity
    from quantloop.knowledge import KnowledgeStore
    from quantloop.models.checkpoints import resolve_model
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.search.budget import file_bytes, fit_to_budget, planned_types

    model = prepare_wide_llama(tmp_path / "a", reference_dir, layers=2)
    twin = tmp_path / "twin"
    shutil.copytree(model, twin)
    weights = next(twin.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.norm.weight"][0] += 1e-6
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = twin / "quantloop_model.json"
    manifest.write_text(manifest.read_text().replace('"name": "wide"', '"name": "wide-twin"'))

    f16 = next(model.glob("*.gguf"))
    whole = {"embeddings": "Q4_0", "attention": "Q4_0", "feed_forward": "Q4_0"}
    spec = quant_spec(method="gptq", gguf_type="Q4_0", layer_types=whole,
                      calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=64))
    pure = file_bytes(f16, planned_types(f16, spec))
    spec = spec.model_copy(update={"min_size_ratio": f16.stat().st_size / (pure - 120_000)})

    store = KnowledgeStore.open(tmp_path / "k.metta")
    monkeypatch.setattr(sensitivity, "CACHE_DIR", tmp_path / "cache-twin")
    _, twin_record = fit_to_budget(resolve_model(twin), spec, memory=store)
    assert twin_record.prior_units == [] and len(store.facts("Measurement")) == 3 * twin_record.units

    monkeypatch.setattr(sensitivity, "CACHE_DIR", tmp_path / "cache-prior")
    with_priors, record = fit_to_budget(resolve_model(model), spec, memory=KnowledgeStore.open(tmp_path / "k.metta"))
    full, full_record = fit_to_budget(resolve_model(model), spec)  # every unit measured (those measured above from the cache)
    assert with_priors.gguf_tensor_types == full.gguf_tensor_types
    assert full_record.prior_units == [] and len(full_record.measured_units) == full_record.units
    assert record.prior_units and len(record.measured_units) < record.units, record
    assert set(record.prior_units) | set(record.measured_units) == set(full_record.measured_units)
    assert record.prior_sources == ["wide-twin"]


def test_priors_learn_the_ratio_and_spread_of_what_is_measured():
    from quantloop.knowledge import Prior
    from quantloop.search.attention import MIN_PAIRS, AttentionLog, calibration, recalibrate

    assert calibration([(1.3, 1.0)] * (MIN_PAIRS - 1)) is None  # too few pairs: the store's assumed spread stays
    ratio, rel = calibration([(1.3 * k, k) for k in (1, 2, 3, 4, 5, 6)])
    assert ratio == pytest.approx(1.3) and rel == pytest.approx(0.05 * (1 + 1 / 6) ** 0.5)  # no spread: the floor
    ratio, rel = calibration([(2.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (1.0, 1.0)])
    assert ratio == pytest.approx(1.0) and rel > 0.3  # unit by unit differences: a wide sigma

    rows, sigmas, base = {}, {}, {}
    for i in range(4):
        u = f"u{i}"
        rows[u] = {"Q2_K": row(u, "Q2_K", 100, 0.026 if i < 3 else 0.02).model_copy(update={"source": "measured" if i < 3 else "prior"}),
                   "Q3_K": row(u, "Q3_K", 200, 0.013 if i < 3 else 0.01).model_copy(update={"source": "measured" if i < 3 else "prior"})}
        base[(u, "Q2_K")], base[(u, "Q3_K")] = Prior(kld=0.02, sigma=0.005, sources=["x"]), Prior(kld=0.01, sigma=0.0025, sources=["x"])
        if i == 3:
            sigmas[u] = {"Q2_K": 0.005, "Q3_K": 0.0025}
    log = AttentionLog()
    recalibrate(rows, sigmas, base, log)
    assert log.ratio == pytest.approx(1.3) and rows["u3"]["Q2_K"].kld == pytest.approx(0.026)
    assert sigmas["u3"]["Q2_K"] == pytest.approx(0.026 * log.spread) and rows["u3"]["Q2_K"].source == "prior"
