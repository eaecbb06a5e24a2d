"""The tools as LangChain tools, and the example agent (LangChain's create_agent with a scripted chat model)
making real tool calls on the tiny Llama."""

import json
from pathlib import Path

from gguf import GGUFReader
from langchain_core.messages import AIMessage, ToolMessage
from script_helpers import load_script
from spec_helpers import tiny_spec

from quantloop.schemas import CompareReport, QuantizationResult, ValidationReport
from quantloop.tools import as_langchain_tools
from quantloop.tools.catalog import TOOLS, EstimateReport


def load_example():
    return load_script("examples/langchain_agent.py")


def test_langchain_tools_use_the_tools_own_pydantic_models():
    tools = {t.name: t for t in as_langchain_tools()}
    assert list(tools) == [t.name for t in TOOLS]
    for entry in TOOLS:
        assert tools[entry.name].args_schema is entry.request
        assert tools[entry.name].tool_call_schema.model_json_schema()["properties"].keys() == entry.request.model_fields.keys()
    assert [t.name for t in as_langchain_tools(["estimate"])] == ["estimate"]


def test_bad_calls_come_back_as_error_messages_the_agent_can_read(tmp_path):
    tool = {t.name: t for t in as_langchain_tools()}
    msg = tool["validate_quantization"].invoke({"name": "validate_quantization", "type": "tool_call", "id": "1",
                                                "args": {"quantized": "q.gguf", "baseline": "b", "chunks": 0}})
    assert isinstance(msg, ToolMessage) and msg.status == "error"
    assert msg.content == "invalid arguments: chunks: Input should be greater than or equal to 1"
    msg = tool["estimate"].invoke({"name": "estimate", "type": "tool_call", "id": "2", "args": {"model": str(tmp_path / "none")}})
    assert msg.status == "error" and msg.content.startswith(f"estimate: {tmp_path / 'none'}: ") and "not found" in msg.content


def test_example_agent_quantizes_and_validates_the_tiny_model(tmp_path, tiny_prepared, dataset_dir):
    """What the tools the agent called returned and wrote: the file on disk, its size as estimated, the validation
    report as measured with the call's arguments, the comparison of both models' generations."""
    example = load_example()
    out = tmp_path / "tiny_q8_0"
    messages = example.run_agent(str(tiny_prepared), str(out), str(tiny_spec(tmp_path / "acceptance.yaml")), str(dataset_dir), chunks=1)
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    answers = [m for m in messages if isinstance(m, ToolMessage)]
    # every call the model made was answered once, by the tool it named
    assert [(m.tool_call_id, m.name) for m in answers] == [(c["id"], c["name"]) for c in calls]
    results = {m.tool_call_id: m for m in answers}

    estimate = results["call-estimate"].artifact
    q = results["call-quantize"].artifact
    assert results["call-quantize"].status == "success" and isinstance(q, QuantizationResult)
    assert QuantizationResult.model_validate_json(results["call-quantize"].content) == q  # what the model reads is the report
    gguf_file = Path(q.model_path)
    assert q.format == "gguf:Q8_0" and q.output_dir == str(out) and gguf_file.parent == out
    assert gguf_file.stat().st_size == q.bytes_on_disk
    weights = [t for t in GGUFReader(gguf_file).tensors if len(t.shape) > 1]
    assert weights and {t.tensor_type.name for t in weights} == {"Q8_0"}  # every matrix, the embedding included
    config = json.loads((out / "quantization_config.json").read_text())
    assert QuantizationResult.model_validate(config["quantloop"]) == q and config["source"] == str(tiny_prepared)
    assert isinstance(estimate, EstimateReport) and estimate.base_type == "Q8_0"
    assert estimate.bytes == q.bytes_on_disk  # the estimate is the written file's size, to the byte

    bad = results["call-validate-invalid"]  # pydantic's message, before any measurement
    assert bad.status == "error" and bad.content == "invalid arguments: chunks: Input should be greater than or equal to 1"

    v = results["call-validate"].artifact
    assert results["call-validate"].status == "success" and isinstance(v, ValidationReport)
    assert ValidationReport.model_validate_json(results["call-validate"].content) == v
    assert (v.runtime, v.baseline.format, v.quantized.format, v.quantized.path) == ("llama.cpp", "gguf:F16", "gguf:Q8_0", q.model_path)
    assert v.nominal_bits == 8 and v.acceptance.max_ppl_increase_pct == 2.0  # read from the file type; the call's spec file
    assert v.dataset.endswith(", 1 x 64 tokens") and v.kld.tokens == 31  # the call's chunks=1, of 64 tokens (31 scored)
    assert 0 <= v.kld.kld_mean < 0.05 and abs(v.kld.ppl_increase_pct) < 2
    assert v.speed_baseline is None and v.speed_quantized is None and v.speedup_tg is None  # measure_speed=False
    assert v.size_quantized.bytes_on_disk == q.bytes_on_disk and v.size_quantized.n_weights == estimate.n_weights
    assert v.size_baseline.path == str(tiny_prepared / "tiny-f16.gguf")  # the bar's denominator: the F16 file
    assert v.size_ratio == v.size_baseline.bytes_on_disk / q.bytes_on_disk and 1 < v.size_ratio < 16 / 8.5  # the header does not shrink
    criteria = {c.name: c for c in v.criteria}
    assert set(criteria) == {"perplexity", "speed", "size"}  # the spec does not require generation checks
    assert criteria["perplexity"].passed and criteria["size"].passed and criteria["size"].measured == v.size_ratio
    assert not criteria["speed"].passed and criteria["speed"].detail == "not measured"  # so the report does not pass
    assert v.passed is False
    assert v.report_path == str(out / "validation_report.json")
    assert ValidationReport.model_validate_json((out / "validation_report.json").read_text()) == v
    written = {gguf_file.name, "quantization_config.json", "llama-quantize.log", "validation_report.json"}
    assert {p.name for p in out.iterdir()} == written  # and nothing half-written left beside them

    c = results["call-compare"].artifact
    assert results["call-compare"].status == "success" and isinstance(c, CompareReport)
    assert (c.model_a.format, c.model_b.format, c.model_b.path) == ("gguf:F16", "gguf:Q8_0", q.model_path)
    assert [r.prompt for r in c.rows] == ["Hello there"]  # the spec file's prompts
    assert all(r.output_a and r.output_b and r.identical == (r.output_a == r.output_b) for r in c.rows)
    assert c.identical_rate == sum(r.identical for r in c.rows) / len(c.rows)
    header, _, *rows = c.markdown.splitlines()
    assert f"`{c.model_a.path}`" in header and f"`{q.model_path}`" in header and len(rows) == len(c.rows)
    assert "<- validate_quantization [error] invalid arguments: chunks: Input should be greater" in example.trace(messages)
