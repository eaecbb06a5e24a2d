"""Mixed-precision search on the off-grid SmolLM2-135M, in one run: the measured front against greedy, the
integer program, and llama.cpp's fixed mixes (Q4_K_M / Q5_K_M / Q6_K / Q8_0, with and without an importance
matrix), every row measured on the same test text (Shakespeare + Python docs) against the F16 GGUF on llama.cpp,
with llama-bench tg speed; then, at 4.49 (the INT4 size bar), 5.0, 5.5 and 6.2 bits per weight, how much lower
the front's KLD is than the best baseline that fits the same size.

    .venv/bin/python bench/bench_search.py [--trials 24] [--sens-seqlen 64] [--test-chunks 2] [--out SLM/search/bench]

On a shared, oversubscribed machine set QUANTLOOP_THREADS=1: llama.cpp's threads wait for each other at every
op, and two threads that are descheduled by turns ran llama-bench tg at 2.0 tokens/s against 10.6 for one thread
(measured here, same file, same minute).

Writes OUT/bench_search.json, OUT/front.png, OUT/sensitivity_heatmap.png, OUT/bits-trial-N.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.paths import DATASETS_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, QuantSpec, quant_spec  # noqa: E402
from quantloop.search.schemas import SearchRequest, TextSpec  # noqa: E402

# 4.49 bits per weight is the INT4 size bar (F16 file / 3.5); with SmolLM2's 576-wide rows no GGUF type below 4.5 bits
# can be stored by these grids (Q4_0 is the smallest: 4.507 bits per weight for the whole file), so the seeds aim at
# 4.52 and the comparison reports 4.49 as "none fits" when nothing does
SEED_BUDGETS = [4.52, 5.0, 5.5, 6.2]
BUDGETS = [4.49, 4.52, 5.0, 5.5, 6.2]
IMAT_SAMPLES, IMAT_SEQLEN = 32, 256  # the importance matrix of llama.cpp's mixes and of the search's candidates: the same text
MIX_TYPES = "Q4_K_M,Q5_K_M,Q6_K,Q8_0"


def mixes(types: str, imatrix_types: str, imat: CalibrationSpec) -> list[tuple[str, QuantSpec]]:
    """llama.cpp's fixed mixes, each without and (for imatrix_types) with an importance matrix."""
    out = []
    for t in filter(None, types.split(",")):
        out.append((f"llama.cpp {t}", quant_spec(method="gguf", gguf_type=t)))
        if t in imatrix_types.split(","):
            out.append((f"llama.cpp {t} + imatrix", quant_spec(method="gguf", gguf_type=t, imatrix=True, calibration=imat)))
    return out


def measure(label, kind, path, val, test, a) -> dict:
    from quantloop.search.measure import summarize, tg_speed
    from quantloop.eval.size import gguf_size

    kv, _ = summarize(val.kld(path))
    kt, ppl = summarize(test.kld(path))
    size = gguf_size(path)
    row = {"label": label, "kind": kind, "bits_per_weight": size.bits_per_weight, "bytes": size.bytes_on_disk,
           "val_kld": kv, "test_kld": kt, "test_ppl_increase_pct": ppl,
           "tg_tokens_per_s": tg_speed(path, a.speed_tokens, a.speed_repeats)}
    print(f"  {label:34s} {row['bits_per_weight']:.3f} bpw  test KLD {kt:.4f}  ppl {ppl:+.2f} %  tg {row['tg_tokens_per_s']:.1f}/s", flush=True)
    return row


def main() -> None:
    import yaml

    from quantloop.eval.runtimes import default_threads
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.measure import Baseline
    from quantloop.tools.quantize import quantize_model
    from quantloop.tools.search import imatrix_calibration, search_mixed_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--sens-seqlen", type=int, default=64)
    p.add_argument("--val-chunks", type=int, default=2)
    p.add_argument("--test-chunks", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--types", default="Q4_0,Q5_0,Q8_0")
    p.add_argument("--mixes", default=MIX_TYPES, help=f"llama.cpp mixes to compare (default: {MIX_TYPES})")
    p.add_argument("--imatrix-mixes", default=MIX_TYPES, help="the mixes also measured with an importance matrix (default: all)")
    p.add_argument("--reuse-mixes", metavar="BENCH_JSON", help="take the llama.cpp rows from an earlier bench_search.json (same "
                   "text and settings) instead of measuring them again; their tg speed is from that run")
    p.add_argument("--bpw-margin", type=float, default=0.3, help="candidates above the largest budget plus this are not measured")
    p.add_argument("--granularity", default="block", choices=["tensor", "group", "block"])
    p.add_argument("--no-imatrix", action="store_true", help="search candidates without an importance matrix (the mixes keep theirs)")
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--out", default=str(SLM_DIR / "search" / "bench"))
    a = p.parse_args()
    t0 = time.perf_counter()
    out = Path(a.out)
    domains = [DATASETS_DIR / "shakespeare", DATASETS_DIR / "python-docs"]
    ts = lambda split, n, L: [TextSpec(dataset_dir=str(d), split=split, chunks=n, seqlen=L) for d in domains]  # noqa: E731
    model = resolve_model(OFFGRID_MODEL_DIR)
    imat = imatrix_calibration(ts("calibration", 1, IMAT_SEQLEN), IMAT_SAMPLES, IMAT_SEQLEN)
    req = SearchRequest(model=str(OFFGRID_MODEL_DIR), text=ts("validation", a.val_chunks, a.seqlen),
                        sensitivity_text=ts("calibration", 1, a.sens_seqlen), test_text=[], types=a.types.split(","),
                        granularity=a.granularity, budgets_bpw=SEED_BUDGETS, trials=a.trials, population=a.population, out_dir=str(out), bpw_margin=a.bpw_margin,
                        study="bench", resume=(out / "search.journal").is_file(), speed_tokens=a.speed_tokens,
                        speed_repeats=a.speed_repeats, validate_front=0,
                        imatrix=None if a.no_imatrix else imat)
    print(f"model {OFFGRID_MODEL_DIR} (off-grid twin); domains {', '.join(d.name for d in domains)}; "
          f"sensitivity: calibration 1 x {a.sens_seqlen} tokens per domain, types {a.types}, units: {a.granularity}; "
          f"search: validation {a.val_chunks} x {a.seqlen} per domain, NSGA-II population {a.population}, {a.trials} trials; "
          f"test: {a.test_chunks} x {a.seqlen} per domain; tg: llama-bench {a.speed_tokens} tokens, best of {a.speed_repeats}; "
          f"llama.cpp threads {default_threads()} (QUANTLOOP_THREADS); mixes {a.mixes}, with imatrix ({IMAT_SAMPLES} x {IMAT_SEQLEN} calibration tokens of both domains): {a.imatrix_mixes or 'none'}; search candidates {'without' if a.no_imatrix else 'with the same'} imatrix; size cap: budgets + {a.bpw_margin} bits", flush=True)
    val = Baseline(model.gguf, model.hf_dir, req.text)
    test = Baseline(model.gguf, model.hf_dir, ts("test", a.test_chunks, a.seqlen))
    rows = []
    print("llama.cpp's fixed mixes:", flush=True)
    if a.reuse_mixes:
        import json

        rows = [r for r in json.loads(Path(a.reuse_mixes).read_text())["rows"] if r["kind"] == "llama.cpp"]
        print(f"  {len(rows)} rows from {a.reuse_mixes}", flush=True)
    for label, spec in ([] if a.reuse_mixes else mixes(a.mixes, a.imatrix_mixes, imat)):
        q = quantize_model(OFFGRID_MODEL_DIR, out / "mixes" / spec.tag(), spec, overwrite=True)
        rows.append(measure(label, "llama.cpp", Path(q.model_path), val, test, a) | {"baseline": True, "on_front": False})
    write_json_atomic(out / "marks.json", [{"bpw": r["bits_per_weight"], "kld": r["val_kld"], "label": r["label"].removeprefix("llama.cpp "),
                                            "marker": "s", "color": "tab:orange"} for r in rows])
    print("search:", flush=True)
    res = search_mixed_precision(req)
    print(f"  {res.trials_complete} trials, front of {len(res.front)} (3 objectives) in {res.wall_s:.0f} s", flush=True)
    import optuna

    from quantloop.search.study import front_2d, open_storage

    study = optuna.load_study(study_name="bench", storage=open_storage(res.storage))
    complete = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if "measured" in t.user_attrs]
    front = {t.number for t in front_2d(complete)}
    chosen = front | {t.number for t in complete if str(t.user_attrs.get("origin", "")).startswith(("greedy", "ilp"))}
    maps = {m.trial: m.map_yaml for m in res.front}
    from quantloop.search.precision_maps import write_map
    from quantloop.tools.search_report import _genome
    from quantloop.search.allocate import unit_table
    from quantloop.search.tensors import model_tensors
    from quantloop.tools.sensitivity import measure_sensitivity
    from quantloop.search.schemas import SensitivityRequest

    sens = measure_sensitivity(SensitivityRequest(model=req.model, text=req.sensitivity_text, types=req.types, granularity=a.granularity))
    units = unit_table(sens, model_tensors(model.gguf, tuple(req.types) + ("F16",)))
    print("front and seeds on the test text:", flush=True)
    for n in sorted(chosen):
        t = study.trials[n]
        path = maps.get(n) or str(write_map(_genome(t, units), out / "maps" / f"trial-{n}", imatrix=req.imatrix)[1])
        fields = {k: v for k, v in yaml.safe_load(Path(path).read_text()).items() if k != "quantloop_search"}
        q = quantize_model(OFFGRID_MODEL_DIR, out / "eval" / f"trial-{n}", quant_spec(**fields), overwrite=True)
        origin = str(t.user_attrs.get("origin", "nsga2"))
        seed = origin.startswith(("greedy", "ilp"))
        kind = "+".join(k for k, on in (("front", n in front), (origin.split("@")[0], seed)) if on)
        rows.append(measure(f"trial {n} ({origin})", kind, Path(q.model_path), val, test, a)
                    | {"trial": n, "on_front": n in front, "baseline": seed})
    print()
    print(table(["model", "kind", "bits/weight", "bytes", "mean KLD (test)", "ppl increase", "tg tok/s"],
                [[r["label"], r["kind"], f"{r['bits_per_weight']:.3f}", f"{r['bytes']:,}", f"{r['test_kld']:.4f}",
                  f"{r['test_ppl_increase_pct']:+.2f} %", f"{r['tg_tokens_per_s']:.1f}"] for r in sorted(rows, key=lambda r: r["bits_per_weight"])]))
    comp = []
    for b in BUDGETS:
        fr = [r for r in rows if r.get("on_front") and r["bits_per_weight"] <= b]
        base = [r for r in rows if r.get("baseline") and r["bits_per_weight"] <= b]
        f = min(fr, key=lambda r: r["test_kld"]) if fr else None
        g = min(base, key=lambda r: r["test_kld"]) if base else None
        mix = [r for r in rows if r["kind"] == "llama.cpp" and r["bits_per_weight"] <= b]
        h = min(mix, key=lambda r: r["test_kld"]) if mix else None
        comp.append({"budget_bpw": b, "front": f and f["label"], "front_kld": f and f["test_kld"], "baseline": g and g["label"],
                     "baseline_kld": g and g["test_kld"], "llama_cpp": h and h["label"], "llama_cpp_kld": h and h["test_kld"]})
    print()
    print(table(["budget bits/weight", "best front member", "KLD", "best baseline (greedy, ILP, llama.cpp)", "KLD", "front KLD lower by",
                 "best llama.cpp mix", "KLD"],
                [[c["budget_bpw"], c["front"] or "-", f"{c['front_kld']:.4f}" if c["front_kld"] else "-", c["baseline"] or "none fits",
                  f"{c['baseline_kld']:.4f}" if c["baseline_kld"] else "-",
                  f"{100 * (1 - c['front_kld'] / c['baseline_kld']):.1f} %" if c["front_kld"] and c["baseline_kld"] else "-",
                  c["llama_cpp"] or "none fits", f"{c['llama_cpp_kld']:.4f}" if c["llama_cpp_kld"] else "-"] for c in comp]))
    write_json_atomic(out / "bench_search.json", {"settings": vars(a), "rows": rows, "comparison": comp, "front_png": res.front_png,
                                                  "heatmap_png": str(out / "sensitivity_heatmap.png"), "bits_png": res.heatmap_png,
                                                  "wall_s": time.perf_counter() - t0})
    print(f"\nfront: {res.front_png}  sensitivity: {out / 'sensitivity_heatmap.png'}  bits: {res.heatmap_png}  "
          f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
