"""A LangChain agent calling quantloop's tools, offline.

The agent is LangChain's own (`langchain.agents.create_agent`) with quantloop's tools
(`quantloop.tools.as_langchain_tools()`). Its chat model is scripted, so the example runs without a language
model or a network: a subclass of langchain-core's fake chat model that accepts tool binding and answers with
a fixed list of tool calls. Every tool call is real: it estimates the file size, quantizes the model to
GGUF Q8_0, sends one call with an invalid argument (and reads the error), validates the result against the
float model, and compares the two models' generations.

    .venv/bin/python examples/langchain_agent.py                                   # SmolLM2-135M (run `quantloop prepare` first)
    .venv/bin/python examples/langchain_agent.py --model DIR --out DIR --spec FILE  # any prepared model
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402


class ScriptedToolCallingModel(GenericFakeChatModel):
    """langchain-core's fake chat model, answering with scripted messages, that accepts bind_tools (it records the
    names of the tools it was given, the way a real model would see them)."""

    bound_tools: list[str] = []

    def bind_tools(self, tools, **kwargs):
        self.bound_tools = [getattr(t, "name", None) or t["name"] for t in tools]
        return self


def tool_call(name: str, args: dict, call_id: str) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}])


def script(model: str, out: str, spec: str | None, dataset: str | None, chunks: int) -> list[AIMessage]:
    common = {"spec_file": spec} if spec else {}
    validate = {"quantized": out, "baseline": model, "chunks": chunks, "measure_speed": False, **common}
    if dataset:
        validate["dataset_dir"] = dataset
    return [
        tool_call("estimate", {"model": model, "gguf_type": "Q8_0"}, "call-estimate"),
        tool_call("quantize_model", {"checkpoint": model, "output_dir": out, "overwrite": True,
                                     "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}, "call-quantize"),
        tool_call("validate_quantization", {**validate, "chunks": 0}, "call-validate-invalid"),
        tool_call("validate_quantization", validate, "call-validate"),
        tool_call("compare_outputs", {"model_a": model, "model_b": out, "max_new_tokens": 8, **common}, "call-compare"),
        AIMessage(content="Q8_0 is quantized and validated; the report is next to the model."),
    ]


def run_agent(model: str, out: str, spec: str | None = None, dataset: str | None = None, chunks: int = 2) -> list:
    """Run the scripted agent; returns the conversation (AIMessages with tool calls, ToolMessages with results)."""
    from langchain.agents import create_agent

    from quantloop.tools import as_langchain_tools

    chat = ScriptedToolCallingModel(messages=iter(script(model, out, spec, dataset, chunks)))
    agent = create_agent(model=chat, tools=as_langchain_tools(),
                         system_prompt="You quantize small language models with quantloop's tools.")
    result = agent.invoke({"messages": [HumanMessage(f"Quantize {model} to GGUF Q8_0 in {out} and validate it.")]})
    return result["messages"]


def trace(messages: list) -> str:
    """The tool-call trace: each call with its arguments, each result (shortened) or error."""
    lines = []
    for m in messages:
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                lines.append(f"-> {c['name']}({json.dumps(c['args'])})")
            if m.content:
                lines.append(f"agent: {m.content}")
        elif isinstance(m, ToolMessage):
            text = m.content if isinstance(m.content, str) else json.dumps(m.content)
            lines.append(f"<- {m.name} [{m.status}] {text[:300]}{' ...' if len(text) > 300 else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from quantloop.paths import DEFAULT_MODEL_DIR, QUANTIZED_DIR

    p = argparse.ArgumentParser(description="A scripted LangChain agent calling quantloop's tools (offline).")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="prepared model (default: SmolLM2-135M)")
    p.add_argument("--out", default=str(QUANTIZED_DIR / "example-agent_q8_0"), help="output folder of the quantized model")
    p.add_argument("--spec", help="acceptance spec YAML (default: specs/acceptance.yaml)")
    p.add_argument("--dataset", help="prepared dataset folder (default: SLM/datasets/shakespeare)")
    p.add_argument("--chunks", type=int, default=2, help="test chunks the validation scores (default: 2)")
    a = p.parse_args(argv)
    print(trace(run_agent(a.model, a.out, a.spec, a.dataset, a.chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
