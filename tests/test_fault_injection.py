"""Issue 33's kill harness: `quantloop run` on the tiny model is killed (SIGKILL, through QUANTLOOP_FAULT, see
quantloop/faults.py) at every graph node boundary and in the middle of every kind of write, each time resuming
the same run, which the next point kills again; once it is interrupted with SIGINT (Ctrl-C) instead. After every
kill and every resume: no half-written file under a final name, no MLflow attempt recorded twice; at the end: the
decision of an uninterrupted run of the same policy, every attempt recorded once and FINISHED, no temporary left.
The whole chain shares one prepared model and one SLM folder (about 17 `quantloop run` processes)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import tiny_policy

ROOT = Path(__file__).resolve().parent.parent
STEPS = [{"name": "int4-q4_0", "spec": {"method": "gguf", "bits": 4, "gguf_type": "Q4_0"}},  # fails the 0.1 % bar
         {"name": "int4-rtn", "spec": {"method": "rtn", "bits": 4, "group_size": 32}},  # a transformers checkpoint
         {"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}]  # accepted
# in the order the run reaches them; each process is killed at its point, the next one resumes the run
KILL_POINTS = ["node:evaluate", "node:quantize", "write:gguf", "node:validate", "write:validation", "node:compare",
               "write:generations", "node:review", "node:track", "mlflow", "write:state", "write:checkpoint",
               "node:finish", "write:summary", "write:report"]
SIGINT_POINTS = {"node:finish": "write:validation"}  # before this kill point: a Ctrl-C at that one (attempt 1 validating)


def run_cmd(slm: Path, policy: Path, model: Path, dataset: Path, run_id: str, fault: str | None = None, signal_name: str = "KILL"):
    # the chain's knowledge store is its own (SLM/knowledge): the reference run's memory would skip the failed steps
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QUANTLOOP_FAULT", "QUANTLOOP_KNOWLEDGE")}
    env |= {"QUANTLOOP_SLM_DIR": str(slm), "TQDM_DISABLE": "1", "QUANTLOOP_FAULT_SIGNAL": signal_name}
    if fault:
        env["QUANTLOOP_FAULT"] = fault
    cmd = [sys.executable, "-m", "quantloop.pipelines.cli", "run", str(model), "--policy", str(policy), "--run-id", run_id,
           "--dataset", str(dataset)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_files(slm: Path) -> list[Path]:
    """Every file under a final name the run writes (outside MLflow's own store and the cache's links)."""
    out = []
    for p in sorted(slm.rglob("*")):
        if p.is_file() and ".tmp-" not in str(p) and "mlruns" not in p.parts and p.suffix in (".json", ".gguf", ".md", ".html"):
            out.append(p)
    return out


def check_complete(path: Path) -> None:
    """A file under its final name is whole: JSON parses, a GGUF's tensors all lie inside the file, text is not empty."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".gguf":
        from gguf import GGUFReader

        r = GGUFReader(path)
        end = max(t.data_offset + t.n_bytes for t in r.tensors)
        assert end <= path.stat().st_size, path
    else:
        assert path.stat().st_size > 0 and path.read_text().strip(), path


def mlflow_attempts(slm: Path, run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{slm}/mlflow.db")
    exp = client.get_experiment_by_name("quantloop")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`quantloop.run_id` = '{run_id}'")
    return [r for r in runs if r.data.tags.get("quantloop.attempt") != "parent"]


@pytest.mark.slow
def test_kill_at_every_point_then_resume(tiny_prepared, dataset_dir, tmp_path):
    from quantloop.pipelines.run import run_pipeline

    policy = tiny_policy(tmp_path, STEPS, measure_speed=True)
    slm = tmp_path / "SLM"
    reference = run_pipeline(tiny_prepared, policy, run_id="uninterrupted", tracking_uri=f"sqlite:///{slm}/mlflow.db",
                             dataset_dir=dataset_dir, output_root=slm / "models" / "quantized",
                             state_db=slm / "runs" / "langgraph_checkpoints.sqlite", memory=False)
    assert [a.verdict for a in reference.attempts] == ["fallback", "fallback", "accepted"]

    table = []
    for point in KILL_POINTS:
        if point in SIGINT_POINTS:  # Ctrl-C: one line, exit 130, the temporary removed on the way out
            done = run_cmd(slm, policy, tiny_prepared, dataset_dir, "killed", SIGINT_POINTS[point], "INT")
            assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == "quantloop: interrupted", done.stderr[-2000:]
            assert "Traceback" not in done.stderr
            assert not [p for p in slm.rglob("*") if ".tmp-" in p.name], "Ctrl-C left a temporary"
            table.append((f"{SIGINT_POINTS[point]} (SIGINT)", 130, len(final_files(slm)), len(mlflow_attempts(slm, "killed"))))
        done = run_cmd(slm, policy, tiny_prepared, dataset_dir, "killed", point)
        assert done.returncode == -signal.SIGKILL, f"{point} was not reached: rc {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        files = final_files(slm)
        for f in files:
            check_complete(f)
        records = mlflow_attempts(slm, "killed")
        indices = [r.data.tags["quantloop.attempt"] for r in records]
        assert len(indices) == len(set(indices)), f"{point}: an attempt recorded twice: {sorted(indices)}"
        table.append((point, -9, len(files), len(records)))

    done = run_cmd(slm, policy, tiny_prepared, dataset_dir, "killed")
    assert done.returncode == 0 and "ACCEPTED: int8-q8_0" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert "run id: killed (resumed" in done.stdout
    summary = json.loads((slm / "models" / "quantized" / "tiny" / "killed" / "quantization_summary.json").read_text())
    assert summary["decision"] == reference.decision == "accepted"
    assert [r["verdict"] for r in summary["attempts"]] == [a.verdict for a in reference.attempts]
    records = mlflow_attempts(slm, "killed")
    assert sorted(r.data.tags["quantloop.attempt"] for r in records) == ["0", "1", "2"]  # one record each, none doubled
    assert all(r.info.status == "FINISHED" for r in records)
    for f in final_files(slm):
        check_complete(f)
    assert not [p for p in slm.rglob("*") if ".tmp-" in p.name]  # no orphaned temporary
    assert (slm / "reports" / "killed" / "report.html").is_file()
    shared = json.loads((slm / "models" / "quantized" / "quantization_summary.json").read_text())
    assert [r["run_id"] for r in shared["models"]["tiny"]["runs"]] == ["uninterrupted", "killed"]
    table.append(("(final resume)", 0, len(final_files(slm)), len(records)))
    lines = ["| kill point | exit | files checked | MLflow attempt records |", "|---|---|---|---|"]
    lines += [f"| {p} | {rc} | {n} | {m} |" for p, rc, n, m in table]
    print("\n".join(lines))
    (tmp_path / "fault_table.md").write_text("\n".join(lines) + "\n")
    if os.environ.get("QUANTLOOP_FAULT_TABLE"):
        Path(os.environ["QUANTLOOP_FAULT_TABLE"]).write_text("\n".join(lines) + "\n")
