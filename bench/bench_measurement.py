"""Measurement benchmark: the float reference on both runtimes, then llama.cpp
quantizations of the off-grid twin (the headline) and of the grid-aligned
reference, each validated against its own float baseline in the same run.

    .venv/bin/python bench/bench_measurement.py [--types Q8_0 Q4_K_M Q4_1 Q4_0] [--chunks 16]

Anchors (ASSETS.md, llama.cpp on Python-docs text): Q8_0 about +0.6 % perplexity,
Q4_K_M about +7 %. Prints one table; writes SLM/reports/bench_measurement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantloop.backends.gguf import quantize_gguf  # noqa: E402
from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner  # noqa: E402
from quantloop.eval.session import perplexity, split_chunks  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.models.checkpoints import resolve_model  # noqa: E402
from quantloop.paths import DATASETS_DIR, DEFAULT_MODEL_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import ValidationRequest  # noqa: E402
from quantloop.tools import validate_quantization  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M", "Q4_1", "Q4_0"])
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--no-speed", action="store_true")
    a = p.parse_args()
    dataset = DATASETS_DIR / "shakespeare"
    models = [("off-grid twin", OFFGRID_MODEL_DIR), ("reference (grid-aligned: Q4_1 grid)", DEFAULT_MODEL_DIR)]
    t_start = time.perf_counter()

    print(f"float perplexity, test split, {a.chunks} x 512 tokens, same token ids on both runtimes")
    rows = []
    for label, d in models:
        m = resolve_model(d)
        chunks = split_chunks(dataset, m, 512, a.chunks)
        hf = perplexity(TransformersRunner(d), chunks, "hf")
        cpp = perplexity(LlamaCppRunner(m.gguf), chunks, "llama.cpp")
        rows.append([label, f"{hf.ppl:.4f}", f"{cpp.ppl:.4f}", f"{(cpp.ppl / hf.ppl - 1) * 100:+.3f} %"])
    print(table(["model", "transformers fp32", "llama.cpp F16", "difference"], rows), flush=True)

    results = []
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as tmp:
        for label, d in models:
            m = resolve_model(d)
            for t in a.types:
                q = quantize_gguf(m.gguf, Path(tmp) / f"{d.name}-{t}.gguf", t)
                r = validate_quantization(ValidationRequest(
                    quantized=str(q), baseline=str(d), dataset_dir=str(dataset), chunks=a.chunks,
                    measure_speed=not a.no_speed, report_path=str(Path(tmp) / f"{d.name}-{t}.json")))
                results.append((label, t, r))
                k = r.kld
                print(f"  {label:38s} {t:7s} ppl {k.ppl_increase_pct:+6.2f} %  KLD {k.kld_mean:.4f}  "
                      f"same-top {k.same_top_rate * 100:5.1f} %  tg x{r.speedup_tg or 0:.2f}", flush=True)

    print()
    print("llama.cpp quantizations vs the F16 GGUF of the same model (same runtime, same run, same tokens)")
    print(table(
        ["model", "type", "PPL", "ppl increase", "ln(PPL ratio)", "mean KLD", "same top", "bits/weight", "size ratio", "pp ratio", "tg ratio", "verdict"],
        [[label, t, f"{r.kld.ppl_quant:.4f}", f"{r.kld.ppl_increase_pct:+.2f} %",
          f"{r.kld.ln_ppl_ratio:.4f} ± {r.kld.ln_ppl_ratio_stderr:.4f}", f"{r.kld.kld_mean:.4f} ± {r.kld.kld_mean_stderr:.4f}",
          f"{r.kld.same_top_rate * 100:.1f} %", f"{r.size_quantized.bits_per_weight:.2f}", f"{r.size_ratio:.2f}x",
          f"{r.speedup_pp:.2f}x" if r.speedup_pp else "-", f"{r.speedup_tg:.2f}x" if r.speedup_tg else "-",
          "pass" if r.passed else "fail: " + ", ".join(c.name for c in r.criteria if not c.passed)]
         for label, t, r in results]))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s; threads {os.cpu_count()}")
    out = SLM_DIR / "reports" / "bench_measurement.json"
    write_json_atomic(out, [{"model": label, "type": t, "report": json.loads(r.model_dump_json())} for label, t, r in results])
    print(f"reports: {out}")


if __name__ == "__main__":
    main()
