"""Typed tools the agents (or any LLM agent) call: plain functions, pydantic in and out."""

from quantloop.tools.compare import compare_outputs
from quantloop.tools.evaluate import evaluate_model
from quantloop.tools.langchain import as_langchain_tools
from quantloop.tools.validate import validate_quantization

__all__ = ["as_langchain_tools", "compare_outputs", "evaluate_model", "validate_quantization"]
