"""The tools an outside agent may call, each described once: its name, what it does, its pydantic request
and report models, the function that runs it, which request fields hold paths and which path it writes.

The LangChain adapters (quantloop/tools/langchain.py) and the MCP server (quantloop/serve/) are both built
from this list, so an agent sees the same names and JSON schemas whichever way it calls a tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field

from quantloop.errors import InputError
from quantloop.gguf.precision_map import estimate_bytes, layer_type_of, plan_mixed_file
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import (
    METHODS,
    CompareReport,
    CompareRequest,
    EvaluateRequest,
    EvaluationReport,
    QuantizationResult,
    QuantSpec,
    Strict,
    ValidationReport,
    ValidationRequest,
)
from quantloop.search.schemas import SearchRequest, SearchResult, SensitivityRequest, SensitivityResult
from quantloop.tools.compare import compare_outputs
from quantloop.tools.evaluate import evaluate_model
from quantloop.tools.knowledge import KnowledgeReport, KnowledgeRequest, knowledge
from quantloop.tools.quantize import default_output_dir, quantize_model
from quantloop.tools.search import search_mixed_precision
from quantloop.tools.sensitivity import measure_sensitivity
from quantloop.tools.validate import validate_quantization


class QuantizeRequest(Strict):
    """Input of the quantize_model tool."""

    checkpoint: str = Field(description="prepared checkpoint folder (transformers files + F16 GGUF) or an F16 .gguf")
    output_dir: str | None = Field(None, description="output folder; default: models/quantized/<name>_<tag> under the data folder")
    spec: QuantSpec = Field(description="the quantization attempt: method, bits, group size, GGUF type, calibration, ...")
    overwrite: bool = Field(False, description="replace an existing output folder")


class EstimateRequest(Strict):
    """Input of the estimate tool: a precision map applied to the model's F16 GGUF."""

    model: str = Field(description="prepared checkpoint folder or F16 .gguf")
    gguf_type: str | None = Field(None, description="type of every tensor nothing else matches (default: the embeddings' type, else Q8_0)")
    preset: str | None = Field(None, description="mixed-precision preset, e.g. arch-default")
    layer_types: dict[str, str] = Field(default_factory=dict, description="GGUF type per layer type, e.g. {'attention': 'Q4_K'}")
    tensor_types: dict[str, str] = Field(default_factory=dict, description="GGUF type per tensor-name regex, e.g. {'attn_v': 'Q8_0'}")


class EstimateGroup(Strict):
    layer_type: str
    gguf_type: str
    tensors: int
    weights: int
    bytes: int
    bits_per_weight: float


class EstimateReport(Strict):
    model: str
    base_type: str
    bytes: int = Field(description="the exact size of the GGUF file llama-quantize writes")
    bits_per_weight: float
    n_weights: int
    groups: list[EstimateGroup]


def quantize(req: QuantizeRequest) -> QuantizationResult:
    out = req.output_dir or default_output_dir(req.checkpoint, req.spec)
    return quantize_model(req.checkpoint, out, req.spec, overwrite=req.overwrite)


def estimate(req: EstimateRequest) -> EstimateReport:
    model = resolve_model(req.model)
    if model.gguf is None:
        raise InputError(model.path, "no F16/F32 GGUF to estimate from", "run `quantloop prepare` on it first")
    base, _, types = plan_mixed_file(model.gguf, req.gguf_type, req.preset, req.layer_types, req.tensor_types)
    e = estimate_bytes(model.gguf, types)
    groups: dict[tuple[str, str], list[int]] = {}
    for name, t, ne, nbytes in e["tensors"]:
        g = groups.setdefault((layer_type_of(name), t), [0, 0, 0])
        g[0], g[1], g[2] = g[0] + 1, g[1] + ne, g[2] + nbytes
    return EstimateReport(model=str(model.path), base_type=base, bytes=e["bytes"], bits_per_weight=e["bits_per_weight"],
                          n_weights=e["n_weights"],
                          groups=[EstimateGroup(layer_type=lt, gguf_type=t, tensors=n, weights=ne, bytes=b, bits_per_weight=8 * b / ne)
                                  for (lt, t), (n, ne, b) in sorted(groups.items())])


def validate(req: ValidationRequest) -> ValidationReport:
    return validate_quantization(req)


def compare(req: CompareRequest) -> CompareReport:
    return compare_outputs(req)


def evaluate(req: EvaluateRequest) -> EvaluationReport:
    return evaluate_model(req)


def quantize_writes(req: QuantizeRequest) -> Path:
    return Path(req.output_dir) if req.output_dir else default_output_dir(req.checkpoint, req.spec)


def validate_writes(req: ValidationRequest) -> Path:
    if req.report_path:
        return Path(req.report_path)
    q = Path(req.quantized)
    return (q if q.is_dir() else q.parent) / "validation_report.json"


def sensitivity(req):
    return measure_sensitivity(req)


def search(req):
    return search_mixed_precision(req)


@dataclass(frozen=True)
class ToolEntry:
    name: str
    description: str
    request: type[BaseModel]
    report: type[BaseModel]
    run: Callable[[BaseModel], BaseModel]
    path_fields: tuple[str, ...] = ()
    """dotted request fields that hold a file or folder (for example 'spec.calibration.dataset_dir')"""
    writes: Callable[[BaseModel], Path] | None = None
    """the file or folder a call writes (None: the tool only reads)"""
    read_only: bool = True


TOOLS: tuple[ToolEntry, ...] = (
    ToolEntry("quantize_model", f"Quantize a prepared checkpoint with one method ({', '.join(METHODS)}) and write "
              "the model files and quantization_config.json to an output folder. Returns sizes, bits per weight and timings.",
              QuantizeRequest, QuantizationResult, quantize,
              ("checkpoint", "output_dir", "spec.calibration.dataset_dir", "spec.calibration.mix[]"), quantize_writes, read_only=False),
    ToolEntry("validate_quantization", "Measure a quantized model against its float baseline on the runtime it is deployed "
              "with (perplexity and KL divergence, speed, size, generation checks) and judge it against the acceptance "
              "criteria. Writes validation_report.json next to the quantized model.",
              ValidationRequest, ValidationReport, validate,
              ("quantized", "baseline", "dataset_dir", "spec_file", "report_path"), validate_writes, read_only=False),
    ToolEntry("compare_outputs", "Greedy generations of two models side by side for the same prompts (JSON and a Markdown table).",
              CompareRequest, CompareReport, compare, ("model_a", "model_b", "spec_file")),
    ToolEntry("evaluate_model", "Score one model on its own: perplexity on every runtime it has files for, speed, size and "
              "generation checks (a float baseline report).",
              EvaluateRequest, EvaluationReport, evaluate, ("model", "dataset_dir", "spec_file")),
    ToolEntry("estimate", "The exact bytes and bits per weight of the GGUF a precision map gives (per layer type), before "
              "quantizing anything.", EstimateRequest, EstimateReport, estimate, ("model",)),
    ToolEntry("sensitivity", "Measure how much each tensor group hurts when it alone is quantized to each candidate GGUF "
              "type (mean KL divergence against the float model on the given text); cached, with an optional heatmap.",
              SensitivityRequest, SensitivityResult, sensitivity, ("model", "text[].dataset_dir", "cache_dir", "heatmap_png"),
              lambda req: Path(req.heatmap_png) if req.heatmap_png else None, read_only=False),
    ToolEntry("search", "Multi-objective mixed-precision search: per-tensor GGUF types seeded by greedy and integer-program "
              "allocations, every candidate measured (KL divergence on several text domains, exact bytes, llama.cpp speed); "
              "returns the Pareto front, each member a precision map quantize_model takes.",
              SearchRequest, SearchResult, search,
              ("model", "text[].dataset_dir", "sensitivity_text[].dataset_dir", "test_text[].dataset_dir", "seed_maps[]",
               "out_dir"), lambda req: Path(req.out_dir), read_only=False),
    ToolEntry("knowledge", "The memory across runs and models (an OpenCog Hyperon AtomSpace): atom counts by kind, file size "
              "and load time; the atoms a MeTTa pattern matches (Model, Tensor, Measurement, Attempt, Front); or forget a "
              "model's atoms.", KnowledgeRequest, KnowledgeReport, knowledge, ("store",),
              lambda req: Path(req.store) if req.store and req.action == "forget" else None, read_only=False),
)


_REGISTERED: list[ToolEntry] = []


def register_tool(entry: ToolEntry) -> ToolEntry:
    """Serve one more tool (after the built-in TOOLS) over MCP and LangChain. Returns it."""
    if tool_entry(entry.name):
        raise InputError(None, f"a tool named '{entry.name}' exists already", "give the new tool another name")
    _REGISTERED.append(entry)
    return entry


def unregister_tool(entry: ToolEntry) -> None:
    _REGISTERED.remove(entry)


def tools() -> tuple[ToolEntry, ...]:
    """Every tool an outside agent may call: the built-in TOOLS, then the registered ones."""
    return TOOLS + tuple(_REGISTERED)


def tool_entry(name: str) -> ToolEntry | None:
    return next((t for t in tools() if t.name == name), None)
