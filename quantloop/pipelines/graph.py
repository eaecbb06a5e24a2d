"""The agent loop as a LangGraph StateGraph, checkpointed to SQLite after every node.

    evaluate ──▶ quantize ──▶ validate ──▶ compare ──▶ review ──▶ track ──▶ quantize ... (next fallback step)
                    └──(skipped or failed)─────────────────▶ review       └──────▶ finish ──▶ END  (accepted, or plan exhausted)

evaluate  EvaluationAgent: score the candidate checkpoints, pick the best, plan the attempts
quantize  QuantizationAgent: quantize_model for the next planned attempt (or record why it is skipped)
validate  validate_quantization of that attempt against its float baseline
compare   compare_outputs: side-by-side generations of the float model and the attempt
review    ReviewerAgent: accept, fall back (one sentence naming the failing measurement), or reject
track     one nested MLflow run for the attempt just reviewed (idempotent, so a resume never duplicates it)
finish    quantization_summary.json, the accepted model in the MLflow Model Registry, the parent run closed

A run killed at any point restarts from the last completed node of its thread (the --run-id): a
finished attempt is never redone, and an attempt killed during validation is validated again without
quantizing again.
"""

from __future__ import annotations

import time
from pathlib import Path

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from quantloop import faults
from quantloop.agents.evaluation import EvaluationAgent
from quantloop.agents.lessons import remember_attempt
from quantloop.agents.quantization import QuantizationAgent
from quantloop.agents.reviewer import ReviewerAgent
from quantloop.agents.state import PipelineState, serialisable_types
from quantloop.eval.criteria.base import result_params
from quantloop.locks import connect_state_db
from quantloop.pipelines.summary import SUMMARY_NAME, write_summaries
from quantloop.tracking import Tracker

__all__ = ["SUMMARY_NAME", "build_graph"]


def timed(name: str, node):
    """Add the node's own wall time to state.active_s (the run's time summed over resumes); the fault-injection
    point node:<name> as it starts."""

    def run(state: PipelineState) -> dict:
        faults.point(f"node:{name}")
        t0 = time.perf_counter()
        update = node(state)
        return update | {"active_s": state.active_s + time.perf_counter() - t0}

    run.__name__ = name
    return run


def build_graph(tracker: Tracker, state_db: Path, memory=None):
    """Compile the graph with the SQLite checkpointer at `state_db` (one thread per --run-id); `memory`, a
    quantloop.knowledge.KnowledgeStore, is read by the agents and gets every attempt when it is tracked."""

    def track(state: PipelineState) -> dict:
        attempts = list(state.attempts)
        a = attempts[-1]
        rid = tracker.log_attempt(state.mlflow_parent_run_id, state.run_id, a, state.policy.log_model_max_mib,
                                  result_params(a.criteria))
        attempts[-1] = a.model_copy(update={"mlflow_run_id": rid})
        if state.policy.memory:
            remember_attempt(memory, state, attempts[-1])
        return {"attempts": attempts}

    def finish(state: PipelineState) -> dict:
        registered = None
        if state.accepted_index is not None:
            a = state.attempts[state.accepted_index]
            name = f"quantloop-{Path(a.checkpoint).name}"
            registered = tracker.register(name, a.mlflow_run_id, a.quantization.model_path, a.reason,
                                          {"step": a.step, "format": a.quantization.format, "run_id": state.run_id,
                                           "report": a.report_path or ""})
        state = state.model_copy(update={"registered_model": registered})
        path = write_summaries(state)
        tracker.finish_parent(state.mlflow_parent_run_id, state.decision, state.recommendation,
                              [path, Path(state.acceptance_spec)],
                              {"attempts": len(state.attempts), "accepted": float(state.accepted_index is not None)})
        return {"registered_model": registered, "summary_path": str(path)}

    def after_track(state: PipelineState) -> str:
        return "finish" if state.decision != "running" else "quantize"

    def after_quantize(state: PipelineState) -> str:
        return "validate" if state.attempts[-1].status == "quantized" else "review"

    quantization = QuantizationAgent(memory)

    g = StateGraph(PipelineState)
    g.add_node("evaluate", timed("evaluate", EvaluationAgent()))
    g.add_node("quantize", timed("quantize", quantization))
    g.add_node("validate", timed("validate", quantization.validate_last))
    g.add_node("compare", timed("compare", quantization.compare_last))
    g.add_node("review", timed("review", ReviewerAgent()))
    g.add_node("track", timed("track", track))
    g.add_node("finish", timed("finish", finish))
    g.add_edge(START, "evaluate")
    g.add_edge("evaluate", "quantize")
    g.add_conditional_edges("quantize", after_quantize, {"validate": "validate", "review": "review"})
    g.add_edge("validate", "compare")
    g.add_edge("compare", "review")
    g.add_edge("review", "track")
    g.add_conditional_edges("track", after_track, {"quantize": "quantize", "finish": "finish"})
    g.add_edge("finish", END)
    state_db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect_state_db(state_db)
    if faults.armed("write:state"):  # the kill test's point inside a checkpoint write (its INSERT sent, not committed)
        conn.set_trace_callback(lambda sql: faults.point("write:state") if sql.lstrip().startswith("INSERT OR REPLACE INTO checkpoints") else None)
    saver = SqliteSaver(conn, serde=JsonPlusSerializer(allowed_msgpack_modules=serialisable_types()))
    return g.compile(checkpointer=saver)
