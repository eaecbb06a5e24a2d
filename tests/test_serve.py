"""The MCP server (quantloop/serve) with the SDK's own client, in memory: the tool list and its schemas, real
calls on the tiny Llama, progress notifications, and every kind of bad call answered as a tool error."""

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from quantloop.schemas import QuantizationResult, ValidationReport, ValidationRequest
from quantloop.serve.mcp_server import build_server
from quantloop.tools.catalog import TOOLS, QuantizeRequest
from serve_helpers import make_root


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_prepared, dataset_dir) -> Path:
    return make_root(tmp_path_factory.mktemp("served"), tiny_prepared, dataset_dir)


def call(server, name: str, arguments: dict, progress: list | None = None):
    async def go():
        async def on_progress(p, total, message):
            progress.append((p, total, message))

        async with Client(server) as client:
            return await client.call_tool(name, arguments, progress_callback=on_progress if progress is not None else None)

    return anyio.run(go)


def error_text(result) -> str:
    assert result.is_error, result
    return result.content[0].text


def test_every_tool_is_listed_with_its_pydantic_schemas(tmp_path):
    async def go():
        async with Client(build_server(tmp_path)) as client:
            return (await client.list_tools()).tools

    tools = {t.name: t for t in anyio.run(go)}
    assert list(tools) == [t.name for t in TOOLS]
    assert tools["validate_quantization"].input_schema == ValidationRequest.model_json_schema()
    assert tools["quantize_model"].input_schema == QuantizeRequest.model_json_schema()
    assert tools["quantize_model"].input_schema["required"] == ["checkpoint", "spec"]
    assert set(tools["validate_quantization"].output_schema["properties"]) == set(ValidationReport.model_fields)
    assert tools["estimate"].annotations.read_only_hint and not tools["quantize_model"].annotations.read_only_hint


@pytest.mark.parametrize("name, arguments, expected", [
    ("validate_quantization", {"quantized": "q.gguf", "baseline": "b", "chunks": 0}, "chunks: Input should be greater than or equal to 1"),
    ("validate_quantization", {"quantized": "q.gguf"}, "baseline: Field required"),
    ("validate_quantization", {"quantized": "q.gguf", "baseline": "b", "bogus": 1}, "bogus: Extra inputs are not permitted"),
    ("quantize_model", {"checkpoint": "m", "spec": {"method": "magic"}}, "spec.method: Input should be"),
    ("quantize_model", {"checkpoint": "m", "spec": {"method": "gguf", "bits": 99}}, "spec.bits: Input should be less than or equal to 8"),
])
def test_invalid_arguments_come_back_as_the_pydantic_message(tmp_path, name, arguments, expected):
    server = build_server(tmp_path)
    text = error_text(call(server, name, arguments))
    assert text.startswith(f"{name}: invalid arguments: ") and expected in text
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert not call(server, "estimate", {"model": "missing"}).content[0].text.startswith("Traceback")  # the server still answers


def test_unknown_tool_and_missing_files_are_tool_errors(tmp_path):
    server = build_server(tmp_path)
    assert "unknown tool 'nope'" in error_text(call(server, "nope", {}))
    text = error_text(call(server, "estimate", {"model": "models/none"}))
    assert text.startswith("estimate: ") and str(tmp_path / "models" / "none") in text and "not found" in text


def test_paths_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "models" / "escape").symlink_to(outside)
    server = build_server(root)
    for arguments, field in [
        ({"quantized": "/etc/passwd", "baseline": "models/x"}, "quantized"),
        ({"quantized": "models/x.gguf", "baseline": "../outside"}, "baseline"),
        ({"quantized": "models/escape/q.gguf", "baseline": "models/x"}, "quantized"),  # a symbolic link out of the root
        ({"quantized": "models/x.gguf", "baseline": "models/x", "report_path": str(outside / "r.json")}, "report_path"),
    ]:
        text = error_text(call(server, "validate_quantization", arguments))
        assert f"{field} lies outside the server's data folder {root.resolve()}" in text
    text = error_text(call(server, "quantize_model", {"checkpoint": "models/x", "output_dir": str(outside / "q"),
                                                      "spec": {"method": "gguf", "gguf_type": "Q8_0"}}))
    assert "output_dir lies outside" in text
    assert list(outside.iterdir()) == []


def test_sensitivity_and_search_paths_in_lists_are_confined_too(tmp_path):
    """Paths inside lists of objects (text[].dataset_dir) and lists of paths (seed_maps) are checked one by one."""
    root = tmp_path / "root"
    root.mkdir()
    server = build_server(root)
    inside = {"dataset_dir": "datasets/shakespeare"}
    text = error_text(call(server, "sensitivity", {"model": "models/x", "text": [inside, {"dataset_dir": "/etc"}]}))
    assert "text[].dataset_dir lies outside the server's data folder" in text
    search = {"model": "models/x", "text": [inside], "sensitivity_text": [inside], "out_dir": "search"}
    for extra, field in [({"seed_maps": ["maps/a.yaml", "/tmp/b.yaml"]}, "seed_maps[]"),
                         ({"test_text": [inside, {"dataset_dir": "../x"}]}, "test_text[].dataset_dir"),
                         ({"out_dir": "/tmp/search"}, "out_dir"),
                         ({"storage": "/tmp/journal.log"}, "storage"),
                         ({"tracking_uri": "sqlite:////tmp/mlflow.db"}, "tracking_uri")]:
        assert f"{field} lies outside the server's data folder" in error_text(call(server, "search", search | extra))
    assert list(root.iterdir()) == []


def test_quantize_and_validate_with_progress(root):
    server = build_server(root)
    progress: list = []
    q = call(server, "quantize_model", {"checkpoint": "models/checkpoints/tiny", "output_dir": "models/quantized/tiny_q8_0",
                                        "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}, progress)
    assert not q.is_error, q.content[0].text
    result = QuantizationResult.model_validate(q.structured_content)
    assert Path(result.model_path).is_file() and Path(result.model_path).is_relative_to(root.resolve())
    assert result.format == "gguf:Q8_0" and json.loads(q.content[0].text) == q.structured_content
    assert progress[0] == (0, None, "quantize_model: started")
    assert progress[-1][0] == progress[-1][1] and progress[-1][2].startswith("quantize_model: done in")
    assert [p[0] for p in progress] == sorted({p[0] for p in progress})  # strictly increasing

    progress.clear()
    v = call(server, "validate_quantization", {"quantized": "models/quantized/tiny_q8_0", "baseline": "models/checkpoints/tiny",
                                               "spec_file": "acceptance.yaml", "chunks": 1, "measure_speed": False}, progress)
    assert not v.is_error, v.content[0].text
    report = ValidationReport.model_validate(v.structured_content)
    assert report.runtime == "llama.cpp" and report.quantized.format == "gguf:Q8_0"
    assert 0 <= report.kld.kld_mean < 0.05 and abs(report.kld.ppl_increase_pct) < 2
    written = root / "models" / "quantized" / "tiny_q8_0" / "validation_report.json"
    assert json.loads(written.read_text())["kld"] == v.structured_content["kld"]
    assert progress[0][2] == "validate_quantization: started" and progress[-1][2].startswith("validate_quantization: done")


def test_a_second_call_writing_the_same_output_is_refused_while_the_first_runs(root):
    server = build_server(root)
    arguments = {"checkpoint": "models/checkpoints/tiny", "output_dir": "models/quantized/tiny_busy", "overwrite": True,
                 "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}
    second = {}

    async def go():
        async with Client(server) as client:
            async def on_progress(p, total, message):
                if p == 0:  # the first call holds its output now and has not started the quantizer
                    second["inside"] = await client.call_tool("quantize_model", {**arguments, "output_dir": "models/quantized/tiny_busy/sub"})
                    second["same"] = await client.call_tool("quantize_model", arguments)

            first = await client.call_tool("quantize_model", arguments, progress_callback=on_progress)
            again = await client.call_tool("quantize_model", arguments)  # the first has finished: allowed again
            return first, again

    first, again = anyio.run(go)
    assert not first.is_error and not again.is_error
    for r in (second["same"], second["inside"]):
        assert "is being written by a running quantize_model call" in error_text(r)
    assert (root / "models" / "quantized" / "tiny_busy").is_dir()
    assert not (root / "models" / "quantized" / "tiny_busy" / "sub").exists()


def test_every_path_field_of_the_catalog_names_a_string_field_of_its_request():
    """A misspelt path field would leave that path unchecked: each dotted name must lead to str fields."""
    import types
    import typing

    def leaf_types(model, parts):
        field = model.model_fields[parts[0].removesuffix("[]")]
        ann = field.annotation
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(ann) if a is not type(None)] if union else [ann]
        if parts[0].endswith("[]"):
            args = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
        if len(parts) == 1:
            return args
        return [t for a in args for t in leaf_types(a, parts[1:])]

    for entry in TOOLS:
        for field in entry.path_fields:
            assert set(leaf_types(entry.request, field.split("."))) == {str}, (entry.name, field)  # every spec model's
