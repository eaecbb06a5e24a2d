"""Precision maps: the exact size estimate equals the file quantize_model writes; maps round-trip through YAML;
a map naming a tensor the model lacks is one line, exit code 2."""

import json

import pytest
import yaml

from quantloop.errors import InputError


def _mt(tiny_prepared, types=None):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.tensors import model_tensors

    return model_tensors(resolve_model(tiny_prepared).gguf, types)


@pytest.mark.parametrize("cycle", [["Q4_0", "Q5_1", "Q8_0", "F16", "Q4_1", "Q5_0"], ["F16", "Q4_0", "Q5_0"]])
def test_map_written_file_matches_estimate_and_types(tiny_prepared, tmp_path, cycle):
    from quantloop.gguf.llamacpp import read_metadata
    from quantloop.schemas import quant_spec
    from quantloop.search.precision_maps import read_map, write_map
    from quantloop.search.tensors import genome_bytes
    from quantloop.tools.quantize import quantize_model

    mt = _mt(tiny_prepared)
    genome = {t.name: cycle[i % len(cycle)] for i, t in enumerate(mt.tensors)}
    j, y = write_map(genome, tmp_path / "map", {"note": "test"})
    fields, back = read_map(y, mt)
    assert back == genome and json.loads(j.read_text())["gguf_tensor_types"] == yaml.safe_load(y.read_text())["gguf_tensor_types"]
    q = quantize_model(tiny_prepared, tmp_path / "out", quant_spec(**fields))
    written = {t.name: t.type for t in read_metadata(q.model_path).tensors}
    assert all(written[n] == t for n, t in genome.items())
    assert (tmp_path / "out").exists() and q.bytes_on_disk == genome_bytes(mt, genome)


def test_map_with_unknown_tensor_is_refused(tiny_prepared, tmp_path):
    from quantloop.search.precision_maps import read_map, write_map

    mt = _mt(tiny_prepared)
    genome = {t.name: "Q8_0" for t in mt.tensors} | {"blk.99.attn_q.weight": "Q4_0"}
    _, y = write_map(genome, tmp_path / "bad")
    with pytest.raises(InputError, match="blk.99.attn_q.weight.*does not have"):
        read_map(y, mt)


def test_kquant_only_where_rows_allow(tiny_prepared):
    from quantloop.search.tensors import storable_types

    assert "Q4_K" not in storable_types(576) and "Q5_0" in storable_types(576)
    assert "Q4_K" in storable_types(1536) and "F16" in storable_types(1536)
    assert storable_types(100) == ("F16",)


def test_estimated_fields_named_and_targets_checked():
    from quantloop.search.hardware import TARGETS, check_target, estimated_fields

    f = estimated_fields("arm-dotprod", 100_000_000, 134_000_000)
    assert f and all(k.startswith("estimated_") for k in f)
    assert estimated_fields("cpu", 1, 1) == {}
    # a smaller file is estimated faster on a memory-bound target
    assert estimated_fields("apple-ane", 50_000_000, 134_000_000)["estimated_tg_tokens_per_s"] > \
        estimated_fields("apple-ane", 100_000_000, 134_000_000)["estimated_tg_tokens_per_s"]
    with pytest.raises(InputError) as e:
        check_target("tpu-v9")
    assert all(t in str(e.value) for t in ["cpu", *TARGETS])
