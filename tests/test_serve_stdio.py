"""The MCP server as a subprocess over stdio, driven by the SDK's own client: list the tools, call
validate_quantization on the tiny Llama, receive progress, read the result."""

import json
import sys
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from quantloop.schemas import ValidationReport
from quantloop.tools.catalog import TOOLS
from serve_helpers import make_root


def test_validate_over_stdio_with_progress(tmp_path, tiny_prepared, dataset_dir):
    from quantloop.schemas import quant_spec
    from quantloop.tools.quantize import quantize_model

    root = make_root(tmp_path / "root", tiny_prepared, dataset_dir)
    quantize_model(root / "models" / "checkpoints" / "tiny", root / "models" / "quantized" / "tiny_q4_0",
                   quant_spec(method="gguf", bits=4, gguf_type="Q4_0"))
    params = StdioServerParameters(command=sys.executable, args=["-m", "quantloop.serve", "--root", str(root)],
                                   cwd=str(Path(__file__).resolve().parent.parent))
    progress = []

    async def on_progress(p, total, message):
        progress.append((p, total, message))

    async def go():
        async with Client(params) as client:
            tools = (await client.list_tools()).tools
            result = await client.call_tool("validate_quantization", {
                "quantized": "models/quantized/tiny_q4_0", "baseline": "models/checkpoints/tiny", "spec_file": "acceptance.yaml",
                "chunks": 2, "measure_speed": False}, progress_callback=on_progress)
            refused = await client.call_tool("validate_quantization", {"quantized": "/etc/hostname", "baseline": "x"})
            return client.server_info, tools, result, refused

    info, tools, result, refused = anyio.run(go)
    assert info.name == "quantloop"
    assert [t.name for t in tools] == [t.name for t in TOOLS]
    assert not result.is_error, result.content[0].text
    report = ValidationReport.model_validate(result.structured_content)
    assert report.quantized.format == "gguf:Q4_0" and report.kld.tokens > 0 and report.kld.kld_mean > 0
    on_disk = json.loads((root / "models" / "quantized" / "tiny_q4_0" / "validation_report.json").read_text())
    assert on_disk["kld"]["kld_mean"] == report.kld.kld_mean
    assert progress[0] == (0.0, None, "validate_quantization: started")
    assert progress[-1][0] == progress[-1][1] and "done in" in progress[-1][2]
    assert refused.is_error and "quantized lies outside the server's data folder" in refused.content[0].text
