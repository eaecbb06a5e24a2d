"""Speed verdict stability: the same Q8_0 file against the same F16 file, validated N times in a row.

    .venv/bin/python bench/bench_speed_verdict.py [--model DIR] [--type Q8_0] [--times 5] [--spread-minutes 30] [--old]

Each validation runs the speed part of validate_quantization exactly as it runs there (interleaved
llama-bench pairs with the spec's settings, more pairs while the median lies within decide_sigmas
standard errors of the bar, then the verdict: a pass needs the median decide_sigmas standard errors above the bar). Prints every validation's median ratio, its standard
error, pairs used, the verdict and its margin in sigma, and the spread of the medians across
validations (the goal: within 5 %, and the same verdict every time). `--spread-minutes M` starts the validations
evenly over M minutes (waiting between them), so that the spread of their medians shows how much the ratio moves
between validations; the bench compares it with the standard error each validation reports from its own pairs and
prints the between-validation component (the relative standard deviation that speed.between_run_sd_pct adds to every
speed verdict's standard error). `--old` also measures the previous method (best of 3 single runs of 64 generated
tokens each side) for comparison, in the same run. Writes SLM/reports/bench_speed_verdict.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from quantloop.backends.gguf import quantize_gguf  # noqa: E402
from quantloop.eval.speed import measure_runs, median_and_stderr, ratio_and_stderr, speed_pairs, speed_threads  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.models.checkpoints import resolve_model  # noqa: E402
from quantloop.paths import DEFAULT_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import ModelRef, SpeedSettings  # noqa: E402
from quantloop.specs import load_quality_spec  # noqa: E402
from quantloop.eval.criteria.base import how_close, shown  # noqa: E402


def old_ratio(base: ModelRef, quant: ModelRef, threads: int) -> float:
    """The previous measurement: best of 3 single llama-bench runs each side, 64 generated tokens, interleaved."""
    old = SpeedSettings(prompt_tokens=256, gen_tokens=64, repeats=3, bench_reps=1)
    runs = measure_runs([base, quant], old, threads, old.repeats)
    return min(r["tg_s"] for r in runs[0]) / min(r["tg_s"] for r in runs[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--type", default="Q8_0")
    p.add_argument("--times", type=int, default=5)
    p.add_argument("--spread-minutes", type=float, default=0.0, help="start the validations evenly over this many minutes")
    p.add_argument("--old", action="store_true", help="also measure the previous method after each validation")
    a = p.parse_args()
    spec = load_quality_spec()
    bar, sigmas, threads = spec.acceptance.min_speedup, spec.eval.decide_sigmas, speed_threads(spec.speed)
    base = resolve_model(a.model)
    rows, out = [], []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        q = quantize_gguf(base.gguf, Path(tmp) / f"model-{a.type}.gguf", a.type)
        base_ref = ModelRef(path=str(base.gguf), runtime="llama.cpp", format="gguf:F16")
        quant_ref = ModelRef(path=str(q), runtime="llama.cpp", format=f"gguf:{a.type}")
        for i in range(a.times):
            if a.spread_minutes and i:  # start validation i at i/(times-1) of the spread
                time.sleep(max(0.0, t_all + 60 * a.spread_minutes * i / max(a.times - 1, 1) - time.perf_counter()))
            t0 = time.perf_counter()
            _, _, ratios, c = speed_pairs(base_ref, quant_ref, spec.speed, threads, bar, sigmas, spec.eval.sequential)
            median, within = median_and_stderr(ratios)
            _, se = ratio_and_stderr(ratios, spec.speed)
            margin = (median - bar) / se
            verdict = "pass" if median >= bar and shown(margin, c)[0] else "fail"
            old = old_ratio(base_ref, quant_ref, threads) if a.old else None
            out.append({"median": median, "stderr_within": within, "stderr": se, "boundary": c, "pairs": ratios,
                        "verdict": verdict, "margin_sigmas": margin, "old_method_ratio": old, "wall_s": time.perf_counter() - t0,
                        "started_min": (t0 - t_all) / 60})
            rows.append([i + 1, f"{(t0 - t_all) / 60:.0f} min", f"{median:.3f}x", f"{within:.3f}", f"{se:.3f}", len(ratios),
                         verdict, how_close(margin), "-" if old is None else f"{old:.3f}x", f"{time.perf_counter() - t0:.0f} s"])
            print(f"validation {i + 1}: {rows[-1][2]} ± {rows[-1][3]} (within) over {len(ratios)} pairs -> {verdict} "
                  f"({rows[-1][7]})", flush=True)
    medians = np.array([o["median"] for o in out])
    spread = (medians.max() - medians.min()) / medians.mean()
    # the medians' variance beyond what each validation's own standard error explains: the between-validation part
    sd_medians = float(medians.std(ddof=1)) if len(medians) > 1 else 0.0
    within_sq = float(np.mean([o["stderr_within"] ** 2 for o in out]))
    between_pct = 100 * math.sqrt(max(0.0, sd_medians ** 2 - within_sq)) / float(medians.mean())
    print()
    print(f"{a.type} vs F16 on {base.path.name}: token generation {spec.speed.gen_tokens} tokens x {spec.speed.bench_reps} reps per run, "
          f"{spec.speed.repeats}-{spec.speed.max_repeats} interleaved pairs, {threads} threads, bar {bar}x")
    print(table(["#", "start", "median ratio", "stderr within", "stderr used", "pairs", "verdict", "margin", "old method",
                 "wall"], rows))
    print(f"spread of the medians: {spread:.1%} (max - min over mean); their standard deviation {sd_medians:.3f} against a "
          f"mean within-validation standard error of {math.sqrt(within_sq):.3f}: between-validation component "
          f"{between_pct:.1f} % (speed.between_run_sd_pct is {spec.speed.between_run_sd_pct:g}); verdicts: "
          f"{', '.join(o['verdict'] for o in out)}; total {time.perf_counter() - t_all:.0f} s")
    write_json_atomic(SLM_DIR / "reports" / "bench_speed_verdict.json",
                      {"model": str(base.path), "type": a.type, "bar": bar, "settings": spec.speed.model_dump(), "threads": threads,
                       "validations": out, "spread": float(spread), "sd_medians": sd_medians,
                       "between_run_sd_pct": between_pct, "spread_minutes": a.spread_minutes})


if __name__ == "__main__":
    main()
