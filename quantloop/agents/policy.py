"""The fallback policy as data: specs/policy.yaml, validated here (replace it with --policy FILE).

A policy names the deployment target (`cpu`: GGUF on llama.cpp; `cuda`: the
quantizer's own format and kernels), the acceptance spec every attempt is
judged against, how much measuring each validation does, and per target the
ordered steps the agents try: INT4 GPTQ g128 -> INT4 AWQ -> INT8 -> INT4 with
4x the calibration samples -> QAT -> next-best checkpoint (seed 003). A step of kind search quantizes to
the best map of a mixed-precision search within a bits-per-weight budget (agents/search_step.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from quantloop.agents.search_step import SearchStep
from quantloop.errors import InputError
from quantloop.paths import PROJECT_ROOT, SPECS_DIR
from quantloop.schemas import QuantSpec, Strict
from quantloop.specs import load_yaml_model

DEFAULT_POLICY = SPECS_DIR / "policy.yaml"
Target = Literal["cpu", "cuda"]
StepKind = Literal["quantize", "qat", "search", "next_checkpoint"]


class PolicyStep(Strict):
    """One step of the plan: a quantization spec, QAT towards a spec's grid, a searched precision map, or the next-best checkpoint."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="short id, used in folder names and MLflow")
    kind: StepKind = "quantize"
    spec: QuantSpec | None = Field(None, description="what to quantize to (kinds quantize and qat)")
    search: SearchStep | None = Field(None, description="kind search: the search result to pick a precision map from, the budget, "
                                                        "and the short search to run when there is no result")
    retry: list[str] = Field(default_factory=list, description="next_checkpoint: names of earlier steps to run again on that checkpoint (default: all quantize steps)")
    skip: str | None = Field(None, description="record this step as skipped with this reason (a capability this target cannot run)")
    expect_minutes: float | None = Field(None, gt=0, description="about how long the step takes with its validation: with the "
                                                                 "policy's max_minutes, a step that would end past it is not started; "
                                                                 "once the step is measured on this machine and model, the "
                                                                 "measured minutes are used instead (agents/step_costs.py)")
    past_budget: bool = Field(False, description="tried even when the run's max_minutes is spent: the cheap fallback that "
                                                  "hands over a passing file (Q8_0), so a slow or loaded machine does not "
                                                  "turn an accepted run into a rejected one")

    @model_validator(mode="after")
    def _spec_matches_kind(self):
        if self.kind == "search" and self.search is None:
            raise ValueError(f"step '{self.name}' of kind search needs a 'search' (e.g. search: {{result: PATH, max_bpw: 5.0}})")
        if self.kind == "search" and self.spec is not None:
            raise ValueError(f"step '{self.name}' of kind search takes no 'spec' (the searched precision map is its spec)")
        if self.kind != "search" and self.search is not None:
            raise ValueError(f"step '{self.name}' of kind {self.kind} takes no 'search' (only kind search does)")
        if self.kind in ("quantize", "qat") and self.spec is None:
            raise ValueError(f"step '{self.name}' of kind {self.kind} needs a 'spec'")
        if self.spec is not None and (self.kind == "qat") != self.spec.trains:
            raise ValueError(f"step '{self.name}': kind qat goes with method qat (and method qat with kind qat)")
        if self.kind == "next_checkpoint" and self.spec is not None:
            raise ValueError(f"step '{self.name}' of kind next_checkpoint takes no 'spec' (it re-runs 'retry' steps)")
        return self


class ValidationSettings(Strict):
    """How much each validation measures (the acceptance spec sets context, speed tokens and prompts)."""

    chunks: int | None = Field(None, ge=1, description="test chunks scored (default: the acceptance spec's eval.chunks)")
    measure_speed: bool = True
    check_generation: bool = True
    full_report: bool = Field(False, description="measure every criterion of every attempt (default: one that can no longer "
                              "change an attempt's verdict is reported as not measured, with the reason)")
    compare_generations: bool = Field(True, description="write the side-by-side generations (Markdown) of every attempt")
    selection_chunks: int = Field(4, ge=1, description="validation-split chunks the EvaluationAgent scores per checkpoint")
    rank_by: Literal["perplexity", "accuracy"] = Field("perplexity", description="how the EvaluationAgent ranks candidate "
                                                       "checkpoints: validation perplexity, or mean benchmark accuracy")
    rank_tasks: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"], description="benchmark tasks or groups "
                                  "rank_by: accuracy scores, on the last rank_items items of each task's fixed order (the "
                                  "acceptance bar scores the first ones)")
    rank_items: int = Field(200, ge=10, description="items per task scored per checkpoint when ranking by accuracy")
    held_out: list[str] = Field(default_factory=list, description="more prepared datasets (names under SLM/datasets, or folders) "
                                "whose test split is scored too, each judged by the perplexity bar: text no calibration drew "
                                "from, so a quantizer that fits its calibration domain cannot pass on it alone")
    held_out_chunks: int | None = Field(None, ge=1, description="test chunks scored per held-out dataset, more while within "
                                        "the noise of the bar (default: chunks)")
    precheck_size: bool = Field(True, description="skip, before quantizing, a step whose GGUF layout cannot meet the size bar "
                                                  "(its exact size is known from the tensor types alone)")


class Policy(Strict):
    target: Target = "cpu"
    acceptance_spec: str = Field("acceptance.yaml", description="acceptance spec YAML, relative to the policy file (or absolute)")
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    log_model_max_mib: float = Field(64.0, ge=0, description="model files up to this size are logged to MLflow; larger ones by path")
    max_minutes: float | None = Field(None, gt=0, description="a step that would start after the run has spent this many minutes "
                                                              "is skipped with the reason, so a run reaches its decision in time")
    reserve_minutes: float = Field(8.0, ge=0, description="a QAT step trains for at most what is left of max_minutes less this "
                                                         "(its own qat_max_minutes if shorter), keeping time for its export, "
                                                         "validation and the step after, until those are measured on this "
                                                         "machine and model (agents/step_costs.py): then their measured minutes "
                                                         "times cost_margin are kept instead")
    cost_margin: float = Field(1.25, ge=1.0, description="measured minutes are multiplied by this where the run keeps time "
                                                         "for them (validation near the bar scores more text than far from it)")
    steps: dict[Target, list[PolicyStep]] = Field(description="ordered fallback steps per deployment target")
    memory: bool = Field(True, description="use the knowledge store (SLM/knowledge/): skip a step whose outcome it already "
                                           "knows, cite what it knows in the attempt line, take related checkpoints' "
                                           "sensitivities as priors for a size budget, and record every attempt into it "
                                           "(`quantloop run --no-memory` turns it off)")

    @model_validator(mode="after")
    def _check_steps(self):
        for target, steps in self.steps.items():
            names = [s.name for s in steps]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"steps.{target}: step names must be unique, repeated: {', '.join(sorted(dup))}")
            for i, s in enumerate(steps):
                if target == "cuda" and s.spec is not None and s.spec.quantized_by_llama_cpp:
                    raise ValueError(f"steps.cuda.{i}: method gguf runs on llama.cpp, not on the cuda target")
                if target == "cuda" and s.kind == "search":
                    raise ValueError(f"steps.cuda.{i}: kind search writes GGUF for llama.cpp, not for the cuda target")
                unknown = [r for r in s.retry if r not in names[:i]]
                if unknown:
                    raise ValueError(f"steps.{target}.{i}.retry: no earlier step named {', '.join(unknown)}")
        if self.target not in self.steps or not self.steps[self.target]:
            raise ValueError(f"steps: no steps for the target '{self.target}'")
        return self

    def plan_steps(self) -> list[PolicyStep]:
        return self.steps[self.target]

    def data_free(self) -> "Policy":
        """The same policy with every calibrated step on self-generated (synthetic) calibration text."""
        def synth(step: PolicyStep) -> PolicyStep:
            if step.spec is None or not step.spec.uses_calibration():
                return step
            cal = step.spec.calibration.model_copy(update={"source": "synthetic", "mix": []})
            return step.model_copy(update={"spec": step.spec.model_copy(update={"calibration": cal})})

        return self.model_copy(update={"steps": {t: [synth(s) for s in steps] for t, steps in self.steps.items()}})


def load_policy(path: str | Path | None = None, target: Target | None = None) -> tuple[Policy, Path]:
    """Read and validate a policy; `target` overrides its deployment target. Returns it and its acceptance spec path."""
    path = Path(path) if path else DEFAULT_POLICY
    try:
        policy = load_yaml_model(path, Policy)
    except InputError as e:
        raise InputError(e.path, e.problem, "see specs/policy.yaml for the expected fields") from None
    if target is not None and target != policy.target:
        if target not in policy.steps:
            raise InputError(path, f"field 'steps': no steps for the target '{target}'", f"add steps.{target} to the policy")
        policy = policy.model_copy(update={"target": target})
    spec = Path(policy.acceptance_spec)
    if not spec.is_absolute():
        spec = next((p for p in (path.parent / spec, PROJECT_ROOT / spec, SPECS_DIR / spec) if p.is_file()), path.parent / spec)
    if not spec.is_file():
        raise InputError(path, f"field 'acceptance_spec': {spec} not found", "point it at an acceptance YAML such as specs/acceptance.yaml")
    return policy, spec.resolve()
