"""What each policy step costs on this machine, and the time a QAT step may train for.

A step's cost is measured by the attempt that runs it: the seconds of its quantize node (`quantize_s`), of its
validation and side-by-side generations (`validate_s`), and for a training step the seconds its quantize node ran
after training stopped (`tail_s`: the last step past the deadline, the final KL, the export). Each field is kept the
first time it is measured and never overwritten, in one JSON file per model, machine and quantloop version:

    CACHE_DIR/step-costs/<weights digest>-<machine key>.json     ($QUANTLOOP_STEP_COSTS moves the folder)

The model is its weights' digest (a changed model is measured afresh, never given another model's costs), the
machine its CPU model, core count and thread count. A step is keyed by its name and a digest of its spec, the
policy's validation settings and the acceptance spec, so a changed step is measured afresh too. A quantization
reused from the content-addressed cache measured no quantizing: its quantize seconds are not kept.

The knowledge store keeps each attempt's total seconds too, but only with memory on, as one number (quantize and
validation together) and without the machine; this record works with `--no-memory` and tells the parts apart.

The policy uses it (agents/quantization.py): a step's expected minutes are its measured cost when both parts are
known, else the policy's expect_minutes; a QAT step trains until the run's max_minutes less what must still fit
after it: its own tail and validation and the next step of the plan that runs (quantize + validation), each
measured, times the policy's cost_margin. When any of these is not measured yet, the policy's reserve_minutes is
kept instead. qat_max_minutes stays a cap on the step when it is set; null lets the step take all the run spares.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from quantloop import __version__ as VERSION
from quantloop.agents.state import PipelineState, PlannedAttempt
from quantloop.errors import InputError
from quantloop.eval.runtimes import default_threads
from quantloop.fileio import write_json_atomic
from quantloop.knowledge.identity import weights_digest
from quantloop.locks import shared_file_lock
from quantloop.models.checkpoints import resolve_model
from quantloop.paths import CACHE_DIR
from quantloop.schemas import QuantSpec, Strict

TRAINED_NAME = "qat_result.json"  # the QAT backend's result file; its trained_unix says when training stopped


class StepCost(Strict):
    """One step's measured seconds on one model and machine; each part with the run that measured it."""

    step: str
    quantize_s: float | None = None
    quantize_run: str = ""
    validate_s: float | None = Field(None, description="validation and the side-by-side generations")
    validate_run: str = ""
    tail_s: float | None = Field(None, description="training steps only: seconds of the quantize node after training stopped")
    tail_run: str = ""

    def known(self) -> bool:
        return self.quantize_s is not None and self.validate_s is not None

    def runs(self, *parts: str) -> str:
        ids = list(dict.fromkeys(getattr(self, f"{p}_run") for p in parts))
        return f"run{'s' if len(ids) > 1 else ''} {' and '.join(ids)}"


class CostFile(Strict):
    model: str = Field(description="the weights' digest")
    machine: str
    quantloop: str
    steps: dict[str, StepCost] = Field(default_factory=dict, description="by step key: name#digest of what it runs")


def costs_dir() -> Path:
    return Path(os.environ.get("QUANTLOOP_STEP_COSTS") or CACHE_DIR / "step-costs")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine() -> str:
    """'<CPU model>, <cores> cores, <threads> threads': the threads quantloop runs with ($QUANTLOOP_THREADS)."""
    return f"{cpu_model()}, {os.cpu_count() or 1} cores, {default_threads()} threads"


def model_digest(checkpoint: str) -> str | None:
    """The weights' digest of a checkpoint folder (safetensors) or GGUF file; None when there is no model there."""
    try:
        model = resolve_model(checkpoint)
    except (InputError, OSError):
        return None
    if model.hf_dir is not None:
        return weights_digest(model.hf_dir)
    h = hashlib.sha256()
    st = model.gguf.stat()
    h.update(f"{model.gguf.name}:{st.st_size}".encode())
    with open(model.gguf, "rb") as f:  # header + first MiB, and the last MiB
        h.update(f.read(1 << 20))
        f.seek(max(st.st_size - (1 << 20), 0))
        h.update(f.read())
    return h.hexdigest()[:16]


def cost_file(digest: str, folder: Path | None = None) -> Path:
    key = hashlib.sha256(json.dumps([machine(), VERSION]).encode()).hexdigest()[:12]
    return (folder or costs_dir()) / f"{digest}-{key}.json"


def step_key(planned: PlannedAttempt, state: PipelineState) -> str:
    """The step's name and a digest of what it runs and how it is validated."""
    what = {"kind": planned.kind, "spec": planned.spec.model_dump(mode="json") if planned.spec else None,
            "validation": state.policy.validation.model_dump(mode="json"), "acceptance": state.acceptance_sha256}
    return f"{planned.step.split('@')[0]}#{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]}"


def read_costs(digest: str, folder: Path | None = None) -> dict[str, StepCost]:
    """The steps measured on this model, machine and version; {} when none (or the file cannot be read: it is a cache)."""
    path = cost_file(digest, folder)
    try:
        data = CostFile.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.model != digest or data.machine != machine() or data.quantloop != VERSION:
        return {}
    return data.steps


def record_cost(digest: str, key: str, step: str, run_id: str, folder: Path | None = None, **seconds: float | None) -> StepCost:
    """Keep the parts given (quantize_s, validate_s, tail_s) that this step has no measurement of yet; the record."""
    path = cost_file(digest, folder)
    with shared_file_lock(path):
        steps = read_costs(digest, folder)
        cost = steps.get(key) or StepCost(step=step)
        update = {}
        for part, value in seconds.items():
            if value is not None and getattr(cost, part) is None:
                update |= {part: round(float(value), 2), part.removesuffix("_s") + "_run": run_id}
        if update:
            steps[key] = cost = cost.model_copy(update=update)
            write_json_atomic(path, CostFile(model=digest, machine=machine(), quantloop=VERSION, steps=steps))
    return cost


def cost_of(planned: PlannedAttempt, state: PipelineState, folder: Path | None = None) -> StepCost | None:
    digest = model_digest(planned.checkpoint) if planned.checkpoint else None
    return read_costs(digest, folder).get(step_key(planned, state)) if digest else None


@dataclass(frozen=True)
class Expected:
    minutes: float
    source: str  # "measured in run X" or "policy estimate"


def expected_minutes(planned: PlannedAttempt, state: PipelineState, folder: Path | None = None) -> Expected | None:
    """The step's measured minutes (quantize + validation) when known, else the policy's expect_minutes, else None."""
    cost = cost_of(planned, state, folder)
    if cost is not None and cost.known():
        return Expected((cost.quantize_s + cost.validate_s) / 60, f"measured in {cost.runs('quantize', 'validate')}")
    if planned.expect_minutes:
        return Expected(planned.expect_minutes, "policy estimate")
    return None


def next_step(planned: PlannedAttempt, state: PipelineState) -> PlannedAttempt | None:
    """The next step of the plan that runs (not one the policy marks skip, not a next_checkpoint without a checkpoint)."""
    return next((p for p in state.plan[planned.index + 1:] if not p.skip and p.checkpoint), None)


def reserve_after(planned: PlannedAttempt | None, state: PipelineState, folder: Path | None = None) -> Expected:
    """Minutes a training step leaves for what must still fit after it: its own tail and validation and the next
    step's quantize and validation, measured, times cost_margin; the policy's reserve_minutes when any is unknown."""
    policy = Expected(state.policy.reserve_minutes, f"policy estimate: reserve_minutes {state.policy.reserve_minutes:g}")
    if planned is None:
        return policy
    own = cost_of(planned, state, folder)
    if own is None or own.tail_s is None or own.validate_s is None:
        return policy
    seconds = own.tail_s + own.validate_s
    parts = [f"its export and validation {seconds / 60:.1f} min, measured in {own.runs('tail', 'validate')}"]
    after = next_step(planned, state)
    if after is not None:
        cost = cost_of(after, state, folder)
        if cost is None or not cost.known():
            return policy
        seconds += cost.quantize_s + cost.validate_s
        minutes = (cost.quantize_s + cost.validate_s) / 60
        parts.append(f"{after.step} {minutes:.1f} min, measured in {cost.runs('quantize', 'validate')}")
    margin = state.policy.cost_margin
    return Expected(margin * seconds / 60, f"{'; '.join(parts)}; times cost_margin {margin:g}")


def training_limit(spec: QuantSpec, state: PipelineState, planned: PlannedAttempt | None = None,
                   folder: Path | None = None) -> tuple[QuantSpec, str]:
    """A QAT spec whose training ends by the run's time budget: max_minutes less what the run has spent and less
    reserve_after(), capped by its own qat_max_minutes when set; and one line saying where the number came from.
    Other specs, or a run without a budget, as they are (and no line)."""
    budget = state.policy.max_minutes
    if not spec.trains or budget is None:
        return spec, ""
    reserve = reserve_after(planned, state, folder)
    room = budget - state.active_s / 60
    limit = room - reserve.minutes
    cap = spec.time_limit()
    capped = cap is not None and cap < limit
    limit = max(min(limit, cap) if capped else limit, 0.1)
    line = (f"QAT time limit {limit:.1f} min: {room:.1f} min left of max_minutes {budget:g}, less {reserve.minutes:.1f} min kept "
            f"for what must still fit after it ({reserve.source})")
    line += f", capped by its qat_max_minutes {cap:g}" if capped else ""
    return spec.with_time_limit(limit), line


def tail_seconds(output_dir: str | Path, started_unix: float, ended_unix: float, limit_minutes: float | None) -> float | None:
    """Seconds the quantize node ran after training stopped: from the training deadline (or from the end of training
    when it ended earlier) to the end of the node. None when the output has no training record."""
    try:
        trained = json.loads((Path(output_dir) / TRAINED_NAME).read_text())["trained_unix"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stop = min(trained, started_unix + 60 * limit_minutes) if limit_minutes else trained
    return max(ended_unix - stop, 0.0)
