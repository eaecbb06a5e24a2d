"""A finished pipeline run read back from MLflow: the parent run (the decision, quantization_summary.json) and
one nested run per attempt (the spec as params, the validation report as metrics, generations.md)."""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from quantloop.eval.criteria.base import number
from quantloop.eval.criteria.perplexity import ppl_increase_stderr_pct
from quantloop.schemas import AcceptanceCriteria
from quantloop.tracking import pipeline_run_records, read_artifact_text, resolve_tracking_uri


class AttemptRow(BaseModel):
    index: int
    step: str
    status: str
    method: str | None = None
    format: str | None = None
    nominal_bits: int | None = None
    bits_per_weight: float | None = None
    bytes_on_disk: int | None = None
    ppl_increase_pct: float | None = None
    ppl_increase_stderr_pct: float | None = Field(None, description="one standard error of the increase, from ln(PPL ratio)'s")
    kld_mean: float | None = None
    kld_mean_stderr: float | None = None
    speedup_tg: float | None = None
    size_ratio: float | None = None
    verdict: str = ""
    reason: str = ""
    generations_md: str | None = None
    mlflow_run_id: str
    metrics: dict[str, float] = Field(default_factory=dict, description="every metric of the attempt's MLflow run (the criteria's cells)")


class Baseline(BaseModel):
    model: str
    checkpoints: list[dict] = Field(default_factory=list, description="every candidate checkpoint scored, best first")
    format: str | None = None
    test_ppl: float | None = None
    bytes_on_disk: int | None = None
    bits_per_weight: float | None = None
    tg_tokens_per_s: float | None = None
    reference_note: str = ""
    dataset: str = ""


class RunRecord(BaseModel):
    run_id: str
    tracking_uri: str
    mlflow_parent_run_id: str
    target: str = ""
    decision: str = "running"
    accepted_step: str | None = None
    registered_model: str | None = None
    recommendation: str = ""
    acceptance: AcceptanceCriteria = Field(default_factory=AcceptanceCriteria)
    baseline: Baseline
    attempts: list[AttemptRow]


def attempt_row(rec: dict, uri: str) -> AttemptRow:
    m, p, t = rec["metrics"], rec["params"], rec["tags"]
    bits = number(m, "nominal_bits")
    size_bytes = number(m, "size_quantized.bytes_on_disk") or number(m, "quantize.bytes_on_disk")
    return AttemptRow(
        index=int(t["quantloop.attempt"]), step=t.get("step") or p.get("step", "?"), status=t.get("status", ""),
        method=p.get("spec.method"), format=p.get("format"),
        nominal_bits=int(bits) if bits is not None else (int(p["spec.bits"]) if p.get("spec.bits", "").isdigit() else None),
        bits_per_weight=number(m, "size_quantized.bits_per_weight"), bytes_on_disk=int(size_bytes) if size_bytes else None,
        ppl_increase_pct=number(m, "kld.ppl_increase_pct"), ppl_increase_stderr_pct=ppl_increase_stderr_pct(m),
        kld_mean=number(m, "kld.kld_mean"), kld_mean_stderr=number(m, "kld.kld_mean_stderr"),
        speedup_tg=number(m, "speedup_tg"), size_ratio=number(m, "size_ratio"),
        verdict=t.get("decision", ""), reason=t.get("reason", "") or p.get("note", ""),
        generations_md=read_artifact_text(uri, rec["run_id"], "generations.md") if t.get("status") == "validated" else None,
        mlflow_run_id=rec["run_id"], metrics=m)


def baseline_of(parent: dict, summary: dict, first_validated: dict | None, uri: str) -> Baseline:
    b = Baseline(model=parent["params"].get("model", summary.get("model", "?")), checkpoints=summary.get("checkpoints", []))
    if first_validated is None:
        return b
    m = first_validated["metrics"]
    report = read_artifact_text(uri, first_validated["run_id"], "validation_report.json")
    v = json.loads(report) if report else {}
    size_bytes = number(m, "size_baseline.bytes_on_disk")
    return b.model_copy(update={
        "format": (v.get("baseline") or {}).get("format"), "test_ppl": number(m, "kld.ppl_base"),
        "bytes_on_disk": int(size_bytes) if size_bytes else None, "bits_per_weight": number(m, "size_baseline.bits_per_weight"),
        "tg_tokens_per_s": number(m, "speed_baseline.tg_tokens_per_s"), "reference_note": v.get("reference_note", ""),
        "dataset": v.get("dataset", "")})


def load_run_record(run_id: str, tracking_uri: str | None = None) -> RunRecord:
    """Everything the report shows about pipeline run `run_id` (InputError when the store has no such run)."""
    uri = resolve_tracking_uri(tracking_uri)
    recs = pipeline_run_records(uri, run_id)
    parent = recs["parent"]
    summary_text = read_artifact_text(uri, parent["run_id"], "quantization_summary.json")
    summary = json.loads(summary_text) if summary_text else {}
    validated = [r for r in recs["attempts"] if r["tags"].get("status") == "validated"]
    accepted = summary.get("accepted") or {}
    return RunRecord(
        run_id=run_id, tracking_uri=uri, mlflow_parent_run_id=parent["run_id"], target=parent["params"].get("target", ""),
        decision=parent["tags"].get("decision", summary.get("decision", "running")), accepted_step=accepted.get("step"),
        registered_model=(summary.get("mlflow") or {}).get("registered_model"),
        recommendation=parent["tags"].get("recommendation", ""),
        acceptance=AcceptanceCriteria.model_validate(summary["acceptance"]) if "acceptance" in summary else AcceptanceCriteria(),
        baseline=baseline_of(parent, summary, validated[0] if validated else None, uri),
        attempts=[attempt_row(r, uri) for r in recs["attempts"]])
