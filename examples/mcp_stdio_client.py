"""An MCP client (the official SDK's) that starts `quantloop mcp` as a subprocess over stdio, lists the tools,
calls validate_quantization on a quantized model and prints the progress notifications and the result.

    .venv/bin/python examples/mcp_stdio_client.py QUANTIZED BASELINE [--root SLM] [--spec FILE] [--chunks N]

Paths are relative to the server's data folder (--root, default SLM/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters


def server_parameters(root: str) -> StdioServerParameters:
    """`quantloop mcp --root ROOT`, started with this Python (the same as `python -m quantloop.serve`)."""
    return StdioServerParameters(command=sys.executable, args=["-m", "quantloop.serve", "--root", root])


async def session(root: str, arguments: dict, out=print) -> dict:
    t0 = time.monotonic()
    progress = []

    async def on_progress(p, total, message):
        progress.append((p, total, message))
        out(f"  progress {p:g}{'/' + format(total, 'g') if total else ''}: {message}")

    async with Client(server_parameters(root)) as client:
        info = client.server_info
        out(f"connected to {info.name} {info.version} over stdio (protocol {client.protocol_version})")
        tools = (await client.list_tools()).tools
        out("tools: " + ", ".join(t.name for t in tools))
        out(f"call validate_quantization({json.dumps(arguments)})")
        result = await client.call_tool("validate_quantization", arguments, progress_callback=on_progress)
    if result.is_error:
        out(f"tool error: {result.content[0].text}")
    else:
        r = result.structured_content
        k = r["kld"]
        out(f"result: runtime {r['runtime']}, {r['quantized']['format']} vs {r['baseline']['format']}: "
            f"PPL {k['ppl_quant']:.4f} vs {k['ppl_base']:.4f} ({k['ppl_increase_pct']:+.3f} %), mean KLD {k['kld_mean']:.6f}, "
            f"size {r['size_ratio']:.2f}x, passed: {r['passed']}; report: {r['report_path']}")
    out(f"({time.monotonic() - t0:.1f} s)")
    return {"tools": [t.name for t in tools], "progress": progress, "result": result}


def main(argv: list[str] | None = None) -> int:
    from quantloop.paths import SLM_DIR

    p = argparse.ArgumentParser(description="Call quantloop's validate_quantization over MCP (stdio).")
    p.add_argument("quantized", help="quantized model (relative to --root)")
    p.add_argument("baseline", help="float baseline (relative to --root)")
    p.add_argument("--root", default=str(SLM_DIR), help="the server's data folder (default: SLM/)")
    p.add_argument("--spec", help="acceptance spec YAML under --root (default: specs/acceptance.yaml)")
    p.add_argument("--chunks", type=int, default=2, help="test chunks scored (default: 2)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    a = p.parse_args(argv)
    arguments = {"quantized": a.quantized, "baseline": a.baseline, "chunks": a.chunks, "measure_speed": not a.no_speed}
    if a.spec:
        arguments["spec_file"] = a.spec
    done = anyio.run(session, a.root, arguments)
    return 1 if done["result"].is_error else 0


if __name__ == "__main__":
    sys.exit(main())
