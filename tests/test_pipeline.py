"""The agent loop (issue 5) on the tiny random Llama: fallback chain, MLflow records, resume after kill -9."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import run_tiny, tiny_policy
from quantloop.agents.policy import load_policy
from quantloop.errors import InputError
from quantloop.pipelines.cli import main as run_main
from quantloop.pipelines.run import run_pipeline
from quantloop.schemas import quant_spec

ROOT = Path(__file__).resolve().parent.parent


def gguf_step(name: str, gguf_type: str, bits: int) -> dict:
    return {"name": name, "spec": {"method": "gguf", "bits": bits, "gguf_type": gguf_type}}


QAT_STEP = {"name": "qat-int4", "kind": "qat", "spec": {"method": "qat", "gguf_type": "Q4_0", "qat_steps": 4,
                                                         "calibration": {"source": "synthetic", "samples": 8, "seqlen": 64}}}
NEXT_CHECKPOINT = {"name": "next-checkpoint", "kind": "next_checkpoint"}


# ------------------------------------------------------------------------- policy (no model needed)


def spec_bar(acceptance_path, bits: int) -> float:
    from quantloop.specs import load_quality_spec

    return load_quality_spec(acceptance_path).acceptance.min_size_ratio[bits]


def test_default_policy_tries_the_strongest_int4_first_and_decides_in_time():
    policy, spec = load_policy()
    names = [s.name for s in policy.plan_steps()]
    assert names[:2] == ["int4-qat-iq4nl", "int4-awq"] and names[-1] == "next-checkpoint"
    assert names.index("int8-gguf-q8_0") < names.index("int4-gptq-4x-calib")
    steps = {s.name: s for s in policy.plan_steps()}
    first = steps["int4-qat-iq4nl"].spec
    # QAT trains for what the run's time leaves after what must still fit (measured step costs, else reserve_minutes)
    assert first.method == "qat" and first.qat_init == "gptq" and first.qat_max_minutes is None
    assert steps["int4-gptq-4x-calib"].spec.calibration.samples == 4 * first.calibration.samples
    # INT4 is the whole file: the embedding on the 4-bit grid too, and a budget that meets the INT4 size bar
    assert first.layer_types["embeddings"] == "IQ4_NL" and first.min_size_ratio == spec_bar(spec, 4)
    # the steps the run starts, by their expected minutes, end within max_minutes: QAT, then Q8_0
    assert policy.max_minutes is not None
    assert steps["int4-qat-iq4nl"].expect_minutes + steps["int8-gguf-q8_0"].expect_minutes <= policy.max_minutes
    assert policy.reserve_minutes >= steps["int8-gguf-q8_0"].expect_minutes  # the reserve keeps Q8_0's step
    assert spec.name == "acceptance.yaml"
    cuda, _ = load_policy(target="cuda")
    assert cuda.target == "cuda" and all(s.spec is None or s.spec.method != "gguf" for s in cuda.plan_steps())


def test_data_free_policy_calibrates_every_step_on_synthetic_text():
    policy, _ = load_policy()
    free = policy.data_free()
    calibrated = [s for s in free.plan_steps() if s.spec is not None and s.spec.uses_calibration()]
    assert {s.name for s in calibrated} >= {"int4-qat-iq4nl", "int4-gptq-4x-calib"}
    assert all(s.spec.calibration.source == "synthetic" and s.spec.tag().endswith("-synth") for s in calibrated)
    assert all(s.spec.calibration.source == "dataset" for s in policy.plan_steps() if s.spec is not None)  # a copy
    q8 = next(s for s in free.plan_steps() if s.name == "int8-gguf-q8_0")
    assert not q8.spec.uses_calibration() and q8.spec.tag() == "gguf-q8_0"


@pytest.mark.parametrize("steps, field", [
    ([{"name": "x", "spec": {"method": "magic"}}], "steps.cpu.0.spec.method"),
    ([{"name": "x", "spec": {"method": "gguf", "bitz": 4}}], "steps.cpu.0.spec.bitz"),
    ([{"name": "x", "kind": "quantize"}], "steps.cpu.0"),
    ([{"name": "x", "kind": "qat", "spec": {"method": "gguf", "gguf_type": "Q4_0"}}], "steps.cpu.0"),
])
def test_bad_policy_names_the_field(tmp_path, steps, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        load_policy(tiny_policy(tmp_path, steps))


def test_bad_policy_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("target: [unclosed\n")
    assert run_main(["run", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid YAML" in err


def test_missing_acceptance_spec_is_one_line_exit_2(tmp_path, capsys):
    assert run_main(["run", "--spec", str(tmp_path / "nope.yaml"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "acceptance spec not found" in err and not (tmp_path / "m.db").exists()


def test_folder_without_checkpoints_is_rejected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_main(["run", str(tmp_path / "empty"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_before_any_work(tiny_prepared, dataset_dir, tmp_path):
    policy = tiny_policy(tmp_path, [gguf_step("int8", "Q8_0", 8)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot be reached"):
        run_pipeline(tiny_prepared, policy, tracking_uri=f"http://127.0.0.1:{port}", dataset_dir=dataset_dir,
                     output_root=tmp_path / "out", state_db=tmp_path / "state.sqlite")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists() and not (tmp_path / "state.sqlite").exists()


# ------------------------------------------------------------------------- the loop, in process


@pytest.mark.slow
def test_fallback_chain_in_order_with_reasons_and_mlflow_records(tiny_prepared, dataset_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), QAT_STEP, gguf_step("int8-q8_0", "Q8_0", 8), NEXT_CHECKPOINT])
    printed = []
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, on_attempt=lambda a, resumed: printed.append(a.step))
    assert [a.step for a in state.attempts] == ["int4-q4_0", "qat-int4", "int8-q8_0"] == printed
    assert [a.verdict for a in state.attempts] == ["fallback", "fallback", "accepted"]
    q4, qat, q8 = state.attempts
    assert q4.reason.startswith("int4-q4_0 fails on perplexity +") and "next: qat-int4" in q4.reason
    # QAT really ran (4 steps, data-free): its GGUF was validated like any other attempt
    assert qat.reason.startswith("qat-int4 fails on") and qat.quantization.format == "gguf:Q4_0"
    qat_files = {p.name for p in Path(qat.output_dir).iterdir()}
    assert {"qat_result.json", "config.json", "validation_report.json"} <= qat_files and any(f.endswith(".gguf") for f in qat_files)
    assert qat.quantization.calibration_manifest_sha256 and "-synth" in qat.output_dir
    assert state.decision == "accepted" and state.accepted_index == 2

    out = tmp_path / "quantized" / "tiny" / "r1" / "2-tiny_gguf-q8_0"  # the run's own folder, one per attempt
    assert {p.name for p in out.iterdir()} == {"tiny-q8_0.gguf", "quantization_config.json", "validation_report.json", "generations.md",
                                             "llama-quantize.log"}  # llama.cpp's own log of the quantization
    summary = json.loads((tmp_path / "quantized" / "tiny" / "r1" / "quantization_summary.json").read_text())
    assert summary == json.loads((tmp_path / "quantized" / "quantization_summary.json").read_text())["models"]["tiny"]["latest"]
    assert [r["verdict"] for r in summary["attempts"]] == ["fallback", "fallback", "accepted"]
    assert summary["acceptance"]["max_ppl_increase_pct"] == 0.1 and summary["accepted"]["output_dir"] == str(out)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("quantloop")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_id == state.mlflow_parent_run_id)
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["quantloop.attempt"]))
    assert [r.data.tags["decision"] for r in children] == ["fallback", "fallback", "accepted"]
    assert parent.data.tags["decision"] == "accepted"
    q8_run = children[2]
    assert q8_run.data.params["spec.gguf_type"] == "Q8_0" and q8_run.data.params["checkpoint"] == str(tiny_prepared)
    report = json.loads((out / "validation_report.json").read_text())
    assert q8_run.data.metrics["kld.kld_mean"] == pytest.approx(report["kld"]["kld_mean"])
    assert q8_run.data.metrics["size_ratio"] == pytest.approx(report["size_ratio"])
    arts = {a.path for a in client.list_artifacts(q8_run.info.run_id)}
    assert {"quantization_config.json", "validation_report.json", "generations.md", "model"} <= arts
    assert [a.path for a in client.list_artifacts(q8_run.info.run_id, "model")] == ["model/tiny-q8_0.gguf"]
    versions = client.search_model_versions("name = 'quantloop-tiny'")
    assert [v.run_id for v in versions] == [q8_run.info.run_id] and state.registered_model == "quantloop-tiny/1"

    # the same run id again: nothing is redone, nothing is logged twice
    again = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    assert [a.mlflow_run_id for a in again.attempts] == [a.mlflow_run_id for a in state.attempts]
    assert len(client.search_runs([exp.experiment_id])) == 4

    # a run id that belongs to another model
    other = tmp_path / "other"
    shutil.copytree(tiny_prepared, other)
    with pytest.raises(InputError, match="belongs to a run on"):
        run_tiny(tmp_path, other, dataset_dir, policy)


def test_exhausted_plan_is_rejected_with_a_recommendation(tiny_prepared, dataset_dir, tmp_path):
    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), NEXT_CHECKPOINT], measure_speed=False, size_ratio=100.0)
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    assert [a.verdict for a in state.attempts] == ["fallback", "skipped"]
    assert "speed not measured" in state.attempts[0].reason and "size" in state.attempts[0].reason
    assert "no other checkpoint" in state.attempts[1].reason
    assert state.decision == "rejected" and "size falls short" in state.recommendation
    assert state.registered_model is None


def test_resume_refuses_an_acceptance_spec_whose_content_changed(tiny_prepared, dataset_dir, tmp_path):
    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4)], measure_speed=False, size_ratio=100.0)
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    assert state.decision == "rejected" and len(state.acceptance_sha256) == 64
    assert run_tiny(tmp_path, tiny_prepared, dataset_dir, policy).attempts == state.attempts  # same content: resumes, redoes nothing
    spec = tmp_path / "acceptance.yaml"
    spec.write_text(spec.read_text().replace("max_ppl_increase_pct: 0.1", "max_ppl_increase_pct: 50.0"))  # same path, another bar
    with pytest.raises(InputError, match="acceptance spec changed since run 'r1' started"):
        run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)


def test_step_that_cannot_meet_the_size_bar_is_skipped_before_quantizing(tiny_prepared, dataset_dir, tmp_path):
    """An exact export's file size follows from its GGUF type alone: a step that cannot meet the size bar costs nothing."""
    rtn = {"name": "int4-rtn-q4_0", "spec": {"method": "rtn", "bits": 4, "group_size": 32, "gguf_type": "Q4_0"}}
    policy = tiny_policy(tmp_path, [rtn, QAT_STEP, gguf_step("int8-q8_0", "Q8_0", 8)], measure_speed=False, size_ratio=100.0)
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    assert [a.verdict for a in state.attempts] == ["skipped", "skipped", "rejected"]
    for a in state.attempts[:2]:
        assert a.status == "skipped" and a.output_dir is None and "known before quantizing" in a.reason
        assert "(needs >= 100.0x at 4 bits)" in a.reason and "Q4_0 file is" in a.reason
    assert not (tmp_path / "quantized" / "tiny" / "r1" / "0-tiny_rtn-w4g32").exists()
    assert state.attempts[2].status == "validated"  # llama-quantize's own types are measured, not predicted


def test_best_of_several_checkpoints_and_next_checkpoint_plan(tiny_prepared, dataset_dir, tmp_path):
    from quantloop.agents.evaluation import EvaluationAgent
    from quantloop.agents.state import PipelineState

    folder = tmp_path / "checkpoints"
    for step in (100, 200):
        shutil.copytree(tiny_prepared, folder / f"step_{step}")
    policy_file = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), gguf_step("int8-q8_0", "Q8_0", 8),
                                         {**NEXT_CHECKPOINT, "retry": ["int8-q8_0"]}], measure_speed=False)
    policy, spec = load_policy(policy_file)
    state = PipelineState(run_id="x", model=str(folder), target="cpu", policy=policy, acceptance_spec=str(spec),
                          dataset_dir=str(dataset_dir), output_root=str(tmp_path / "q"))
    update = EvaluationAgent()(state)
    ranked = update["candidates"]
    assert [c.training_step for c in ranked] == [200, 100]  # equal perplexity: the later checkpoint first
    assert ranked[0].validation_ppl.ppl == pytest.approx(ranked[1].validation_ppl.ppl) and ranked[0].validation_ppl.chunks == 1
    plan = update["plan"]
    assert [(p.step, Path(p.checkpoint).name) for p in plan] == [
        ("int4-q4_0", "step_200"), ("int8-q8_0", "step_200"), ("int8-q8_0@checkpoints-step_100", "step_100")]
    assert Path(plan[2].output_dir).name == "2-checkpoints-step_100_gguf-q8_0"


# ------------------------------------------------------------------------- a real MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_a_real_mlflow_server(tiny_prepared, dataset_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        policy = tiny_policy(tmp_path, [gguf_step("int8-q8_0", "Q8_0", 8)])
        state = run_pipeline(tiny_prepared, policy, run_id="srv", tracking_uri=uri, dataset_dir=dataset_dir,
                             output_root=tmp_path / "quantized", state_db=tmp_path / "state.sqlite")
        assert state.decision == "accepted"
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("quantloop")
        runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
        child = runs[state.attempts[0].mlflow_run_id]
        assert child.data.tags["mlflow.parentRunId"] == state.mlflow_parent_run_id and child.data.tags["decision"] == "accepted"
        assert child.data.metrics["kld.ppl_increase_pct"] < 0.1
        local = client.download_artifacts(child.info.run_id, "validation_report.json", str(tmp_path / "dl"))
        assert json.loads(Path(local).read_text())["passed"] is True
        assert (tmp_path / "server-artifacts").is_dir()  # uploaded through the server
        [version] = client.search_model_versions("name = 'quantloop-tiny'")
        assert version.run_id == child.info.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


# ------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
def test_killed_run_resumes_after_the_last_completed_attempt(tiny_prepared, dataset_dir, tmp_path):
    """Killed while attempt 1 is being validated: the restart validates it again without quantizing it again."""
    from mlflow.tracking import MlflowClient

    # every step fails on size, so the run walks the whole plan; we kill it while attempt 1 is being validated
    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), gguf_step("int5-q5_0", "Q5_0", 5),
                                    gguf_step("int8-q8_0", "Q8_0", 8)], size_ratio=100.0)
    slm = tmp_path / "SLM"
    env = {**os.environ, "QUANTLOOP_SLM_DIR": str(slm), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "quantloop.pipelines.cli", "run", str(tiny_prepared), "--policy", str(policy),
           "--run-id", "killme", "--dataset", str(dataset_dir)]
    out = slm / "models" / "quantized"
    first, second = out / "tiny" / "killme" / "0-tiny_gguf-q4_0", out / "tiny" / "killme" / "1-tiny_gguf-q5_0"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        while not lines or not lines[-1].startswith("[1] int5-q5_0: quantized in"):  # validation of attempt 1 starts
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        time.sleep(0.3)
        assert not (second / "validation_report.json").exists()  # still validating
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    first_log = "".join(lines) + proc.stdout.read()
    assert "[0] int4-q4_0  gguf" in first_log and "[1] int5-q5_0  gguf" not in first_log
    q4_stamp = (first / "quantization_config.json").stat().st_mtime_ns
    report_stamp = (first / "validation_report.json").stat().st_mtime_ns
    q5_stamp = (second / "quantization_config.json").stat().st_mtime_ns
    q5_model_stamp = max(p.stat().st_mtime_ns for p in second.glob("*.gguf"))

    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 1, done.stdout  # rejected: every step fails on size
    assert "run id: killme (resumed" in done.stdout
    assert "[0] int4-q4_0" in done.stdout and "(done before the restart)" in done.stdout
    assert "[1] int5-q5_0: quantized before the restart; validating" in done.stdout
    assert "[1] int5-q5_0" in done.stdout and "[2] int8-q8_0" in done.stdout
    # attempt 0 was not redone; attempt 1 was validated again but not quantized again; nothing half-written is left
    assert (first / "quantization_config.json").stat().st_mtime_ns == q4_stamp
    assert (first / "validation_report.json").stat().st_mtime_ns == report_stamp
    assert (second / "quantization_config.json").stat().st_mtime_ns == q5_stamp
    assert max(p.stat().st_mtime_ns for p in second.glob("*.gguf")) == q5_model_stamp
    assert (second / "validation_report.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    summary = json.loads((out / "tiny" / "killme" / "quantization_summary.json").read_text())
    assert [r["step"] for r in summary["attempts"]] == ["int4-q4_0", "int5-q5_0", "int8-q8_0"]
    assert summary["decision"] == "rejected"

    client = MlflowClient(f"sqlite:///{slm}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("quantloop").experiment_id])
    attempts = sorted(r.data.tags["quantloop.attempt"] for r in runs)
    assert attempts == ["0", "1", "2", "parent"]  # one record per attempt, none lost, none doubled
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_checkpoint_selection_and_next_checkpoint_fallback(trained_checkpoints, dataset_dir, tmp_path):
    """A folder of trained step_N checkpoints: the best by validation perplexity is quantized first, the runner-up next."""
    manifest = json.loads((trained_checkpoints / "training_manifest.json").read_text())
    assert len(manifest["checkpoints"]) == 3
    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), {**NEXT_CHECKPOINT, "retry": ["int4-q4_0"]}],
                         measure_speed=False, size_ratio=100.0)  # a size bar no model meets: the whole plan runs
    state = run_tiny(tmp_path, trained_checkpoints, dataset_dir, policy)
    ppl = [c.validation_ppl.ppl for c in state.candidates]
    assert len(ppl) == 3 and ppl == sorted(ppl)
    assert state.candidates[0].name.startswith(trained_checkpoints.name + "-step_")
    assert [a.step for a in state.attempts] == ["int4-q4_0", f"int4-q4_0@{state.candidates[1].name}"]
    assert [a.checkpoint for a in state.attempts] == [state.candidates[0].path, state.candidates[1].path]
    assert all(a.status == "validated" and a.verdict in ("fallback", "rejected") for a in state.attempts)
    assert state.decision == "rejected"


class CrashingBackend:
    """Registered for one run: GPTQ with seed 999 crashes inside the (installed) quantizer."""

    def __init__(self):
        from quantloop.backends.base import Backend, Needs

        class Crash(Backend):
            method = "gptq"

            def handles(self, spec):
                return spec.seed == 999

            def needs(self, spec):
                return Needs()

            def quantize(self, job):
                raise RuntimeError("index 7 is out of bounds for dimension 0 with size 4")

        self.backend = Crash()


def test_a_crashing_quantizer_is_recorded_as_failed_and_named_in_the_recommendation(tiny_prepared, dataset_dir, tmp_path):
    from quantloop.backends.base import register, unregister

    crash = register(CrashingBackend().backend)
    try:
        policy = tiny_policy(tmp_path, [{"name": "int4-gptq-crash", "spec": {"method": "gptq", "seed": 999}},
                                        gguf_step("int4-q4_0", "Q4_0", 4)], measure_speed=False, size_ratio=100.0)
        state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    finally:
        unregister(crash)
    first = state.attempts[0]
    assert first.status == "failed" and first.verdict == "fallback"
    assert "RuntimeError: index 7 is out of bounds" in first.reason and "next: int4-q4_0" in first.reason
    assert state.attempts[1].status == "validated" and state.decision == "rejected"
    assert "A quantizer crashed" in state.recommendation and "int4-gptq-crash" in state.recommendation


def test_spec_fields_a_backend_does_not_apply_are_refused(tiny_prepared, tmp_path):
    from quantloop.tools.quantize import quantize_model

    with pytest.raises(InputError, match="does not apply per-module 'overrides'"):
        quantize_model(tiny_prepared, tmp_path / "o", quant_spec(method="rtn", group_size=32, overrides={"q_proj": {"bits": 8}}))
    with pytest.raises(InputError, match="does not apply 'skip_modules'"):
        quantize_model(tiny_prepared, tmp_path / "s", quant_spec(method="gguf", gguf_type="Q8_0", skip_modules=["model.layers.0"]))
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_the_default_outputs_leaves_git_status_clean(tiny_prepared, dataset_dir, tmp_path):
    """quantloop run writing where `make run` writes (SLM/ of the checkout: graph state, MLflow store, quantized
    models, summary) leaves nothing that git would track."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "SLM"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    policy = tiny_policy(tmp_path, [gguf_step("int8-q8_0", "Q8_0", 8)], measure_speed=False, size_ratio=1.0, max_ppl_pct=50.0)
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTLOOP_SLM_DIR", "MLFLOW_TRACKING_URI")} | {"TQDM_DISABLE": "1"}
    run_id = f"git-clean-{os.getpid()}"
    done = subprocess.run([sys.executable, "-m", "quantloop.pipelines.cli", "run", str(tiny_prepared), "--policy", str(policy),
                           "--run-id", run_id, "--dataset", str(dataset_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = ROOT / "SLM" / "models" / "quantized" / "tiny" / run_id
    try:
        assert done.returncode == 1 and "REJECTED" in done.stdout, done.stdout + done.stderr  # speed not measured: rejected
        assert (out / "0-tiny_gguf-q8_0" / "validation_report.json").is_file() and (ROOT / "SLM" / "runs").is_dir()
        assert (ROOT / "SLM" / "reports" / run_id / "report.html").is_file()
        after = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "SLM"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
        assert after == before, after
    finally:
        shutil.rmtree(out, ignore_errors=True)
        for entry in (ROOT / "SLM" / "models" / "quantized" / ".cache").glob("*/entry.json"):  # its cache entry too
            if json.loads(entry.read_text())["first_made_for"].startswith(str(out)):
                shutil.rmtree(entry.parent, ignore_errors=True)
        shutil.rmtree(ROOT / "SLM" / "reports" / run_id, ignore_errors=True)


def test_steps_after_the_time_budget_are_skipped_with_the_reason(tiny_prepared, dataset_dir, tmp_path):
    """max_minutes: once the run has spent its time, the remaining steps are skipped (named), and the run decides;
    a past_budget step (the Q8_0 safety net) is tried all the same."""
    safety_net = gguf_step("int8-q8_0", "Q8_0", 8) | {"past_budget": True}
    policy = tiny_policy(tmp_path, [gguf_step("int4-q4_0", "Q4_0", 4), safety_net, NEXT_CHECKPOINT], measure_speed=False,
                         size_ratio=1.0)
    doc = yaml.safe_load(policy.read_text())
    policy.write_text(yaml.safe_dump(doc | {"max_minutes": 1e-4}))  # spent by the checkpoint's evaluation alone
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    assert state.attempts[0].status == "skipped" and state.attempts[0].output_dir is None
    assert "time budget of 0.0001 min is spent" in state.attempts[0].reason
    assert state.attempts[1].status == "validated" and state.attempts[1].step == "int8-q8_0"
    assert state.decision == ("accepted" if state.attempts[1].passed else "rejected")
