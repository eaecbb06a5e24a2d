"""INT4 on SmolLM2-135M (off-grid twin): every weight at 4 bits, the embedding included, against the F16 GGUF on
llama.cpp, on the test split of four text domains, in one run.

    .venv/bin/python bench/bench_int4.py [--only LABEL ...] [--types IQ4_NL] [--chunks 16] [--qat-minutes 20] [--no-speed]

Rows: llama.cpp's own Q4_0 and IQ4_NL with an importance matrix (32 x 512 calibration tokens) and a 4-bit token
embedding (--pure, the pure 4.5-bit files just above the 3.5x bar); then, for each of --types, GPTQ act-order on
the whole-file grid (the tied embedding optimized as the output projection), pure and with a measured size budget
of 3.5x, and QAT started from that GPTQ with learned block scales (real text and data-free) under the same budget,
each QAT row trained for what --qat-minutes allows (as the default policy's QAT step is). Calibration mixes the
calibration splits of Shakespeare and python-docs, as the default policy does (or, data-free, the model's own
generations); bible and linux-docs are domains no calibration saw (prepare them with scripts/prepare-domains.sh).
Columns: perplexity increase with its standard error, mean KLD, same top token, bits per weight, size ratio against
the F16 file, token-generation speed ratio (median of interleaved llama-bench pairs, first domain only), wall time
of the quantization (QAT rows: with the training steps taken). Writes SLM/reports/bench_int4.json.
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
from quantloop.schemas import CalibrationSpec, KLDReport, QuantSpec, quant_spec, ValidationRequest  # noqa: E402
from quantloop.tools import validate_quantization  # noqa: E402
from quantloop.eval.criteria.perplexity import ppl_increase_stderr  # noqa: E402
from quantloop.tools.quantize import quantize_model  # noqa: E402

DOMAINS = ("shakespeare", "python-docs", "bible", "linux-docs")
MIX = ["python-docs"]  # the default policy's calibration mix
BAR = 3.5


def ppl_se(k: dict) -> float:
    return ppl_increase_stderr(KLDReport.model_validate(k))


def qat_record(output_dir: str) -> dict | None:
    """Steps taken and planned, held-out KL at the start and the end, of a QAT row (its qat_result.json)."""
    found = sorted(Path(output_dir).rglob("qat_result.json"))
    if not found:
        return None
    r = json.loads(found[0].read_text())
    t = r.get("timings", {})
    return ({k: r.get(k) for k in ("steps", "planned_steps", "time_limited", "rtn_kl", "final_kl", "kept_start", "curve")}
            | {k: t.get(k) for k in ("init_s", "tokens_per_s", "s_per_step")})


def qat_steps_cell(rec: dict | None) -> str:
    return "" if not rec else f", {rec['steps']} of {rec['planned_steps']} steps"


def whole_file(t: str) -> dict[str, str]:
    return {"embeddings": t, "attention": t, "feed_forward": t}


def rows(types: list[str], qat_minutes: float) -> list[tuple[str, QuantSpec]]:
    real = CalibrationSpec(source="dataset", mix=MIX)
    qat_real = CalibrationSpec(source="dataset", samples=128, seqlen=256, mix=MIX)
    qat_synth = CalibrationSpec(source="synthetic", samples=128, seqlen=256)
    out = [(f"llama.cpp {t} + imatrix, 4-bit embedding", quant_spec(method="gguf", gguf_type=t, layer_types=whole_file(t), imatrix=True,
                                                                  calibration=CalibrationSpec(samples=32, mix=MIX)))
           for t in ("Q4_0", "IQ4_NL")]
    for t in types:
        qat = dict(method="qat", gguf_type=t, layer_types=whole_file(t), qat_steps=200, qat_init="gptq", qat_max_minutes=qat_minutes,
                   min_size_ratio=BAR)
        out += [
            (f"GPTQ {t} act-order, whole file", quant_spec(method="gptq", gguf_type=t, layer_types=whole_file(t), act_order=True, calibration=real)),
            (f"GPTQ {t} act-order, budget {BAR}x", quant_spec(method="gptq", gguf_type=t, layer_types=whole_file(t), act_order=True,
                                                             min_size_ratio=BAR, calibration=real)),
            (f"QAT {t} from GPTQ, real text, budget {BAR}x", quant_spec(**qat, calibration=qat_real)),
            (f"QAT {t} from GPTQ, data-free, budget {BAR}x", quant_spec(**qat, calibration=qat_synth)),
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="row labels to run (substring match)")
    p.add_argument("--chunks", type=int, default=16, help="test chunks of 512 tokens per domain")
    p.add_argument("--types", nargs="+", default=["IQ4_NL"], help="grids of the GPTQ and QAT rows (Q4_0, IQ4_NL)")
    p.add_argument("--qat-minutes", type=float, default=20, help="time limit of each QAT row (budget, GPTQ start and training)")
    p.add_argument("--no-speed", action="store_true", help="skip the token-generation speed ratio")
    a = p.parse_args()
    domains = [d for d in DOMAINS if (DATASETS_DIR / d / "manifest.json").is_file()]
    missing = sorted(set(DOMAINS) - set(domains))
    if missing:
        print(f"not prepared (scripts/prepare-domains.sh): {', '.join(missing)}", flush=True)
    out_json = SLM_DIR / "reports" / "bench_int4.json"
    results = json.loads(out_json.read_text()) if a.only and out_json.is_file() else {}
    t_start = time.perf_counter()
    all_rows = rows(a.types, a.qat_minutes)
    ran = []
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as tmp:
        for i, (label, spec) in enumerate(all_rows):
            if a.only and not any(o.lower() in label.lower() for o in a.only):
                continue
            out = Path(tmp) / f"{i:02d}-{spec.tag()}"  # two rows can share a tag (llama.cpp's mixes of Q4_0 and IQ4_NL)
            try:
                q = quantize_model(OFFGRID_MODEL_DIR, out, spec)
            except Exception as e:  # noqa: BLE001 — a row that cannot run says why; the others still run
                print(f"  {label}: not run ({str(e).splitlines()[0][:160]})", flush=True)
                results[label] = {"error": str(e).splitlines()[0]}
                continue
            by_domain = {}
            for i, d in enumerate(domains):
                r = validate_quantization(ValidationRequest(
                    quantized=q.model_path, baseline=str(OFFGRID_MODEL_DIR), dataset_dir=str(DATASETS_DIR / d), chunks=a.chunks,
                    measure_speed=(i == 0 and not a.no_speed), check_generation=(i == 0), nominal_bits=4,
                    report_path=str(Path(tmp) / f"{spec.tag()}-{d}.json")))
                by_domain[d] = json.loads(r.model_dump_json())
                print(f"  {label} [{d}]: ppl {r.kld.ppl_increase_pct:+.2f} % ± {ppl_increase_stderr(r.kld):.2f}, "
                      f"KLD {r.kld.kld_mean:.4f}, size {r.size_ratio:.3f}x", flush=True)
            ran.append(label)
            results[label] = {"quantization": json.loads(q.model_dump_json()), "validation": by_domain, "qat": qat_record(q.output_dir)}
            write_json_atomic(out_json, results)
    table_rows = []
    # with --only, the rows of earlier runs in the report join the table (marked), in the bench's order
    for label in [r for r, _ in all_rows if "validation" in results.get(r, {})]:
        x = results[label]
        q, first = x["quantization"], x["validation"][domains[0]]
        cells = [label + ("" if label in ran else " (earlier run)")]
        for d in domains:
            k = x["validation"][d]["kld"]
            cells.append(f"{k['ppl_increase_pct']:+.2f} ± {ppl_se(k):.2f} %, KLD {k['kld_mean']:.3f}, "
                         f"top {100 * k['same_top_rate']:.0f} %")
        tg = first.get("speedup_tg")
        cells += [f"{first['size_quantized']['bits_per_weight']:.3f}", f"{first['size_ratio']:.3f}x" + (" ✓" if first["size_ratio"] >= BAR else ""),
                  "-" if tg is None else f"{tg:.2f}x ± {first.get('speedup_tg_stderr') or 0:.2f}", f"{q['wall_s']:.0f} s" + qat_steps_cell(x.get("qat"))]
        table_rows.append(cells)
    print()
    print(f"off-grid SmolLM2-135M against its F16 GGUF on llama.cpp; test splits, {a.chunks} x 512 tokens per domain; "
          f"size bar {BAR}x of the F16 file (whole file)")
    print(table(["model"] + [f"{d}: ppl increase, KLD, same top" for d in domains] +
                ["bits/weight", "size ratio", "tg speed", "wall"], table_rows))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s\nreport: {out_json}")


if __name__ == "__main__":
    main()
