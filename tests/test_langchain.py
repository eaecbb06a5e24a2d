"""The tools as LangChain tools, and the example agent (LangChain's create_agent with a scripted chat model)
making real tool calls on the tiny Llama."""

import importlib.util
import json
from pathlib import Path

from langchain_core.messages import AIMessage, ToolMessage
from test_serve import tiny_spec  # noqa: E402  (tests/ is on sys.path, as for cli_helpers)

from quantloop.schemas import CompareReport, QuantizationResult, ValidationReport
from quantloop.tools import as_langchain_tools
from quantloop.tools.catalog import TOOLS, EstimateReport

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("langchain_agent", ROOT / "examples" / "langchain_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    example = load_example()
    out = tmp_path / "tiny_q8_0"
    messages = example.run_agent(str(tiny_prepared), str(out), str(tiny_spec(tmp_path / "acceptance.yaml")), str(dataset_dir), chunks=1)
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    assert list(results) == ["call-estimate", "call-quantize", "call-validate-invalid", "call-validate", "call-compare"]
    assert all(results[k].status == "success" for k in results if k != "call-validate-invalid")

    estimate = results["call-estimate"].artifact
    assert isinstance(estimate, EstimateReport) and estimate.base_type == "Q8_0" and estimate.bytes > 0
    q = results["call-quantize"].artifact
    assert isinstance(q, QuantizationResult) and q.format == "gguf:Q8_0"
    assert Path(q.model_path).is_file() and Path(q.model_path).stat().st_size == q.bytes_on_disk
    assert json.loads(results["call-quantize"].content)["model_path"] == q.model_path
    assert estimate.bytes == q.bytes_on_disk  # the estimate is the written file's size, to the byte

    bad = results["call-validate-invalid"]
    assert bad.status == "error" and "chunks: Input should be greater than or equal to 1" in bad.content

    v = results["call-validate"].artifact
    assert isinstance(v, ValidationReport) and v.quantized.path == q.model_path and v.kld.tokens > 0
    assert 0 <= v.kld.kld_mean < 0.05 and abs(v.kld.ppl_increase_pct) < 2
    assert json.loads((out / "validation_report.json").read_text())["kld"]["kld_mean"] == v.kld.kld_mean

    c = results["call-compare"].artifact
    assert isinstance(c, CompareReport) and len(c.rows) == 1 and all(r.output_a and r.output_b for r in c.rows)
    assert isinstance(messages[-1], AIMessage) and "validated" in messages[-1].content
    trace = example.trace(messages)
    assert trace.count("-> ") == 5 and "<- validate_quantization [error] invalid arguments" in trace
