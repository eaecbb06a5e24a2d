"""`quantloop run`: the agent loop end to end, resumable by --run-id.

Wire it into the main CLI with `add_run_command(sub)`; `python -m quantloop.pipelines.cli`
runs it on its own.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from quantloop.agents.evaluation import find_checkpoints
from quantloop.agents.policy import load_policy
from quantloop.agents.state import PipelineState
from quantloop.data.datasets import dataset_dir_or_default, prepared_dataset_dirs
from quantloop.errors import InputError
from quantloop.eval.criteria.base import bar_text, row_cells
from quantloop.fileio import sha256_file, sweep_temporaries
from quantloop.locks import RunLock
from quantloop.names import check_name, check_run_id, under
from quantloop.knowledge import KnowledgeStore
from quantloop.paths import (
    DEFAULT_MODEL_DIR,
    OFFGRID_MODEL_DIR,
    QUANTIZED_DIR,
    SLM_DIR,
    default_model_dir,
)
from quantloop.pipelines.report_format import table
from quantloop.report import REPORTS_DIR, write_run_report
from quantloop.specs import load_quality_spec
from quantloop.tracking import Tracker, check_reachable, resolve_tracking_uri

STATE_DB_NAME = "runs/langgraph_checkpoints.sqlite"
LOCKS_NAME = "locks"  # beside the state database: one lock file per live run id


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_policy_texts(policy) -> None:
    """Every dataset the policy names (held-out test text, calibration mixes) is prepared: checked before any work."""
    prepared_dataset_dirs(policy.validation.held_out)
    for step in policy.plan_steps():
        if step.spec is not None and step.spec.uses_calibration() and step.spec.calibration.source == "dataset":
            prepared_dataset_dirs(step.spec.calibration.mix)


def run_pipeline(model: str | Path | None = None, policy_file: str | Path | None = None, target: str | None = None,
                 run_id: str | None = None, tracking_uri: str | None = None, data_free: bool = False,
                 dataset_dir: str | Path | None = None, output_root: str | Path | None = None, state_db: str | Path | None = None,
                 on_attempt: Callable | None = None, on_start: Callable | None = None, spec_file: str | Path | None = None,
                 on_progress: Callable | None = None, memory: bool = True, on_memory: Callable | None = None,
                 full_report: bool = False):
    """Run (or resume, with the same run_id) the loop. Returns the final PipelineState.

    on_attempt(attempt, resumed) after each attempt is reviewed and tracked; on_progress(node, state) after
    every node, with the whole state (for a line when the next step starts).

    The run id (docs/run-safety.md) is checked first, before anything is read or written; the run holds its
    run id's lock until it returns, so a second run with the id of a live one is refused."""
    run_id = check_run_id(run_id) if run_id is not None else new_run_id()
    policy, spec_path = load_policy(policy_file, target)
    if spec_file is not None:  # another acceptance bar; part of the policy, so a resumed run must use it too
        spec_path = Path(spec_file).resolve()
        if not spec_path.is_file():
            raise InputError(spec_path, "acceptance spec not found", "pass a YAML file such as specs/acceptance.yaml")

        load_quality_spec(spec_path)  # validated before any work
        policy = policy.model_copy(update={"acceptance_spec": str(spec_path)})
    if data_free:  # calibration from the model's own generations; the test split is only used to validate
        policy = policy.data_free()
    if not memory:  # --no-memory: part of the policy, so a resumed run keeps it
        policy = policy.model_copy(update={"memory": False})
    if full_report:  # --full-report: the same
        policy = policy.model_copy(update={"validation": policy.validation.model_copy(update={"full_report": True})})
    model_path = Path(model) if model else default_model_dir()
    find_checkpoints(model_path)  # a folder without checkpoints fails here, before anything else
    model_path = model_path.resolve()
    model_name = check_name(model_path.name if model_path.is_dir() else model_path.stem, "model name",
                            "rename the model folder: it names the run's output folder")
    dataset = dataset_dir_or_default(str(dataset_dir) if dataset_dir else None).resolve()
    if not (dataset / "manifest.json").is_file():
        raise InputError(dataset, "not a prepared dataset (no manifest.json)", "run `quantloop prepare` first")
    check_policy_texts(policy)


    root = Path(output_root or QUANTIZED_DIR).resolve()
    run_dir = under(root, model_name, run_id, what="run folder")
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)  # fail fast: before any quantization work
    db = Path(state_db) if state_db else SLM_DIR / STATE_DB_NAME
    with RunLock(db.parent / LOCKS_NAME, run_id):
        started = time.time()
        for folder in (root, REPORTS_DIR, db.parent):  # what killed runs left half-written (a live run's stays)
            sweep_temporaries(folder, started, recursive=folder == root)
        return run_graph(Tracker(uri), db, run_id, model_path, policy, spec_path, dataset, root, run_dir, uri,
                         on_attempt, on_start, on_progress, on_memory)


def run_graph(tracker: Tracker, db: Path, run_id: str, model_path: Path, policy, spec_path: Path, dataset: Path, root: Path,
              run_dir: Path, uri: str, on_attempt: Callable | None, on_start: Callable | None, on_progress: Callable | None,
              on_memory: Callable | None = None):
    """Start or resume the graph's thread `run_id` and stream it to the end (the run's lock held by the caller)."""
    from quantloop.pipelines.graph import build_graph  # deferred: langgraph

    store = KnowledgeStore.open() if policy.memory else KnowledgeStore.off("turned off (--no-memory or the policy's memory: false)")
    if on_memory:
        on_memory(store)
    graph = build_graph(tracker, db, store)
    config = {"configurable": {"thread_id": run_id}}
    saved = graph.get_state(config)
    if saved.values:
        old = PipelineState.model_validate(saved.values)
        if old.model != str(model_path):
            raise InputError(None, f"run id '{run_id}' belongs to a run on {old.model}, not {model_path}",
                             "pass that model, or a new --run-id")
        if old.policy != policy:
            raise InputError(None, f"run id '{run_id}' was started with another policy or target", "pass the same policy, or a new --run-id")
        if old.acceptance_sha256 and sha256_file(old.acceptance_spec) != old.acceptance_sha256:
            raise InputError(old.acceptance_spec, f"the acceptance spec changed since run '{run_id}' started",
                             "restore its content, or start a new --run-id")
        inputs = None
        done = {a.index for a in old.attempts if a.mlflow_run_id}
        for a in old.attempts:  # attempts finished before the kill: reported again, never redone
            if a.index in done and on_attempt:
                on_attempt(a, resumed=True)
    else:
        parent = tracker.parent_run(run_id, {"model": str(model_path), "target": policy.target, "acceptance_spec": str(spec_path),
                                             "steps": ", ".join(s.name for s in policy.plan_steps())})
        inputs = PipelineState(run_id=run_id, model=str(model_path), target=policy.target, policy=policy,
                               acceptance_spec=str(spec_path), acceptance_sha256=sha256_file(spec_path), dataset_dir=str(dataset),
                               output_root=str(root), run_dir=str(run_dir),
                               mlflow_parent_run_id=parent, started_unix=time.time())
    if on_start:
        on_start(run_id, uri, resumed=inputs is None)
    if on_progress and inputs is not None:
        on_progress("start", inputs)
    elif on_progress:
        on_progress("resume", PipelineState.model_validate(saved.values))
    for update in graph.stream(inputs, config, stream_mode="updates", durability="sync"):
        if "track" in update and on_attempt:
            on_attempt(update["track"]["attempts"][-1], resumed=False)
        if on_progress:
            on_progress(next(iter(update)), PipelineState.model_validate(graph.get_state(config).values))
    return PipelineState.model_validate(graph.get_state(config).values)


# ---------------------------------------------------------------------- command line


def fmt(v, pattern: str, none: str = "-") -> str:
    return none if v is None else pattern.format(v)


def attempt_cells(a) -> list[str]:
    return ([str(a.index), a.step, a.method or "-", fmt(a.bits, "{}")] + [c.text for c in row_cells(a.metrics, "line")]
            + [a.verdict or a.status])


def headers() -> list[str]:
    """The attempt table's columns: the attempt, each criterion's cells (in the registry's order), the verdict."""
    return ["#", "step", "method", "bits", *(c.header for c in row_cells({}, "line")), "verdict"]


def print_attempt(a, resumed: bool = False) -> None:
    done = " (done before the restart)" if resumed else ""
    measured = "".join(f"  {c.word} {c.text}" for c in row_cells(a.metrics, "line"))
    print(f"[{a.index}] {a.step}  {a.method or '-'} {fmt(a.bits, '{}')}-bit{measured}  -> {a.verdict or a.status}{done}: {a.reason}",
          flush=True)


def print_progress(node: str, state) -> None:
    """One line when a step of the loop starts (the line after it ends is print_attempt's)."""
    nxt = state.plan[state.next_index] if state.decision == "running" and state.next_index < len(state.plan) else None
    last = state.attempts[-1] if state.attempts else None
    if node == "start":
        print("evaluating the checkpoints (validation perplexity, size, speed) ...", flush=True)
    elif node in ("evaluate", "track", "resume") and nxt is not None and (node != "resume" or not last or last.verdict):
        print(f"[{nxt.index}] {nxt.step}: quantizing ...", flush=True)
    elif node == "resume" and last is not None and last.status == "quantized":
        print(f"[{last.index}] {last.step}: quantized before the restart; validating ...", flush=True)
    elif node == "quantize" and last is not None and last.status == "quantized":
        q = last.quantization
        for note in q.notes:
            print(f"[{last.index}] {last.step}: note: {note}", flush=True)
        print(f"[{last.index}] {last.step}: quantized in {q.wall_s:.1f} s ({q.format}, {q.bits_per_weight:.2f} bits/weight); "
              f"validating ...", flush=True)
    elif node == "validate" and last is not None and state.policy.validation.compare_generations:
        print(f"[{last.index}] {last.step}: validated; comparing generations ...", flush=True)


def print_memory(store) -> None:
    s = store.stats()
    if not s["enabled"]:
        print(f"memory: off, {s['note']}", flush=True)
        return
    kinds = ", ".join(f"{n} {k}" for k, n in s["by_kind"].items() if n)
    print(f"memory: {s['path']} ({s['atoms']} atoms{': ' + kinds if kinds else ''}; loaded in {s['load_s']:.2f} s)", flush=True)


def cmd_run(a) -> int:
    t0 = time.perf_counter()

    def on_start(run_id: str, uri: str, resumed: bool) -> None:
        print(f"run id: {run_id} ({'resumed' if resumed else 'new'}; resume with --run-id {run_id})   tracking: {uri}", flush=True)

    state = run_pipeline(a.model, a.policy, a.target, a.run_id, a.tracking_uri, a.data_free, a.dataset,
                         on_attempt=print_attempt, on_start=on_start, spec_file=a.spec, on_progress=print_progress,
                         memory=not a.no_memory, on_memory=print_memory, full_report=a.full_report)
    acc = load_quality_spec(state.acceptance_spec).acceptance
    print()
    if state.candidates:
        best = state.candidates[0]
        print(f"checkpoint: {best.path} (validation PPL {best.validation_ppl.ppl:.4f}"
              f"{'; best of ' + str(len(state.candidates)) if len(state.candidates) > 1 else ''})")
    print(f"acceptance ({state.acceptance_spec}): {bar_text(acc, 'line')}; target: {state.target}")
    print(table(headers(), [attempt_cells(x) for x in state.attempts]))
    print()
    if state.decision == "accepted":
        x = state.attempts[state.accepted_index]
        print(f"ACCEPTED: {x.step} -> {x.output_dir}   registered: {state.registered_model}")
    else:
        print(f"REJECTED: no step passed. Recommendation: {state.recommendation}")
    print(f"summary: {state.summary_path}   MLflow parent run: {state.mlflow_parent_run_id}")

    try:
        report = write_run_report(state.run_id, a.tracking_uri)
        print(f"report: {report.html}   (report.md and plots/ beside it; attached to the MLflow parent run under report/)")
    except InputError as e:
        print(f"quantloop: warning: no run report: {e.line()}", file=sys.stderr)
    t = state.time_breakdown()
    print(f"wall time: {time.perf_counter() - t0:.1f} s this invocation, {state.active_s:.1f} s in the graph over all invocations: "
          f"checkpoint evaluation {t['evaluation_s']:.1f} s, attempts (quantize, validate, compare) {t['attempts_s']:.1f} s, "
          f"quantloop's own code (agents, MLflow, state) {t['own_s']:.1f} s = {100 * t['own_share']:.1f} %")
    split = [f"[{x.index}] {x.step} quantize {x.quantize_s:.0f} s + validate {x.wall_s - x.quantize_s:.0f} s"
             for x in state.attempts if x.status != "skipped" and x.wall_s > 0]
    if split:
        print("attempts: " + "; ".join(split), flush=True)
    return 0 if state.decision == "accepted" else 1


def add_run_command(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "run", help="the agent loop: quantize, validate and fall back until a model passes (exit 1 if none does)",
        description="EvaluationAgent picks the best checkpoint, QuantizationAgent tries the policy's steps in order "
                    "(specs/policy.yaml), ReviewerAgent accepts or falls back. Every attempt is an MLflow run; a killed "
                    "run continues with the same --run-id. Exit code 0: accepted, 1: rejected, 2: bad input.",
        epilog="Models and text are local only; nothing is fetched from a model hub.")
    s.add_argument("model", nargs="?", default=None,
                   help=f"a checkpoint folder, or a folder of step_N checkpoints (default: {OFFGRID_MODEL_DIR} "
                        f"when prepared, the off-grid twin on which quality is judged; else {DEFAULT_MODEL_DIR})")
    s.add_argument("--policy", help="fallback policy YAML (default: specs/policy.yaml)")
    s.add_argument("--target", choices=["cpu", "cuda"], help="deployment target (default: the policy's)")
    s.add_argument("--spec", help="acceptance spec YAML (default: the policy's acceptance_spec, specs/acceptance.yaml)")
    s.add_argument("--run-id", help="resume this run, or name a new one: 1-64 ASCII letters, digits, '-', '_' or '.', starting "
                                    "with a letter or digit (default: a new id); a live run's id is refused")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///SLM/mlflow.db)")
    s.add_argument("--data-free", action="store_true", help="no calibration text: GPTQ, imatrix and QAT calibrate on text the float model "
                        "generates itself (the test split is still used, only to validate)")
    s.add_argument("--dataset", help="prepared dataset folder (default: SLM/datasets/shakespeare)")
    s.add_argument("--no-memory", action="store_true", help="neither read nor write the knowledge store (SLM/knowledge/): "
                        "every step is tried and every sensitivity measured as if nothing were known (docs/knowledge.md)")
    s.add_argument("--full-report", action="store_true", help="measure every criterion of every attempt, even one that can "
                        "no longer change its verdict (default: reported as not measured, with the reason)")
    s.set_defaults(func=cmd_run)
    return s
