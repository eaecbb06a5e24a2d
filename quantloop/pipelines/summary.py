"""quantization_summary.json, twice: the run's own (RUN_DIR/quantization_summary.json: every attempt of the run
side by side, the decision, the acceptance bar; attached to the MLflow parent run), and the shared one at the
output root (OUTPUT_ROOT/quantization_summary.json), which keeps every model's latest run side by side, keyed by
model, with the ids of all its runs. Several runs update the shared one at once: each reads, changes and writes
it back under a lock, atomically, so none loses another's rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quantloop.agents.state import PipelineState
from quantloop.eval.criteria.base import summary_fields
from quantloop.fileio import write_json_atomic
from quantloop.locks import shared_file_lock
from quantloop.specs import load_quality_spec

SUMMARY_NAME = "quantization_summary.json"


def summary(state: PipelineState) -> dict:
    """The run's summary: every attempt of the run side by side, the decision, the acceptance bar."""
    rows = []
    for a in state.attempts:
        m = a.metrics
        rows.append({
            "index": a.index, "step": a.step, "kind": a.kind, "method": a.method, "bits": a.bits, "checkpoint": a.checkpoint,
            "status": a.status, "verdict": a.verdict, "reason": a.reason, "output_dir": a.output_dir, "report": a.report_path,
            "format": a.quantization.format if a.quantization else None,
            **summary_fields(m),  # each criterion's fields, in the registry's order
            "bits_per_weight": a.quantization.bits_per_weight if a.quantization else None,
            "quantize_wall_s": a.quantization.wall_s if a.quantization else None, "attempt_wall_s": a.wall_s,
            "mlflow_run_id": a.mlflow_run_id,
        })
    accepted = state.attempts[state.accepted_index] if state.accepted_index is not None else None
    return {
        "run_id": state.run_id, "model": state.model, "target": state.target, "decision": state.decision,
        "accepted": {"step": accepted.step, "output_dir": accepted.output_dir, "report": accepted.report_path} if accepted else None,
        "recommendation": state.recommendation or None,
        "acceptance": load_quality_spec(state.acceptance_spec).acceptance.model_dump(mode="json"),
        "acceptance_spec": state.acceptance_spec,
        "checkpoints": [{"name": c.name, "path": c.path, "training_step": c.training_step, "validation_ppl": c.validation_ppl.ppl, "wall_s": c.wall_s,
                         "bytes_on_disk": c.size.bytes_on_disk,
                         "tg_tokens_per_s": c.speed.tg_tokens_per_s if c.speed else None} for c in state.candidates],
        "attempts": rows,
        "mlflow": {"parent_run_id": state.mlflow_parent_run_id, "registered_model": state.registered_model},
        "active_s": round(state.active_s, 2),
        "time": {k: round(v, 4) for k, v in state.time_breakdown().items()},
    }


def run_folder(state: PipelineState) -> Path:
    """The run's own folder (a run started before runs had one: OUTPUT_ROOT/runs/RUN_ID)."""
    return Path(state.run_dir) if state.run_dir else Path(state.output_root) / "runs" / state.run_id


def model_key(state: PipelineState) -> str:
    return Path(state.run_dir).parent.name if state.run_dir else Path(state.model).name


def read_shared(path: Path) -> dict:
    """The shared summary; one written before it was shared (a single run's summary) becomes its model's entry."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"models": {}}
    if "models" in data:
        return data
    if "run_id" in data:
        name = Path(data.get("model", "unknown")).name
        return {"models": {name: {"latest": data, "runs": [{"run_id": data["run_id"], "decision": data.get("decision")}]}}}
    return {"models": {}}


def update_shared(path: Path, key: str, run: dict, run_summary: Path) -> dict:
    """Put `run` in as model `key`'s latest run and add it to the model's list of runs, under the file's lock."""
    with shared_file_lock(path):
        data = read_shared(path)
        entry = data["models"].setdefault(key, {"latest": None, "runs": []})
        entry["runs"] = [r for r in entry["runs"] if r.get("run_id") != run["run_id"]] + [
            {"run_id": run["run_id"], "decision": run["decision"], "summary": str(run_summary), "finished_unix": round(time.time(), 1)}]
        entry["latest"] = run
        write_json_atomic(path, data, fault="summary")
    return data


def write_summaries(state: PipelineState) -> Path:
    """Write the run's own summary, then update the shared one. Returns the run's own."""
    run = summary(state)
    own = write_json_atomic(run_folder(state) / SUMMARY_NAME, run, fault="summary")
    update_shared(Path(state.output_root) / SUMMARY_NAME, model_key(state), run, own)
    return own
