"""`quantloop mcp`: the tools as an MCP server (the official `mcp` SDK, 2.x, low-level Server).

Every tool of quantloop.tools.catalog is listed with its pydantic request model's JSON schema as input
schema and its report model's as output schema. A call is validated by that same pydantic model, confined
to the data folder (quantloop/serve/confine.py), run in a worker thread, and reported while it runs with MCP
progress notifications (when the caller asked for them). Every failure is a tool error result (isError)
with one readable message, never a crashed server:

- invalid arguments: pydantic's message, one line per field;
- a path outside the data folder, a missing or bad file: the tool's one-line InputError;
- an output another running call is writing: refused until that call ends;
- anything the tool itself raises: its type and first line.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import mcp_types as types
from pydantic import ValidationError

from quantloop import __version__
from quantloop.errors import InputError
from quantloop.serve.confine import OutputLocks, confine_request
from quantloop.serve.progress import progress_message
from quantloop.tools.catalog import ToolEntry, tool_entry, tools
from quantloop.tools.langchain import validation_message

SERVER_NAME = "quantloop"
PROGRESS_EVERY_S = 1.0


def tool_error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def listed_tool(entry: ToolEntry) -> types.Tool:
    return types.Tool(name=entry.name, description=entry.description,
                      input_schema=entry.request.model_json_schema(),
                      output_schema=entry.report.model_json_schema(mode="serialization"),
                      annotations=types.ToolAnnotations(read_only_hint=entry.read_only, destructive_hint=False,
                                                        open_world_hint=False))


async def report_while_running(ctx, tool: str, started: float, beats: list[int]) -> None:
    """One progress notification a second (the live progress bars, else the elapsed time) until cancelled."""
    while True:
        await anyio.sleep(PROGRESS_EVERY_S)
        beats[0] += 1
        await ctx.session.report_progress(beats[0], None, progress_message(tool, started))


async def run_with_progress(ctx, entry: ToolEntry, request):
    """Run the tool in a worker thread; progress 0 when it starts, one a second while it runs, the last one at the end."""
    started = time.monotonic()
    beats = [0]
    await ctx.session.report_progress(0, None, f"{entry.name}: started")
    outcome: dict = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(report_while_running, ctx, entry.name, started, beats)
        try:
            outcome["report"] = await anyio.to_thread.run_sync(entry.run, request)
        except Exception as e:  # noqa: BLE001 — re-raised below, outside the task group (which would wrap it)
            outcome["error"] = e
        finally:
            tg.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    report = outcome["report"]
    done = beats[0] + 1
    await ctx.session.report_progress(done, done, f"{entry.name}: done in {time.monotonic() - started:.1f} s")
    return report


async def call_tool(ctx, params: types.CallToolRequestParams, root: Path, locks: OutputLocks) -> types.CallToolResult:
    entry = tool_entry(params.name)
    if entry is None:
        return tool_error(f"unknown tool '{params.name}'; the tools are {', '.join(t.name for t in tools())}")
    try:
        request = confine_request(entry, entry.request.model_validate(params.arguments or {}), root)
    except ValidationError as e:
        return tool_error(f"{entry.name}: {validation_message(e)}")
    except InputError as e:
        return tool_error(f"{entry.name}: {e.line()}")
    target = entry.writes(request) if entry.writes else None
    try:
        if target is not None:
            locks.acquire(target, entry.name)
    except InputError as e:
        return tool_error(f"{entry.name}: {e.line()}")
    try:
        report = await run_with_progress(ctx, entry, request)
    except InputError as e:
        return tool_error(f"{entry.name}: {e.line()}")
    except ValidationError as e:
        return tool_error(f"{entry.name}: {validation_message(e)}")
    except Exception as e:  # noqa: BLE001 — a tool's failure is the caller's to read, never the server's end
        first = str(e).splitlines()[0][:500] if str(e) else ""
        return tool_error(f"{entry.name} failed: {type(e).__name__}: {first}")
    finally:
        if target is not None:
            locks.release(target)
    return types.CallToolResult(content=[types.TextContent(type="text", text=report.model_dump_json())],
                                structured_content=report.model_dump(mode="json"))


def build_server(root: str | Path):
    """The MCP server over the data folder `root` (every path a call names must lie under it)."""
    from mcp.server import Server  # deferred: mcp

    root = Path(root).resolve()
    locks = OutputLocks()
    listed = [listed_tool(t) for t in tools()]

    async def on_list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await call_tool(ctx, params, root, locks)

    return Server(SERVER_NAME, version=__version__,
                  instructions=f"quantloop's quantization tools. Paths are relative to the data folder {root}; "
                               "nothing outside it can be read or written.",
                  on_list_tools=on_list_tools, on_call_tool=on_call_tool)


def serve_stdio(root: str | Path) -> None:
    from mcp.server.stdio import stdio_server  # deferred: mcp

    server = build_server(root)

    async def main() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    anyio.run(main)


def serve_http(root: str | Path, port: int, host: str = "127.0.0.1") -> None:
    """Streamable HTTP at http://127.0.0.1:PORT/mcp (loopback only)."""
    import uvicorn  # deferred: uvicorn

    app = build_server(root).streamable_http_app(host=host)
    uvicorn.run(app, host=host, port=port, log_level="warning")
