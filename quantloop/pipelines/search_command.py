"""`quantloop sensitivity`, `quantloop search`, `quantloop search-worker`: the command lines of
quantloop/tools/sensitivity.py and quantloop/tools/search.py.

    python -m quantloop.pipelines.search_command search-worker --storage URL --study NAME
runs the same worker without the main CLI (what `search --workers N` starts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantloop.errors import run_command
from quantloop.fileio import write_json_atomic
from quantloop.paths import DATASETS_DIR, OFFGRID_MODEL_DIR
from quantloop.pipelines.report_format import table
from quantloop.search.schemas import SearchRequest, SensitivityRequest, TextSpec
from quantloop.tools.search import imatrix_calibration, run_search_worker, search_mixed_precision
from quantloop.tools.sensitivity import measure_sensitivity

EPILOG = "Models and text are local only; nothing is fetched from a model hub. Bad input: one line, exit code 2."


def _texts(names: list[str] | None, split: str, chunks: int, seqlen: int):
    out = []
    for n in names or ["shakespeare"]:
        if n == "synthetic":  # the model's own generations (data-free)
            out.append(TextSpec(source="synthetic", chunks=chunks, seqlen=seqlen))
            continue
        p = Path(n) if ("/" in n or Path(n).is_dir()) else DATASETS_DIR / n
        out.append(TextSpec(dataset_dir=str(p), split=split, chunks=chunks, seqlen=seqlen))
    return out


def _types(s: str) -> list[str]:
    return [t.strip().upper() for t in s.split(",") if t.strip()]


def _margin(s: str) -> float:
    value = float(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{s} is below 0 bits per weight")
    return value


def cmd_sensitivity(a) -> int:
    def progress(i, n, unit, typ, kld):
        print(f"  [{i}/{n}] {unit} {typ}: KLD {kld:.5f}", file=sys.stderr, flush=True)

    out = Path(a.out)
    r = measure_sensitivity(SensitivityRequest(model=a.model, text=_texts(a.text, "calibration", a.chunks, a.seqlen),
                                               types=_types(a.types), granularity=a.granularity, cache_dir=a.cache_dir,
                                               heatmap_png=str(out / "sensitivity_heatmap.png"), threads=a.threads),
                            progress if not a.quiet else None)

    write_json_atomic(out / "sensitivity.json", r)
    worst = sorted(r.rows, key=lambda x: -x.kld)[: a.top]
    print(table(["unit", "type", "weights", "bytes", "mean KLD"], [[x.unit, x.type, f"{x.n_weights:,}", f"{x.bytes:,}", f"{x.kld:.5f}"] for x in worst]))
    print(f"{len(r.rows)} rows ({r.measured} measured now, the rest from the cache {r.cache_file}) in {r.wall_s:.1f} s")
    print(f"table: {out / 'sensitivity.json'}   heatmap: {r.heatmap_png}")
    return 0


def search_request(a):
    sens_text = _texts(a.text, "calibration", a.sens_chunks, a.seqlen)
    return SearchRequest(
        model=a.model, text=_texts(a.text, "validation", a.chunks, a.seqlen),
        sensitivity_text=sens_text, test_text=_texts(a.text, "test", a.chunks, a.seqlen),
        types=_types(a.types), granularity=a.granularity, budgets_bpw=[float(x) for x in a.budgets.split(",") if x.strip()],
        max_bpw=a.max_bpw, bpw_margin=a.bpw_margin, seed_maps=a.seed_map or [], trials=a.trials, workers=a.workers, sampler=a.sampler, population=a.population, storage=a.storage,
        imatrix=imatrix_calibration(sens_text, a.imatrix_chunks, a.seqlen) if a.imatrix_chunks else None,
        study=a.study, resume=a.resume, target=a.target, speed_tokens=a.speed_tokens, speed_repeats=a.speed_repeats,
        out_dir=a.out, validate_front=a.validate_front, tracking_uri=a.tracking_uri, seed=a.seed, threads=a.threads)


def print_result(r) -> None:
    rows = []
    for m in sorted(r.front, key=lambda m: m.measured.bytes):
        x = m.measured
        est = m.estimated.get("estimated_tg_tokens_per_s")
        rows.append([m.trial, m.origin, f"{x.bits_per_weight:.3f}", f"{x.bytes:,}", f"{x.kld_mean:.4f}", f"{x.ppl_increase_pct:+.2f} %",
                     f"{x.tg_tokens_per_s:.1f}", "-" if m.test_kld_mean is None else f"{m.test_kld_mean:.4f}",
                     "-" if est is None else f"{est:.1f}"])
    print(table(["trial", "origin", "bits/weight", "bytes", "mean KLD", "ppl", "tg tok/s", "test KLD", "estimated_tg tok/s"], rows))
    print(f"front: {len(r.front)} members of {r.trials_complete} measured trials ({r.trials_measured_here} measured in this call), "
          f"storage {r.storage}, study {r.study}")
    print(f"maps: {Path(r.result_json).parent / 'maps'}   front: {r.front_png}   bits: {r.heatmap_png}   result: {r.result_json}")


def cmd_search(a) -> int:
    print_result(search_mixed_precision(search_request(a)))
    return 0


def cmd_worker(a) -> int:
    n = run_search_worker(a.storage, a.study)
    print(f"worker ran {n} trials of {a.study}")
    return 0


def _common(s) -> None:
    s.add_argument("model", nargs="?", default=str(OFFGRID_MODEL_DIR), help=f"prepared checkpoint (default: {OFFGRID_MODEL_DIR})")
    s.add_argument("--text", action="append", metavar="DATASET",
                   help="prepared dataset name under SLM/datasets or a folder, or 'synthetic' for the model's own generations (data-free); repeat for several domains (default: shakespeare)")
    s.add_argument("--seqlen", type=int, default=256, help="tokens per window (default: 256)")
    s.add_argument("--granularity", choices=["group", "block", "tensor"], default="group",
                   help="unit of the sensitivity table and the genome: layer x module group (q/k/v, o, gate/up, down), "
                        "layer x block (attention, feed-forward) or every tensor (default: group)")
    s.add_argument("--threads", type=int, help="CPU threads (default: all)")


def add_search_commands(subparsers) -> None:
    s = subparsers.add_parser("sensitivity", help="per-unit KLD when one tensor / layer group is quantized (cached) and its heatmap",
                              description="Quantize one unit (tensor, or layer x module group) at a time at each candidate GGUF "
                                          "type, the rest float, and measure the mean KLD against the float model on the "
                                          "calibration split. Rows are cached by model, text, unit and type.", epilog=EPILOG)
    _common(s)
    s.add_argument("--types", default="Q4_0,Q5_0,Q8_0", help="candidate types, comma-separated (default: Q4_0,Q5_0,Q8_0)")
    s.add_argument("--chunks", type=int, default=2, help="calibration windows per domain (default: 2)")
    s.add_argument("--cache-dir", help="sensitivity cache folder (default: ~/.cache/quantloop/sensitivity)")
    s.add_argument("--out", default="SLM/search/sensitivity", help="folder for sensitivity.json and the heatmap (default: SLM/search/sensitivity)")
    s.add_argument("--top", type=int, default=12, help="rows to print, most sensitive first (default: 12)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sensitivity)

    s = subparsers.add_parser("search", help="multi-objective mixed-precision search: the measured front of KLD, bytes and speed",
                              description="Search per-unit GGUF types with optuna (NSGA-II or TPE), seeded with greedy and "
                                          "integer-program allocations from the sensitivity table. Every candidate is written "
                                          "by quantize_model and measured: mean KLD against the F16 model on llama.cpp over the "
                                          "validation split of every --text domain, exact bytes, llama-bench tg speed. The front "
                                          "is exported as precision maps (JSON + YAML QuantSpec) and re-validated on the test split.",
                              epilog=EPILOG)
    _common(s)
    s.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K", help="candidate types, F16 always allowed (default: Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K)")
    s.add_argument("--chunks", type=int, default=2, help="validation windows per domain for every trial (default: 2)")
    s.add_argument("--sens-chunks", type=int, default=2, help="calibration windows per domain for the sensitivity table (default: 2)")
    s.add_argument("--budgets", default="5.0,5.5,6.2", help="bits-per-weight budgets of the greedy/ILP seeds (default: 5.0,5.5,6.2; one below the smallest possible file is refused)")
    s.add_argument("--max-bpw", type=float, help="do not measure candidates above this many bits per weight")
    s.add_argument("--bpw-margin", type=_margin, default=0.3, help="without --max-bpw, candidates above the largest budget plus "
                   "this many bits per weight are not measured (default: 0.3)")
    s.add_argument("--seed-map", action="append", metavar="FILE", help="a precision map (JSON/YAML) to measure first (repeatable)")
    s.add_argument("--trials", type=int, default=20, help="finished trials the study should hold in total (default: 20)")
    s.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1; 0: only create the study, or with --resume only report, while `search-worker`s run the trials)")
    s.add_argument("--sampler", choices=["nsga2", "tpe"], default="nsga2", help="optuna's multi-objective sampler (default: nsga2)")
    s.add_argument("--population", type=int, default=8, help="NSGA-II population (default: 8)")
    s.add_argument("--storage", help="optuna storage: journal file path (default: OUT/search.journal) or postgresql://user@host/db")
    s.add_argument("--study", default="quantloop-search", help="study name in the storage (default: quantloop-search)")
    s.add_argument("--resume", action="store_true", help="continue the study (finished trials are kept, not run again)")
    s.add_argument("--target", default="cpu", help="cpu or cuda (measured), or an edge target with estimated_* fields: "
                   "arm-neon, arm-dotprod, hexagon, apple-ane, tensorrt, intel-vnni (default: cpu)")
    s.add_argument("--imatrix-chunks", type=int, default=32, metavar="N",
                   help="candidates are quantized by llama-quantize with an importance matrix from N windows of --seqlen "
                        "tokens of the --text domains' calibration split (llama-imatrix, computed once and cached); "
                        "0: no importance matrix (default: 32)")
    s.add_argument("--speed-tokens", type=int, default=32, help="tokens per llama-bench tg run (default: 32)")
    s.add_argument("--speed-repeats", type=int, default=2, help="llama-bench runs per candidate, best kept (default: 2)")
    s.add_argument("--validate-front", type=int, default=4, help="front members re-validated on the test split (default: 4)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (e.g. sqlite:///SLM/mlflow.db); omitted: nothing is logged")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="SLM/search/default", help="output folder: maps, pictures, search_result.json (default: SLM/search/default)")
    s.set_defaults(func=cmd_search)

    s = subparsers.add_parser("search-worker", help="join a running search (same storage) and run its trials",
                              description="Load the search from the storage (its settings are stored with it) and run trials "
                                          "until it holds its number of trials. Start one per machine or core.", epilog=EPILOG)
    s.add_argument("--storage", required=True, help="the search's storage: postgresql://... or a journal file path")
    s.add_argument("--study", default="quantloop-search", help="study name (default: quantloop-search)")
    s.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quantloop")
    add_search_commands(p.add_subparsers(dest="command", required=True))
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
