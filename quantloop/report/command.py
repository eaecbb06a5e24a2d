"""`quantloop report RUN_ID`: the command line of quantloop/report/."""

from __future__ import annotations

import argparse

from quantloop.report import write_run_report


def cmd_report(a) -> int:
    paths = write_run_report(a.run_id, a.tracking_uri, a.out, log_to_mlflow=not a.no_mlflow)
    print(f"report: {paths.html}")
    print(f"markdown: {paths.markdown}")
    for p in paths.plots:
        print(f"plot: {p}")
    if not a.no_mlflow:
        print("attached to the MLflow parent run under report/")
    return 0


def add_report_command(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "report", help="the run report of a `quantloop run`: HTML (plots embedded) and Markdown, attached to its MLflow run",
        description="Read run RUN_ID back from the tracking store and write OUT/report.html (self-contained: plots embedded), "
                    "OUT/report.md and OUT/plots/*.png: the baseline, every attempt as a row (step, method, bits per weight, "
                    "perplexity increase ± its standard error, mean KLD, speed and size ratios, verdict, reason), the "
                    "decision, side-by-side generations, and perplexity increase and KLD against file size with the "
                    "acceptance bars and the Pareto front. The files are also attached to the run's MLflow parent run. "
                    "Exit code 2 on an unknown run id or a folder that cannot be written; nothing is half-written.",
        epilog="Reads only the local tracking store; nothing is fetched from the network.")
    s.add_argument("run_id", metavar="RUN_ID", help="the run id `quantloop run` printed")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///SLM/mlflow.db)")
    s.add_argument("--out", metavar="DIR", help="report folder (default: SLM/reports/RUN_ID; replaced when it exists)")
    s.add_argument("--no-mlflow", action="store_true", help="write the files only; do not attach them to the MLflow run")
    s.set_defaults(func=cmd_report)
    return s
