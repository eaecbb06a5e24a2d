"""Sensitivity on the tiny prepared Llama: real forward passes, the cache, the heatmap; baselines from it."""

import json

import pytest

from quantloop.errors import InputError
from quantloop.search.schemas import SensitivityRequest, TextSpec


@pytest.fixture(scope="module")
def sens(tiny_prepared, dataset_dir, tmp_path_factory):
    from quantloop.tools.sensitivity import measure_sensitivity

    d = tmp_path_factory.mktemp("sens")
    req = SensitivityRequest(model=str(tiny_prepared), text=[TextSpec(dataset_dir=str(dataset_dir), split="calibration", chunks=1, seqlen=64)],
                             types=["Q4_0", "Q8_0"], granularity="tensor", cache_dir=str(d / "cache"), heatmap_png=str(d / "heat.png"))
    return req, measure_sensitivity(req)


def test_sensitivity_measures_every_tensor_and_type(sens, tiny_prepared):
    from quantloop.search.tensors import model_tensors
    from quantloop.models.checkpoints import resolve_model

    req, r = sens
    mt = model_tensors(resolve_model(tiny_prepared).gguf)
    assert {x.unit for x in r.rows} == set(mt.names())
    assert {x.type for x in r.rows} == {"Q4_0", "Q8_0"}
    assert r.measured == len(r.rows)
    by = {(x.unit, x.type): x.kld for x in r.rows}
    # 8 bits lose less than 4 bits for every tensor, and nothing is free
    for name in mt.names():
        assert 0 < by[name, "Q8_0"] < by[name, "Q4_0"], name
    png = open(r.heatmap_png, "rb").read(8)
    assert png.startswith(b"\x89PNG")


def test_sensitivity_cache_is_reused(sens):
    from quantloop.tools.sensitivity import measure_sensitivity

    req, first = sens
    again = measure_sensitivity(req.model_copy(update={"heatmap_png": None}))
    assert again.measured == 0 and again.key == first.key
    assert [x.kld for x in again.rows] == [x.kld for x in first.rows]
    cache = json.loads(open(first.cache_file).read())
    assert len(cache["kld"]) == len(first.rows)


def test_sensitivity_cache_key_changes_with_text(sens, dataset_dir):
    from quantloop.search.sensitivity import cache_key

    assert cache_key("w", "a", "tensor") != cache_key("w", "b", "tensor") != cache_key("w", "b", "group")


def test_greedy_and_ilp_fit_budget_and_ilp_is_no_worse(sens, tiny_prepared):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.allocate import check_budget, greedy, ilp, min_bytes, unit_options
    from quantloop.search.tensors import genome_bytes, model_tensors

    _, r = sens
    mt = model_tensors(resolve_model(tiny_prepared).gguf, ("Q4_0", "Q8_0", "F16"))
    lo = min_bytes(mt, unit_options(mt, r.rows))
    for frac in (0.2, 0.5, 0.8):
        budget = int(lo + frac * (genome_bytes(mt, {t.name: "Q8_0" for t in mt.tensors}) - lo))
        g, i = greedy(mt, r.rows, budget), ilp(mt, r.rows, budget)
        assert g.bytes <= budget and i.bytes <= budget
        assert i.bytes == genome_bytes(mt, i.genome)
        assert i.predicted_kld <= g.predicted_kld + 1e-12
    with pytest.raises(InputError, match="below the smallest possible file"):
        check_budget(mt, unit_options(mt, r.rows), lo - 1)


def test_group_units_cover_layers(tiny_prepared):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.sensitivity import units_of
    from quantloop.search.tensors import model_tensors

    mt = model_tensors(resolve_model(tiny_prepared).gguf)
    units = units_of(mt, "group")
    assert set(units) == {"token_embd.weight"} | {f"blk.{i}.{g}" for i in range(2) for g in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down")}
    assert sum(len(v) for v in units.values()) == len(mt.tensors)


def test_block_units_are_attention_and_feed_forward(tiny_prepared):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.sensitivity import units_of
    from quantloop.search.tensors import model_tensors

    units = units_of(model_tensors(resolve_model(tiny_prepared).gguf), "block")
    assert set(units) == {"token_embd.weight", "blk.0.attn", "blk.0.ffn", "blk.1.attn", "blk.1.ffn"}
    assert len(units["blk.0.attn"]) == 4 and len(units["blk.1.ffn"]) == 3


def test_sensitivity_on_the_models_own_generations_reads_no_dataset(tiny_prepared, tmp_path):
    """Data-free: the text is the model's own (cached) generations; the cache key differs from any dataset's."""
    from quantloop.tools.sensitivity import measure_sensitivity

    req = SensitivityRequest(model=str(tiny_prepared), text=[TextSpec(source="synthetic", chunks=1, seqlen=32)],
                             types=["Q4_0"], granularity="block", cache_dir=str(tmp_path))
    r = measure_sensitivity(req)
    assert r.measured == len(r.rows) > 0 and all(x.kld > 0 for x in r.rows)
    assert "synthetic:1x32" in json.loads(open(r.cache_file).read())["text"]
    with pytest.raises(ValueError, match="dataset_dir is required"):
        TextSpec(split="calibration")
