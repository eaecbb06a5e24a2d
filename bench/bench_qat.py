"""QAT and GPTQ on SmolLM2-135M (off-grid twin): round-to-nearest against data-free QAT and QAT on real text, on
the exact Q4_0 and Q4_K grids, GPTQ on the Q4_K grid and under the mixed-precision preset, and the preset against
uniform 4-bit and 8-bit. Every model is a GGUF
validated on llama.cpp against the float model's F16 GGUF, on the test split, in the same run.

    .venv/bin/python bench/bench_qat.py [--steps 100] [--samples 64] [--seqlen 128] [--chunks 16] [--speed]

"gap recovered" is the share of the round-to-nearest perplexity increase that QAT (or GPTQ) removed:
(RTN increase - its increase) / RTN increase, for the same GGUF type. Writes SLM/reports/bench_qat.json.
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

from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.paths import DATASETS_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, QuantSpec, quant_spec, ValidationRequest  # noqa: E402
from quantloop.tools import validate_quantization  # noqa: E402
from quantloop.tools.quantize import quantize_model  # noqa: E402

# Q4_K everywhere llama-quantize --pure can put it; the embedding on Q8_0 as QAT's export keeps it (llama.cpp's
# choice for a tied 576-wide embedding)
UNIFORM_Q4_K = {"attention": "Q4_K", "feed_forward": "Q4_K"}


def rows(steps: int, samples: int, seqlen: int) -> list[tuple[str, str | None, QuantSpec]]:
    """(label, RTN row it is compared with, spec)."""
    real = CalibrationSpec(source="dataset", samples=samples, seqlen=seqlen)
    synth = CalibrationSpec(source="synthetic", samples=samples, seqlen=seqlen)
    # GPTQ (one pass, no training): the usual 128 sequences of 512 tokens
    gptq_real, gptq_synth = CalibrationSpec(source="dataset"), CalibrationSpec(source="synthetic")
    return [
        ("Q4_0 round-to-nearest", None, quant_spec(method="gguf", gguf_type="Q4_0")),
        ("Q4_0 QAT, data-free", "Q4_0 round-to-nearest", quant_spec(method="qat", gguf_type="Q4_0", qat_steps=steps, calibration=synth)),
        ("Q4_0 QAT, real text", "Q4_0 round-to-nearest", quant_spec(method="qat", gguf_type="Q4_0", qat_steps=steps, calibration=real)),
        ("Q4_0 GPTQModel g32, real text", "Q4_0 round-to-nearest",
         quant_spec(method="gptq", bits=4, group_size=32, gguf_type="Q4_0", calibration=gptq_real)),
        ("Q4_0 GPTQ act-order, real text", "Q4_0 round-to-nearest",
         quant_spec(method="gptq", gguf_type="Q4_0", act_order=True, calibration=gptq_real)),
        ("Q4_K round-to-nearest", None, quant_spec(method="gguf", gguf_type="Q8_0", layer_types=UNIFORM_Q4_K)),
        ("Q4_K QAT, data-free", "Q4_K round-to-nearest", quant_spec(method="qat", gguf_type="Q4_K", qat_steps=steps, calibration=synth)),
        ("Q4_K QAT, real text", "Q4_K round-to-nearest", quant_spec(method="qat", gguf_type="Q4_K", qat_steps=steps, calibration=real)),
        ("Q4_K GPTQ, data-free", "Q4_K round-to-nearest", quant_spec(method="gptq", gguf_type="Q4_K", calibration=gptq_synth)),
        ("Q4_K GPTQ, real text", "Q4_K round-to-nearest", quant_spec(method="gptq", gguf_type="Q4_K", calibration=gptq_real)),
        ("Q4_K GPTQ act-order, real text", "Q4_K round-to-nearest",
         quant_spec(method="gptq", gguf_type="Q4_K", act_order=True, calibration=gptq_real)),
        ("mixed arch-default (RTN)", None, quant_spec(method="gguf", preset="arch-default")),
        ("mixed arch-default GPTQ, real text", "mixed arch-default (RTN)",
         quant_spec(method="gptq", preset="arch-default", calibration=gptq_real)),
        ("mixed arch-default GPTQ act-order, real text", "mixed arch-default (RTN)",
         quant_spec(method="gptq", preset="arch-default", act_order=True, calibration=gptq_real)),
        ("Q8_0 round-to-nearest", None, quant_spec(method="gguf", gguf_type="Q8_0")),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="QAT optimizer steps (batch 4)")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (real or synthetic)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--speed", action="store_true", help="also measure generation speed (slower)")
    p.add_argument("--only", nargs="+", help="row labels to run (substring match)")
    a = p.parse_args()
    dataset = DATASETS_DIR / "shakespeare"
    out_json = SLM_DIR / "reports" / "bench_qat.json"
    results: dict[str, dict] = {}
    if a.only and out_json.is_file():  # a partial run updates its rows of the report and prints only its own
        results = {k: v for k, v in json.loads(out_json.read_text()).items() if k in {label for label, _, _ in rows(1, 1, 16)}}
    ran: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as tmp:
        for label, rtn_label, spec in rows(a.steps, a.samples, a.seqlen):
            if a.only and not any(o.lower() in label.lower() for o in a.only):
                continue
            out = Path(tmp) / spec.tag()
            q = quantize_model(OFFGRID_MODEL_DIR, out, spec)
            r = validate_quantization(ValidationRequest(quantized=q.model_path, baseline=str(OFFGRID_MODEL_DIR), dataset_dir=str(dataset),
                                                        chunks=a.chunks, measure_speed=a.speed, nominal_bits=None,
                                                        report_path=str(Path(tmp) / f"{spec.tag()}.json")))
            qat = json.loads((out / "qat_result.json").read_text()) if spec.trains else None
            ran.append(label)
            results[label] = {"rtn": rtn_label, "quantization": json.loads(q.model_dump_json()),
                              "validation": json.loads(r.model_dump_json()), "qat": qat}
            print(f"  {label:30s} ppl {r.kld.ppl_increase_pct:+6.2f} %  KLD {r.kld.kld_mean:.4f}  bpw {r.size_quantized.bits_per_weight:.2f}"
                  f"  {q.wall_s:.0f} s", flush=True)
            write_json_atomic(out_json, results)
    table_rows = []
    for label in ran:
        x = results[label]
        k, q = x["validation"]["kld"], x["quantization"]
        gap = "-"
        if x["rtn"] in ran:  # the baseline measured in this run
            base = results[x["rtn"]]["validation"]["kld"]["ppl_increase_pct"]
            gap = f"{100 * (base - k['ppl_increase_pct']) / base:.0f} %" if base > 0 else "-"
        qat = x["qat"]
        table_rows.append([label, f"{k['ppl_increase_pct']:+.2f} %", f"{k['kld_mean']:.4f}", f"{100 * k['same_top_rate']:.1f} %",
                           f"{x['validation']['size_quantized']['bits_per_weight']:.2f}",
                           f"{q['wall_s']:.0f} s" if q["spec"]["method"] in ("qat", "gptq") else "-",
                           f"{qat['rtn_kl']:.4f} -> {qat['final_kl']:.4f}" if qat else "-", gap,
                           "pass" if x["validation"]["passed"] else "fail"])
    print()
    print(f"off-grid SmolLM2-135M, test split {a.chunks} x 512 tokens; QAT: {a.steps} steps of 4 x {a.seqlen} tokens, "
          f"{a.samples} calibration sequences; GPTQ: 128 x 512 tokens")
    print(table(["model", "ppl increase", "mean KLD", "same top", "bits/weight", "QAT/GPTQ wall time", "held-out KL (QAT)",
                 "gap recovered", "verdict"], table_rows))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s\nreport: {out_json}")


if __name__ == "__main__":
    main()
