"""The tools as LangChain tools (langchain-core's StructuredTool): one per entry of quantloop.tools.catalog, its
args_schema the tool's own pydantic request model, so any LangChain or LangGraph agent can call them.

A call returns the report as JSON text (what the model reads) and the pydantic report itself as the tool
message's artifact. Bad input (an invalid argument, a missing file) comes back as the error text, not an
exception, so the agent can read it and correct the call.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from quantloop.errors import InputError
from quantloop.tools.catalog import ToolEntry, tools


def validation_message(err: ValidationError) -> str:
    """pydantic's own message, one line per invalid field."""
    return "invalid arguments: " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(request)'}: {e['msg']}" for e in err.errors(include_url=False))


def run_entry(entry: ToolEntry, arguments: dict) -> BaseModel:
    """Validate the arguments into the tool's request model and run the tool (raises ValidationError / InputError)."""
    return entry.run(entry.request.model_validate(arguments))


def as_langchain_tool(entry: ToolEntry):
    from langchain_core.tools import StructuredTool, ToolException  # deferred: langchain_core

    def call(**arguments):
        try:
            report = run_entry(entry, arguments)
        except ValidationError as e:
            raise ToolException(validation_message(e)) from None
        except InputError as e:
            raise ToolException(f"{entry.name}: {e.line()}") from None
        return report.model_dump_json(), report

    call.__name__ = entry.name
    return StructuredTool.from_function(
        func=call, name=entry.name, description=entry.description, args_schema=entry.request,
        response_format="content_and_artifact", handle_tool_error=True,
        handle_validation_error=lambda e: validation_message(e) if isinstance(e, ValidationError) else str(e))


def as_langchain_tools(names: list[str] | None = None) -> list:
    """LangChain StructuredTools for every tool of quantloop.tools.catalog.tools(), in its order (or the ones named)."""
    unknown = set(names or ()) - {t.name for t in tools()}
    if unknown:
        raise InputError(None, f"unknown tool(s): {', '.join(sorted(unknown))}", f"use {', '.join(t.name for t in tools())}")
    return [as_langchain_tool(t) for t in tools() if names is None or t.name in names]
