"""`quantloop mcp`: the command line of quantloop/serve/mcp_server.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantloop.errors import InputError
from quantloop.paths import SLM_DIR
from quantloop.tools.catalog import tools


def cmd_mcp(a) -> int:
    root = Path(a.root).resolve()
    if not root.is_dir():
        raise InputError(root, "data folder not found", "run `quantloop prepare` first, or pass --root DIR")
    from quantloop.serve.mcp_server import serve_http, serve_stdio  # deferred: anyio, mcp_types

    if a.http is None:
        serve_stdio(root)
    else:
        if not 0 < a.http < 65536:
            raise InputError(None, f"--http {a.http} is not a port number", "pass 1-65535")
        serve_http(root, a.http)
    return 0


def add_mcp_command(subparsers) -> argparse.ArgumentParser:
    names = ", ".join(t.name for t in tools())
    s = subparsers.add_parser(
        "mcp", help=f"serve the tools ({names}) over MCP",
        description="An MCP server (the official Python SDK) with quantloop's tools, their pydantic models as input and "
                    "output schemas. Speaks stdio by default (for an MCP client that starts it as a subprocess); --http PORT "
                    "serves streamable HTTP at http://127.0.0.1:PORT/mcp instead. Every path a call names must lie under "
                    "the data folder (--root; relative paths are taken from it); long calls send progress notifications.",
        epilog=f"Tools: {names}. Models and text are local only; nothing is fetched from a model hub.")
    s.add_argument("--root", default=str(SLM_DIR), metavar="DIR", help=f"data folder the tools may read and write (default: {SLM_DIR})")
    s.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT instead of stdio")
    s.set_defaults(func=cmd_mcp)
    return s
