"""The pipeline's state: what LangGraph checkpoints after every node (pydantic models only)."""

from __future__ import annotations

import inspect
import sys
from typing import Literal

from pydantic import BaseModel, Field

import quantloop.agents.policy as policy_mod
import quantloop.schemas as schemas_mod
from quantloop.agents.policy import Policy, StepKind, Target
from quantloop.schemas import (
    CriterionResult,
    PerplexityReport,
    QuantizationResult,
    QuantSpec,
    SizeReport,
    SpeedReport,
    Strict,
)

Verdict = Literal["accepted", "fallback", "skipped", "rejected"]
Decision = Literal["running", "accepted", "rejected"]


class CheckpointScore(Strict):
    """The float baseline report of one candidate checkpoint (computed once, reused by every attempt)."""

    name: str
    path: str
    training_step: int | None = None
    validation_ppl: PerplexityReport
    size: SizeReport
    speed: SpeedReport | None = None
    accuracy: float | None = Field(None, description="mean benchmark accuracy over the policy's rank_tasks (rank_by: accuracy)")
    wall_s: float = Field(0.0, description="seconds spent scoring it (the evaluation tools)")


class PlannedAttempt(Strict):
    """One policy step applied to one checkpoint; its output folder is fixed when the plan is made."""

    index: int
    step: str
    kind: StepKind
    spec: QuantSpec | None
    checkpoint: str
    output_dir: str | None
    skip: str | None = None
    expect_minutes: float | None = None
    past_budget: bool = False


class Attempt(Strict):
    index: int
    step: str
    kind: StepKind
    method: str | None
    bits: int | None
    checkpoint: str
    output_dir: str | None
    status: Literal["quantized", "validated", "skipped", "failed"]  # "quantized": validation still to run
    note: str = Field("", description="why a step was skipped or failed")
    quantization: QuantizationResult | None = None
    report_path: str | None = None
    generations_path: str | None = None
    criteria: list[CriterionResult] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict, description="every number of the validation report, flattened")
    passed: bool = False
    carried_by: list[str] = Field(default_factory=list, description="the quality bars a pass rests on (acceptance.quality)")
    wall_s: float = 0.0
    quantize_s: float = Field(0.0, description="seconds of the quantize node; wall_s adds validation and comparison")
    verdict: Verdict | None = None
    reason: str = ""
    mlflow_run_id: str | None = None
    evidence: list[str] = Field(default_factory=list, description="what the knowledge store knew of this step (the same spec "
                                                                  "on this model or its family) when it was tried")


class PipelineState(BaseModel):
    run_id: str
    model: str = Field(description="the model or checkpoint folder the run was started on (resolved path)")
    target: Target
    policy: Policy
    acceptance_spec: str
    acceptance_sha256: str = Field("", description="the acceptance spec's content when the run started; a resume checks it")
    dataset_dir: str
    output_root: str
    run_dir: str = Field("", description="this run's own output folder, output_root/<model>/<run id>; every attempt's "
                                         "folder lies in it (empty in a run started before runs had one)")
    candidates: list[CheckpointScore] = Field(default_factory=list, description="ranked, best first")
    plan: list[PlannedAttempt] = Field(default_factory=list)
    next_index: int = 0
    attempts: list[Attempt] = Field(default_factory=list)
    decision: Decision = "running"
    accepted_index: int | None = None
    recommendation: str = ""
    mlflow_parent_run_id: str | None = None
    registered_model: str | None = None
    summary_path: str | None = None
    started_unix: float = 0.0
    active_s: float = Field(0.0, description="seconds spent in the graph's nodes, summed over resumes")

    def time_breakdown(self) -> dict[str, float]:
        """Where the run's time went: the tools (evaluation, quantizers, validation) versus quantloop's own code."""
        evaluation = sum(c.wall_s for c in self.candidates)
        attempts = sum(a.wall_s for a in self.attempts)
        own = max(self.active_s - evaluation - attempts, 0.0)
        return {"active_s": self.active_s, "evaluation_s": evaluation, "attempts_s": attempts, "own_s": own,
                "own_share": own / self.active_s if self.active_s else 0.0}


def serialisable_types() -> list[tuple[str, str]]:
    """(module, class) of every pydantic model the checkpointer may store, for LangGraph's msgpack allowlist."""
    out = []
    for mod in (schemas_mod, policy_mod, sys.modules[__name__]):
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == mod.__name__:
                out.append((mod.__name__, name))
    return out
