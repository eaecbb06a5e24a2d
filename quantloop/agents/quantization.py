"""QuantizationAgent: run the next planned attempt with the tools (quantize_model, then
validate_quantization, then compare_outputs, each its own graph node) and record what happened."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from quantloop.agents.lessons import lessons, remember_front
from quantloop.agents.search_step import search_attempt
from quantloop.agents.state import Attempt, PipelineState, PlannedAttempt
from quantloop.agents.step_costs import (
    expected_minutes,
    model_digest,
    record_cost,
    step_key,
    tail_seconds,
    training_limit,
)
from quantloop.errors import InputError, crash_line, missing_extra
from quantloop.eval.criteria.size import required_size_ratio
from quantloop.eval.size import gguf_size, judged_bits
from quantloop.fileio import write_text_atomic
from quantloop.gguf.export import planned_export_types
from quantloop.gguf.llamacpp import nominal_bits_of
from quantloop.gguf.precision_map import estimate_bytes
from quantloop.gguf.tensor_names import GGUF_LINEAR
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import CompareRequest, QuantSpec, ValidationReport, ValidationRequest
from quantloop.search.budget import plan_without_measuring
from quantloop.specs import load_quality_spec
from quantloop.tools.compare import compare_outputs
from quantloop.tools.quantize import REUSED_NOTE, quantize_model
from quantloop.tools.validate import validate_quantization

GENERATIONS_NAME = "generations.md"
CACHE_NAME = ".cache"  # output_root/.cache: the content-addressed quantizer outputs every run reuses (tools/quant_cache.py)


def flatten_numbers(data, prefix: str = "") -> dict[str, float]:
    """Every number (and boolean, as 0/1) of a nested report, keyed by its dotted path."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        if isinstance(data, bool):
            return {prefix: float(data)}
        if isinstance(data, (int, float)):
            return {prefix: float(data)}
        return {}
    for k, v in items:
        if isinstance(data, list) and isinstance(v, dict) and "name" in v:
            k = str(v["name"])  # criteria: keyed by name, not position
        out.update(flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


OPTIONAL_QUANTIZERS = ("gptqmodel", "auto_round", "llama_cpp")  # packages a quantizer step may lack on a machine


def unavailable_reason(err: BaseException) -> str | None:
    """The one-line reason when the quantizer itself is not installed or not supported here, else None (a crash
    inside an installed library is a failure, not 'not available')."""
    if isinstance(err, ImportError) and (err.name or "").split(".")[0] in OPTIONAL_QUANTIZERS:
        extra = missing_extra(err)  # the pip extra that brings it, when it is one of quantloop's optional parts
        return f"not available: {extra.line() if extra else err}"
    if isinstance(err, InputError) and ("not available" in err.problem or "optional part" in err.problem):
        return f"not available: {err.line()}"
    return None


def remove_stale_temporaries(output_dir: Path) -> None:
    """A run killed inside an atomic write leaves `.NAME.tmp-*` next to NAME; clear them before retrying."""
    for tmp in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def skipped(planned: PlannedAttempt, note: str, status: str = "skipped") -> Attempt:
    spec = planned.spec
    return Attempt(index=planned.index, step=planned.step, kind=planned.kind, method=spec.method if spec else None,
                   bits=spec.bits if spec else None, checkpoint=planned.checkpoint, output_dir=None, status=status, note=note)


def with_run_time_limit(spec: QuantSpec, state: PipelineState, planned: PlannedAttempt | None = None,
                        costs_dir: Path | None = None) -> QuantSpec:
    """A QAT spec whose training ends by the run's time budget (max_minutes less what must still fit after it, from
    now: step_costs.training_limit), or its own qat_max_minutes if that is shorter; other specs as they are."""
    return training_limit(spec, state, planned, costs_dir)[0]


class QuantizationAgent:
    """Three graph nodes, one tool call each, so a run killed during validation resumes without re-quantizing:
    quantize (quantize_model, appends the attempt), validate (validate_quantization on the last attempt),
    compare (compare_outputs on the last attempt). With a knowledge store (memory), a step whose outcome it already
    knows is skipped with the reason, what it knows is kept as the attempt's evidence, and a size budget's
    sensitivity pass takes related checkpoints' values as priors."""

    def __init__(self, memory=None, costs_dir: Path | None = None):
        self.memory = memory
        self.costs_dir = costs_dir  # the step-cost record's folder (default: step_costs.costs_dir())

    def __call__(self, state: PipelineState) -> dict:
        planned = state.plan[state.next_index]
        attempt = self.attempt(planned, state)
        if attempt.status == "quantized":  # its quantize seconds (a search step's search included)
            attempt = attempt.model_copy(update={"quantize_s": attempt.wall_s})
            self.record(planned, state, attempt.quantization, quantize_s=attempt.wall_s)
        return {"attempts": state.attempts + [attempt], "next_index": state.next_index + 1}

    def attempt(self, planned: PlannedAttempt, state: PipelineState) -> Attempt:
        if planned.skip:
            return skipped(planned, planned.skip)
        if planned.kind == "next_checkpoint":
            return skipped(planned, "no other checkpoint to try: the run was given a single checkpoint")
        spec = planned.spec
        budget = None if planned.past_budget else state.policy.max_minutes
        if budget is not None and state.active_s > 60 * budget:
            return skipped(planned, f"the run's time budget of {budget:g} min is spent ({state.active_s / 60:.1f} min so far); "
                                    "raise max_minutes in the policy to try this step")
        expected = expected_minutes(planned, state, self.costs_dir) if budget is not None else None
        if expected is not None and state.active_s / 60 + expected.minutes > budget:
            return skipped(planned, f"the step takes about {round(expected.minutes, 1):g} min ({expected.source}) and the "
                                    f"run has spent {state.active_s / 60:.1f} of its {budget:g} min; raise max_minutes in the "
                                    "policy to try it")
        if planned.kind == "search" and planned.spec is None:  # the searched map becomes the spec, then as a quantize step
            memory = self.memory if state.policy.memory else None
            return search_attempt(planned, state, self.attempt, skipped, lambda p, path: remember_front(memory, p, path))
        if state.policy.validation.precheck_size and (too_big := self.size_precheck(planned, state)):
            return skipped(planned, too_big)
        lesson = lessons(self.memory if state.policy.memory else None, planned, state)
        if lesson.skip:
            return skipped(planned, lesson.skip).model_copy(update={"evidence": lesson.evidence})
        spec, limit_line = training_limit(spec, state, planned, self.costs_dir)
        out = Path(planned.output_dir)
        remove_stale_temporaries(out)
        t0, started_unix = time.perf_counter(), time.time()
        try:
            result = quantize_model(planned.checkpoint, out, spec, overwrite=True, cache_dir=Path(state.output_root) / CACHE_NAME,
                                    memory=self.memory if state.policy.memory else None)
        except Exception as e:  # noqa: BLE001 — the loop goes on; the attempt records why
            reason = unavailable_reason(e)
            if reason is not None:
                return skipped(planned, reason)
            if isinstance(e, InputError):
                return skipped(planned, f"cannot run on this input: {e.line()}")
            return skipped(planned, f"quantizer failed: {crash_line(e)}", status="failed")
        if spec.trains:
            self.record(planned, state, result, tail_s=tail_seconds(out, started_unix, time.time(), spec.time_limit()))
        if limit_line:
            result = result.model_copy(update={"notes": [limit_line, *result.notes]})
        return Attempt(index=planned.index, step=planned.step, kind=planned.kind, method=spec.method, bits=spec.bits,
                       checkpoint=planned.checkpoint, output_dir=str(out), status="quantized", quantization=result,
                       wall_s=time.perf_counter() - t0, evidence=lesson.evidence)

    def record(self, planned: PlannedAttempt, state: PipelineState, result, **seconds: float | None) -> None:
        """Seconds of the step into the step-cost record (the first time each is measured); a quantization whose files
        were reused from the cache measured no quantizing, only its validation counts."""
        if any(n.startswith(REUSED_NOTE) for n in result.notes):
            seconds = {k: v for k, v in seconds.items() if k == "validate_s"}
        digest = model_digest(planned.checkpoint) if seconds else None
        if digest is None:
            return
        record_cost(digest, step_key(state.plan[planned.index], state), planned.step, state.run_id, self.costs_dir, **seconds)

    def validate_last(self, state: PipelineState) -> dict:
        """validate_quantization of the attempt just quantized (its files stay as they are)."""
        attempts, last = list(state.attempts), state.attempts[-1]
        t0 = time.perf_counter()
        report = self.validate(last.quantization.model_path, state.plan[last.index], state)
        attempts[-1] = last.model_copy(update={
            "status": "validated", "report_path": report.report_path, "criteria": report.criteria,
            "metrics": flatten_numbers(report.model_dump(mode="json")), "passed": report.passed,
            "carried_by": report.carried_by, "wall_s": last.wall_s + time.perf_counter() - t0})
        return {"attempts": attempts}

    def compare_last(self, state: PipelineState) -> dict:
        """Side-by-side generations of the float model and the attempt just validated."""
        attempts, last = list(state.attempts), state.attempts[-1]
        t0 = time.perf_counter()
        planned = state.plan[last.index]
        generations = self.compare(last.quantization.model_path, planned, state)
        wall = last.wall_s + time.perf_counter() - t0
        attempts[-1] = done = last.model_copy(update={"generations_path": generations, "wall_s": wall})
        if done.quantize_s:  # 0: quantized by a run started before attempts kept it
            self.record(planned, state, done.quantization, validate_s=done.wall_s - done.quantize_s)
        return {"attempts": attempts}

    @staticmethod
    def budget_precheck(planned: PlannedAttempt, state: PipelineState) -> str | None:
        """Why a step with a size budget cannot pass on size, when its file is known before any work: the budget
        leaves no choice (every tensor that can go lower must go to its smallest type), and the file that writes is
        judged at the bit width of its linear weights (rounded down), whose bar it misses; or nothing fits at all."""
        base = resolve_model(planned.checkpoint)
        if base.gguf is None:
            return None
        try:
            types, record = plan_without_measuring(base.gguf, planned.spec)
        except InputError as e:
            return f"size budget cannot be met: {e.problem}"
        if types is None or not record.forced:
            return None
        rows = [r for r in estimate_bytes(base.gguf, types)["tensors"] if GGUF_LINEAR.match(r.name)]
        linear_bits = 8 * sum(r.n_bytes for r in rows) / sum(r.n_elements for r in rows)
        bits = judged_bits({r.type for r in rows}, linear_bits, planned.spec.gguf_type)  # as validation will judge the file
        need = required_size_ratio(load_quality_spec(state.acceptance_spec).acceptance, bits)
        ratio = record.f16_bytes / record.bytes
        if ratio >= need * 0.99:
            return None
        return (f"size {ratio:.2f}x (needs >= {need}x at {bits} bits), known before quantizing: the {planned.spec.min_size_ratio}x "
                f"budget leaves one plan, every one of the {len(record.downgrades)} tensors that can go below 4 bits at its "
                f"smallest type ({record.bytes:,} bytes, {linear_bits:.2f} bits per linear weight, judged at {bits} bits)")

    @staticmethod
    def size_precheck(planned: PlannedAttempt, state: PipelineState) -> str | None:
        """Why the step cannot meet the size bar, when the file it writes is known before quantizing, else None.

        Exact GGUF exports (GPTQ, RTN, AWQ, QAT with a gguf_type) write a layout fixed by the type alone, so
        mixed_precision.estimate_bytes gives their size exactly; an optimizer changes codes, never bytes.
        llama-quantize's own mixtures (Q4_K_M, ...) are decided inside llama.cpp and are not predicted."""
        spec = planned.spec
        if spec.size_budget() and spec.gguf_type:
            return QuantizationAgent.budget_precheck(planned, state)
        if not spec.exact_export or not spec.gguf_type or spec.has_layer_map():
            return None
        base = resolve_model(planned.checkpoint)
        if base.gguf is None:
            return None
        gguf_type = spec.gguf_type.upper()
        types = planned_export_types(base.gguf, gguf_type)
        predicted = estimate_bytes(base.gguf, types)
        ratio = gguf_size(base.gguf).bytes_on_disk / predicted["bytes"]
        bits = nominal_bits_of(gguf_type) if spec.type_sets_bits else spec.bits
        need = required_size_ratio(load_quality_spec(state.acceptance_spec).acceptance, bits)
        if ratio >= need * 0.99:  # the estimate matches the written file within 1 %
            return None
        return (f"size {ratio:.2f}x (needs >= {need}x at {bits} bits), known before quantizing: its {gguf_type} file is "
                f"{predicted['bytes']:,} bytes ({predicted['bits_per_weight']:.2f} bits/weight, "
                f"token embedding {types.get('token_embd.weight', '?')}) whatever the optimizer finds")

    @staticmethod
    def validate(model_path: str, planned: PlannedAttempt, state: PipelineState) -> ValidationReport:
        v = state.policy.validation
        return validate_quantization(ValidationRequest(
            quantized=model_path, baseline=planned.checkpoint,
            nominal_bits=None if model_path.endswith(".gguf") else planned.spec.bits,  # a GGUF's bits come from the file
            dataset_dir=state.dataset_dir, spec_file=state.acceptance_spec,
            report_path=str(Path(planned.output_dir) / "validation_report.json"),
            chunks=v.chunks, held_out=v.held_out,
            held_out_chunks=v.held_out_chunks, measure_speed=v.measure_speed, check_generation=v.check_generation,
            full_report=v.full_report,
        ))

    @staticmethod
    def compare(model_path: str, planned: PlannedAttempt, state: PipelineState) -> str | None:
        if not state.policy.validation.compare_generations:
            return None

        quality = load_quality_spec(state.acceptance_spec)
        r = compare_outputs(CompareRequest(model_a=planned.checkpoint, model_b=model_path, spec_file=state.acceptance_spec,
                                           max_new_tokens=quality.generation.max_new_tokens))
        path = Path(planned.output_dir) / GENERATIONS_NAME
        write_text_atomic(path, f"# Side-by-side generations: float (A) vs {planned.step} (B)\n\n{r.markdown}"
                                f"\nidentical outputs: {r.identical_rate:.0%}\n", fault="generations")
        return str(path)
