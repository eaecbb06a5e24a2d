"""One full `quantloop run` on the default model (SmolLM2-135M, the cpu policy): its wall time and where
the time went — the tools (checkpoint evaluation, quantizers, validation, side-by-side generations) versus
quantloop's own code (agents, LangGraph state, MLflow logging). Goal: own code under 5 %.

    .venv/bin/python bench/bench_run.py [MODEL] [--policy FILE] [--data-free]

Writes SLM/reports/bench_run.json (the run's quantization_summary.json plus the breakdown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.paths import SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.pipelines.run import print_attempt, run_pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="checkpoint or folder of step_N checkpoints (default: the prepared SmolLM2-135M)")
    p.add_argument("--policy", help="policy YAML (default: specs/policy.yaml)")
    p.add_argument("--spec", help="acceptance spec YAML (default: the policy's)")
    p.add_argument("--data-free", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    state = run_pipeline(a.model, a.policy, data_free=a.data_free, on_attempt=print_attempt, spec_file=a.spec)
    wall = time.perf_counter() - t0
    t = state.time_breakdown()
    rows = [["checkpoint evaluation", f"{t['evaluation_s']:.1f} s", f"{100 * t['evaluation_s'] / wall:.1f} %"]]
    for x in state.attempts:
        q = x.quantization.wall_s if x.quantization else 0.0
        rows.append([f"attempt {x.index} {x.step} ({x.verdict})", f"{x.wall_s:.1f} s (quantize {q:.1f} s)", f"{100 * x.wall_s / wall:.1f} %"])
    rows.append(["quantloop's own code", f"{t['own_s']:.1f} s", f"{100 * t['own_s'] / wall:.2f} %"])
    rows.append(["start-up outside the graph (imports, MLflow, policy)", f"{wall - t['active_s']:.1f} s", f"{100 * (wall - t['active_s']) / wall:.1f} %"])
    print()
    print(table(["part", "time", "share of wall time"], rows))
    print(f"\ndecision: {state.decision}; wall time {wall:.1f} s; quantloop's own code inside the graph: {100 * t['own_share']:.2f} % "
          f"(goal < 5 %)")
    summary = json.loads(Path(state.summary_path).read_text()) if state.summary_path else {}
    out = write_json_atomic(SLM_DIR / "reports" / "bench_run.json", {"wall_s": wall, "breakdown": t, "summary": summary})
    print(f"report: {out}")


if __name__ == "__main__":
    main()
