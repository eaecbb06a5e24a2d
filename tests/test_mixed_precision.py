"""Mixed precision for GGUF (quantloop.gguf.precision_map): presets, planned types, `quantloop estimate` against the written file."""

import pytest

from quantloop.errors import InputError
from quantloop.gguf.llamacpp import read_metadata
from quantloop.gguf.precision_map import (
    PRESETS,
    estimate_bytes,
    layer_type_of,
    planned_types,
    precision_map,
    tensor_rules,
)
from quantloop.pipelines.cli import main
from quantloop.schemas import quant_spec
from quantloop.tools.quantize import quantize_model


def test_default_preset_is_the_architecture_aware_map():
    assert PRESETS["arch-default"] == {"embeddings": "Q8_0", "attention": "Q4_K", "feed_forward": "Q6_K", "norms": "F32"}
    assert precision_map("arch-default", {"attention": "q5_k"})["attention"] == "Q5_K"
    assert layer_type_of("blk.3.attn_v.weight") == "attention" and layer_type_of("blk.0.ffn_down.weight") == "feed_forward"
    assert layer_type_of("blk.0.attn_norm.weight") == "norms" and layer_type_of("token_embd.weight") == "embeddings"


@pytest.mark.parametrize("preset, layers, problem", [
    ("nope", {}, "unknown precision preset"),
    (None, {"mlp": "Q4_0"}, "unknown layer type 'mlp'"),
    (None, {"attention": "Q3_X"}, "unknown GGUF type"),
    (None, {"norms": "Q8_0"}, "norms must stay F32"),
])
def test_bad_precision_maps_are_refused(preset, layers, problem):
    with pytest.raises(InputError, match=problem):
        precision_map(preset, layers)


def test_layer_type_the_model_lacks_is_refused(tiny_prepared):
    gguf = next(tiny_prepared.glob("*.gguf"))  # tied embeddings: no output.weight
    pmap = precision_map(None, {"output": "Q8_0"})
    with pytest.raises(InputError, match="layer type 'output', which this model does not have"):
        planned_types(gguf, "Q8_0", tensor_rules(pmap), pmap)
    assert main(["estimate", str(tiny_prepared), "--layer-type", "output=Q8_0"]) == 2


def test_estimate_matches_the_file_llama_quantize_writes(tiny_prepared, tmp_path, capsys):
    """Every tensor gets the planned type (after llama.cpp's width fallback) and the file has the estimated bytes."""
    gguf = next(tiny_prepared.glob("*.gguf"))
    pmap = precision_map("arch-default", {"feed_forward": "Q5_1"})
    rules = tensor_rules(pmap, {r"blk\.1\.attn_v": "Q8_0"})
    planned = planned_types(gguf, "Q8_0", rules, pmap)
    est = estimate_bytes(gguf, planned)
    # the tiny model is 64 wide: Q4_K's 256-blocks do not fit, llama.cpp falls back to Q5_0
    assert planned["blk.0.attn_q.weight"] == "Q5_0" and planned["blk.1.attn_v.weight"] == "Q8_0"
    assert planned["blk.0.ffn_up.weight"] == "Q5_1" and planned["token_embd.weight"] == "Q8_0"
    assert planned["blk.0.attn_norm.weight"] == "F32"

    r = quantize_model(tiny_prepared, tmp_path / "q", quant_spec(method="gguf", preset="arch-default", layer_types={"feed_forward": "Q5_1"},
                                                               gguf_tensor_types={r"blk\.1\.attn_v": "Q8_0"}))
    written = {t.name: t.type for t in read_metadata(r.model_path).tensors}
    assert written == planned
    assert abs(r.bytes_on_disk - est["bytes"]) <= 0.01 * r.bytes_on_disk
    assert r.bytes_on_disk == est["bytes"]  # measured: exact
    assert r.format == "gguf:mixed-arch-default" and r.bits_per_weight == pytest.approx(est["bits_per_weight"])

    assert main(["estimate", str(tiny_prepared), "--preset", "arch-default", "--layer-type", "feed_forward=Q5_1",
                 "--tensor-type", r"blk\.1\.attn_v=Q8_0"]) == 0
    assert f"file: {est['bytes']:,} bytes" in capsys.readouterr().out
