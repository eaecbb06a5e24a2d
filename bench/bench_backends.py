"""Quantizer backends on SmolLM2-135M: each quantized model validated against the
float model it came from, on the runtime it is deployed with, in the same run.

    .venv/bin/python bench/bench_backends.py [--models offgrid reference] [--only LABEL ...] [--chunks 16] [--no-speed]

The off-grid twin is the headline; the reference sits on a Q4_1 grid (its
4-bit group-32 asymmetric results are an artifact, see README). Anchors
(llama.cpp on this model): Q8_0 about +0.6 % perplexity, Q4_K_M about +7 %.
Writes SLM/reports/bench_backends.json.
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

from quantloop.errors import InputError  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.paths import DATASETS_DIR, DEFAULT_MODEL_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, quant_spec, ValidationRequest  # noqa: E402
from quantloop.tools import validate_quantization  # noqa: E402
from quantloop.tools.quantize import quantize_model  # noqa: E402

CAL = CalibrationSpec(samples=128, seqlen=256)  # the policy's INT4 step
ROWS = [
    ("GGUF Q8_0", quant_spec(method="gguf", gguf_type="Q8_0")),
    ("GGUF Q6_K", quant_spec(method="gguf", gguf_type="Q6_K")),
    ("GGUF Q5_K_M", quant_spec(method="gguf", gguf_type="Q5_K_M")),
    ("GGUF Q4_K_M", quant_spec(method="gguf", gguf_type="Q4_K_M")),
    ("GGUF Q4_K_M + imatrix", quant_spec(method="gguf", gguf_type="Q4_K_M", imatrix=True, calibration=CalibrationSpec(samples=32))),
    ("GGUF Q4_0", quant_spec(method="gguf", gguf_type="Q4_0")),
    ("RTN-4 g32 -> GGUF Q4_0", quant_spec(method="rtn", bits=4, group_size=32, symmetric=True, gguf_type="Q4_0")),
    ("RTN-4 g32 asym -> GGUF Q4_1", quant_spec(method="rtn", bits=4, group_size=32, symmetric=False, gguf_type="Q4_1")),
    ("RTN-4 g128", quant_spec(method="rtn", bits=4, group_size=128, symmetric=True)),
    ("GPTQ-4 g128", quant_spec(method="gptq", bits=4, group_size=128, calibration=CAL)),
    ("AWQ-4 g128", quant_spec(method="awq", bits=4, group_size=128, calibration=CAL)),
    ("GPTQ-4 g32 -> GGUF Q4_0", quant_spec(method="gptq", bits=4, group_size=32, gguf_type="Q4_0", calibration=CAL)),
    ("GPTQ-8 g32 -> GGUF Q8_0", quant_spec(method="gptq", bits=8, group_size=32, gguf_type="Q8_0", calibration=CAL)),
    ("AutoRound gguf:q4_k_m", quant_spec(method="autoround", bits=4, gguf_type="Q4_K_M", calibration=CAL)),
]
MODELS = {"offgrid": ("off-grid twin", OFFGRID_MODEL_DIR), "reference": ("reference (on a Q4_1 grid)", DEFAULT_MODEL_DIR)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["offgrid"])
    p.add_argument("--only", nargs="+", help="row labels to run (substring match)")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--no-speed", action="store_true")
    a = p.parse_args()
    rows = [r for r in ROWS if not a.only or any(o.lower() in r[0].lower() for o in a.only)]
    dataset = DATASETS_DIR / "shakespeare"
    results, table_rows = [], []
    t_start = time.perf_counter()
    out_json = SLM_DIR / "reports" / "bench_backends.json"
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as tmp:
        for key in a.models:
            label_m, model_dir = MODELS[key]
            for label, spec in rows:
                out = Path(tmp) / f"{key}-{spec.tag()}"
                try:
                    q = quantize_model(model_dir, out, spec)
                    r = validate_quantization(ValidationRequest(quantized=str(out), baseline=str(model_dir), dataset_dir=str(dataset),
                                                                chunks=a.chunks, measure_speed=not a.no_speed, nominal_bits=None if spec.type_sets_bits else spec.bits,
                                                                report_path=str(Path(tmp) / f"{key}-{spec.tag()}.json")))
                except (InputError, ImportError) as e:
                    msg = e.line() if isinstance(e, InputError) else str(e)
                    print(f"  {label_m:28s} {label:26s} skipped: {msg}", flush=True)
                    table_rows.append([label_m, label] + ["-"] * 8 + [f"skipped: {msg[:60]}"])
                    continue
                k = r.kld
                print(f"  {label_m:28s} {label:26s} ppl {k.ppl_increase_pct:+6.2f} %  KLD {k.kld_mean:.4f}  "
                      f"same-top {k.same_top_rate * 100:5.1f} %  {r.runtime}", flush=True)
                results.append({"model": label_m, "row": label, "quantization": json.loads(q.model_dump_json()),
                                "validation": json.loads(r.model_dump_json())})
                table_rows.append([label_m, label, r.runtime, f"{k.ppl_increase_pct:+.2f} %", f"{k.kld_mean:.4f}",
                                   f"{k.same_top_rate * 100:.1f} %", f"{r.size_quantized.bits_per_weight:.2f}",
                                   f"{r.size_quantized.linear_bits_per_weight:.2f}", f"{q.wall_s:.0f} s",
                                   f"{r.speedup_tg:.2f}x" if r.speedup_tg else "-", "pass" if r.passed else "fail"])
                write_json_atomic(out_json, results)  # a long run keeps what it measured so far
    print()
    print(table(["model", "method", "runtime", "ppl increase", "mean KLD", "same top", "bpw (all)", "bpw (linear)",
                 "quant time", "tg vs float", "verdict"], table_rows))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    write_json_atomic(out_json, results)
    print(f"reports: {out_json}")


if __name__ == "__main__":
    main()
