"""The MCP server over streamable HTTP on 127.0.0.1 (`--http PORT`), driven by the SDK's client."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
from mcp import Client

from quantloop.tools.catalog import TOOLS
from serve_helpers import make_root

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def test_estimate_over_streamable_http(tmp_path, tiny_prepared, dataset_dir):
    root = make_root(tmp_path / "root", tiny_prepared, dataset_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "quantloop.serve", "--root", str(root), "--http", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port(port, server)

        async def go():
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                tools = (await client.list_tools()).tools
                estimate = await client.call_tool("estimate", {"model": "models/checkpoints/tiny", "gguf_type": "Q8_0"})
                outside = await client.call_tool("estimate", {"model": "/etc"})
                return tools, estimate, outside

        tools, estimate, outside = anyio.run(go)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert [t.name for t in tools] == [t.name for t in TOOLS]
    assert not estimate.is_error, estimate.content[0].text
    report = estimate.structured_content
    assert report["base_type"] == "Q8_0" and report["bytes"] > 0
    assert sum(g["bytes"] for g in report["groups"]) <= report["bytes"]
    assert outside.is_error and "model lies outside the server's data folder" in outside.content[0].text
