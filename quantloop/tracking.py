"""MLflow tracking: the one module that imports mlflow.

One parent run per pipeline run (tag quantloop.run_id), one nested run per attempt
(tag quantloop.attempt). Lookups by these tags make every call idempotent, so a
resumed run adds to its own records instead of duplicating them.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from quantloop import faults
from quantloop.errors import InputError
from quantloop.paths import SLM_DIR

EXPERIMENT = "quantloop"
RUN_TAG = "quantloop.run_id"
ATTEMPT_TAG = "quantloop.attempt"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri() -> str:
    return f"sqlite:///{(SLM_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any quantization work, when the tracking store cannot be reached."""
    scheme = urlparse(uri).scheme
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(db).execute("select 1").fetchone()
        except (OSError, sqlite3.Error) as e:
            raise InputError(uri, f"tracking store cannot be opened: {e}", "pass a writable --tracking-uri") from None
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            raise InputError(uri, f"tracking server cannot be reached: {reason}",
                             "start it (mlflow server) or pass another --tracking-uri / MLFLOW_TRACKING_URI") from None
    elif scheme not in ("", "file"):
        raise InputError(uri, f"tracking URI scheme '{scheme}' is not supported", "use sqlite:///PATH, http(s)://HOST:PORT or a folder")


PARAM_KEY = re.compile(r"^[\w\-. :/]+$")  # what MLflow accepts in a parameter name
PARAM_VALUE_MAX = 6000


def flatten(data, prefix: str = "") -> dict[str, object]:
    """Nested dicts as dotted keys. A dict whose keys MLflow would refuse in a name (regular expressions of a
    per-tensor map) stays one JSON value; one too long for a parameter becomes a count of its values."""
    if isinstance(data, dict) and prefix and not all(PARAM_KEY.match(str(k)) for k in data):
        text = json.dumps(data)
        if len(text) > PARAM_VALUE_MAX:
            counts = Counter(str(v) for v in data.values())
            text = json.dumps({"entries": len(data), "values": dict(counts.most_common()), "full": "quantization_config.json"})
        return {prefix: text}
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list):
        return {prefix: json.dumps(data)}
    return {prefix: data}


class Tracker:
    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient  # deferred: mlflow

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = self._experiment()

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        db = sqlite_path(self.uri)
        location = (db.parent / "mlruns").resolve().as_uri() if db is not None else None
        return self.client.create_experiment(EXPERIMENT, artifact_location=location)

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=10)
        return runs[0] if runs else None

    # ------------------------------------------------------------------ parent run

    def parent_run(self, run_id: str, params: dict) -> str:
        """The parent run of pipeline run `run_id`, created on first use."""
        found = self._find(f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{ATTEMPT_TAG}` = 'parent'")
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=run_id, tags={RUN_TAG: run_id, ATTEMPT_TAG: "parent"})
        self._log(run.info.run_id, params={k: str(v) for k, v in flatten(params).items()})
        return run.info.run_id

    def finish_parent(self, parent_id: str, decision: str, recommendation: str, files: list[Path], metrics: dict[str, float]) -> None:
        self.client.set_tag(parent_id, "decision", decision)
        if recommendation:
            self.client.set_tag(parent_id, "recommendation", recommendation[:5000])
        self._log(parent_id, metrics=metrics)
        for f in files:
            if f and Path(f).is_file():
                self.client.log_artifact(parent_id, str(f))
        self.client.set_terminated(parent_id, "FINISHED")

    # ------------------------------------------------------------------ attempts

    def log_attempt(self, parent_id: str, run_id: str, attempt, log_model_max_mib: float, extra_params: dict | None = None) -> str:
        """One nested run per attempt; an earlier, unfinished record of the same attempt is replaced. `extra_params`:
        what the acceptance criteria add (their numbers are in attempt.metrics already)."""
        found = self._find(f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{ATTEMPT_TAG}` = '{attempt.index}'")
        if found is not None:
            if found.info.status == "FINISHED":
                return found.info.run_id
            self.client.delete_run(found.info.run_id)
        run = self.client.create_run(self.experiment_id, run_name=f"{attempt.index}-{attempt.step}", tags={
            RUN_TAG: run_id, ATTEMPT_TAG: str(attempt.index), PARENT_TAG: parent_id,
            "decision": attempt.verdict or "", "reason": attempt.reason[:5000], "status": attempt.status, "step": attempt.step,
        })
        rid = run.info.run_id
        q = attempt.quantization
        params = {"step": attempt.step, "kind": attempt.kind, "checkpoint": attempt.checkpoint, "output_dir": attempt.output_dir or ""}
        if q is not None:
            params |= {f"spec.{k}": v for k, v in flatten(q.spec.model_dump(mode="json")).items()}
            cal = q.spec.calibration
            uses_calibration = q.spec.uses_calibration()
            params |= {"calibration.source": f"{cal.source}:{'+'.join([cal.dataset_dir or 'default', *cal.mix])}:{cal.split}" if uses_calibration else "none",
                       "calibration.size": f"{cal.samples}x{cal.seqlen} tokens" if uses_calibration else "0",
                       "calibration.manifest_sha256": q.calibration_manifest_sha256 or "",
                       "format": q.format, "model_path": q.model_path}
        if attempt.note:
            params["note"] = attempt.note[:6000]
        params |= extra_params or {}
        metrics = dict(attempt.metrics)
        if q is not None:
            metrics |= {"quantize.wall_s": q.wall_s, "quantize.peak_rss_bytes": q.peak_rss_bytes, "quantize.bytes_on_disk": q.bytes_on_disk}
        metrics["attempt.wall_s"] = attempt.wall_s
        self._log(rid, params={k: str(v) for k, v in params.items()}, metrics=metrics)
        faults.point("mlflow")  # the kill test's point: a record half-logged, replaced when the run resumes
        if attempt.output_dir:
            out = Path(attempt.output_dir)
            for name in ("quantization_config.json", "validation_report.json", "generations.md"):
                if (out / name).is_file():
                    self.client.log_artifact(rid, str(out / name))
            if q is not None:
                self._log_model(rid, Path(q.model_path), log_model_max_mib)
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def _log_model(self, rid: str, model_path: Path, max_mib: float) -> None:
        files = [model_path] if model_path.is_file() else [p for p in model_path.rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        if total <= max_mib * 2**20:
            if model_path.is_file():
                self.client.log_artifact(rid, str(model_path), "model")
            else:
                self.client.log_artifacts(rid, str(model_path), "model")
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "model_path.txt"
            p.write_text(f"{model_path}\n{total} bytes (over the {max_mib} MiB logging limit; not copied)\n")
            self.client.log_artifact(rid, str(p), "model")

    def _log(self, rid: str, params: dict | None = None, metrics: dict | None = None) -> None:
        from mlflow.entities import Metric, Param  # deferred: mlflow

        now = int(time.time() * 1000)
        p = [Param(k[:250], v[:6000]) for k, v in (params or {}).items()]
        m = [Metric(k[:250], float(v), now, 0) for k, v in (metrics or {}).items() if v is not None and v == v]
        for i in range(0, max(len(p), 1), 100):
            if p[i:i + 100]:
                self.client.log_batch(rid, params=p[i:i + 100])
        for i in range(0, len(m), 1000):
            self.client.log_batch(rid, metrics=m[i:i + 1000])

    # ------------------------------------------------------------------ registry

    def register(self, name: str, attempt_run_id: str, model_path: str, description: str, tags: dict[str, str]) -> str:
        """Register the accepted model; returns 'name/version'. Idempotent per attempt run."""
        from mlflow.exceptions import MlflowException  # deferred: mlflow

        try:
            self.client.create_registered_model(name, description="quantized models accepted by quantloop")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        for v in self.client.search_model_versions(f"name = '{name}'"):
            if v.run_id == attempt_run_id:
                return f"{name}/{v.version}"
        arts = {a.path for a in self.client.list_artifacts(attempt_run_id, "model")}
        run = self.client.get_run(attempt_run_id)
        source = f"{run.info.artifact_uri}/model" if arts else Path(model_path).resolve().as_uri()
        v = self.client.create_model_version(name, source=source, run_id=attempt_run_id, tags=tags, description=description[:5000])
        return f"{name}/{v.version}"


# ---------------------------------------------------------------------- review: reading a run back, logging its report


def _run_record(run) -> dict:
    return {"run_id": run.info.run_id, "status": run.info.status, "start_ms": run.info.start_time,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics)}


def pipeline_run_records(uri: str, run_id: str) -> dict:
    """The MLflow records of pipeline run `run_id`: {'parent': record, 'attempts': [record, ...]} (attempts in order),
    each record {run_id, status, start_ms, tags, params, metrics}. Opens an existing store only; never creates one."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise InputError(uri, "no tracking store there", "pass the --tracking-uri the run was made with")
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get(ATTEMPT_TAG) == "parent"]
    if not parents:
        raise InputError(None, f"no run '{run_id}' in the tracking store {uri}", "pass a run id that `quantloop run` printed")
    attempts = sorted((r for r in runs if r.data.tags.get(ATTEMPT_TAG, "").isdigit()), key=lambda r: int(r.data.tags[ATTEMPT_TAG]))
    return {"parent": _run_record(parents[0]), "attempts": [_run_record(r) for r in attempts]}


def read_artifact_text(uri: str, mlflow_run_id: str, path: str) -> str | None:
    """The text of one artifact of a run, or None when the run has no such artifact."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient  # deferred: mlflow

    client = MlflowClient(tracking_uri=uri)
    parent = str(Path(path).parent) if "/" in path else None
    if path not in {a.path for a in client.list_artifacts(mlflow_run_id, parent)}:
        return None
    with tempfile.TemporaryDirectory() as d:
        return Path(client.download_artifacts(mlflow_run_id, path, d)).read_text(encoding="utf-8")


def log_report_artifacts(uri: str, mlflow_run_id: str, files: list[Path], artifact_path: str = "report") -> None:
    """Attach the run report (HTML, Markdown, plot PNGs) to a run; a file logged again replaces the earlier copy."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow

    client = MlflowClient(tracking_uri=uri)
    for f in files:
        sub = artifact_path if Path(f).suffix != ".png" else f"{artifact_path}/plots"
        client.log_artifact(mlflow_run_id, str(f), sub)
