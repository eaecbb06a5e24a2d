"""Fixed against sequential verdicts: the same files validated under both rules, in one run.

    .venv/bin/python bench/bench_sequential.py [--model DIR] [--int4 FILE] [--types Q8_0 Q4_K_M] [--no-speed]

For each file (llama.cpp's Q8_0 and Q4_K_M of the model, and --int4: a whole-file 4-bit GGUF such as the one a
`make run` writes; without it, llama.cpp's IQ4_NL of the whole file) it runs validate_quantization twice with the
default acceptance spec and the default policy's held-out texts:

    fixed       eval.sequential false and every criterion measured (the rule before sequential verdicts: the first
                16 chunks of each text, doubled up to 64 while within 2 standard errors of the bar; 5 speed pairs, 5
                more while within 2; 200 benchmark items, doubled up to 800)
    sequential  eval.sequential true: each bar decided at its first look under the raised boundary, and what can no
                longer change the verdict not measured

and prints, per file and rule: the verdict, what bound it, the chunks scored per text, the speed pairs, the benchmark
items scored, the criteria not measured, and the wall time. The float model's benchmark answers are cached by the
sha256 of its file, so the first validation of the first file also pays for them: the order of the rules alternates
between files. Writes SLM/reports/bench_sequential.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from quantloop.agents.policy import load_policy  # noqa: E402
from quantloop.backends.gguf import quantize_gguf  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.models.checkpoints import resolve_model  # noqa: E402
from quantloop.paths import SLM_DIR, default_model_dir  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import ValidationRequest  # noqa: E402
from quantloop.specs import DEFAULT_SPEC  # noqa: E402
from quantloop.tools.validate import validate_quantization  # noqa: E402

RULES = {"fixed": {"sequential": False}, "sequential": {"sequential": True}}


def spec_file(folder: Path, rule: str) -> str:
    spec = yaml.safe_load(Path(DEFAULT_SPEC).read_text())
    spec["eval"] |= RULES[rule]
    path = folder / f"acceptance-{rule}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def summarize(report, wall_s: float) -> dict:
    acc = report.measurements.get("accuracy", {})
    texts = {"test": report.kld.tokens} | {d: k.tokens for d, k in report.held_out_kld.items()}
    return {
        "passed": report.passed,
        "failing": [c.name for c in report.criteria if c.binding and not c.passed],
        "not_measured": [c.name for c in report.criteria if c.detail.startswith("not measured")],
        "tokens": texts,
        "pairs": len(report.speedup_tg_pairs),
        "speedup": report.speedup_tg,
        "ppl_increase_pct": report.kld.ppl_increase_pct,
        "items": sum(t["items"] for t in acc.get("tasks", {}).values()),
        "wall_s": wall_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_dir()), help="the float model (default: the off-grid twin)")
    p.add_argument("--types", nargs="*", default=["Q8_0", "Q4_K_M"], help="llama.cpp types to quantize to")
    p.add_argument("--int4", help="a whole-file 4-bit GGUF to validate too (default: llama.cpp's IQ4_NL of the model)")
    p.add_argument("--no-speed", action="store_true", help="leave the speed bar out (both rules)")
    a = p.parse_args()
    base = resolve_model(a.model)
    held_out = [d for d in load_policy(None, None)[0].validation.held_out if (SLM_DIR / "datasets" / d).is_dir()]
    out: list[dict] = []
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {t: quantize_gguf(base.gguf, tmp / f"model-{t}.gguf", t) for t in a.types}
        files["INT4"] = Path(a.int4) if a.int4 else quantize_gguf(base.gguf, tmp / "model-IQ4_NL.gguf", "IQ4_NL")
        for i, (name, path) in enumerate(files.items()):
            for rule in (list(RULES) if i % 2 == 0 else list(RULES)[::-1]):
                t0 = time.perf_counter()
                print(f"{name} under the {rule} rule ...", file=sys.stderr, flush=True)
                r = validate_quantization(ValidationRequest(
                    quantized=str(path), baseline=str(base.path), spec_file=spec_file(tmp, rule), held_out=held_out,
                    measure_speed=not a.no_speed, full_report=rule == "fixed", report_path=str(tmp / f"{name}-{rule}.json")))
                s = summarize(r, time.perf_counter() - t0) | {"file": name, "rule": rule}
                out.append(s)
                chunks = ", ".join(f"{d} {n // 255}" for d, n in s["tokens"].items())
                rows.append([name, rule, "pass" if s["passed"] else "fail", ", ".join(s["failing"]) or "-", chunks, s["pairs"],
                             s["items"], ", ".join(s["not_measured"]) or "-", f"{s['wall_s']:.0f} s"])
                print(table(["file", "rule", "verdict", "failing", "chunks scored", "pairs", "items", "not measured", "wall"],
                            rows[-1:]), file=sys.stderr, flush=True)
    print(f"\n{base.path.name}: fixed rule against sequential verdicts, held-out texts {', '.join(held_out) or 'none'}")
    print(table(["file", "rule", "verdict", "failing", "chunks scored", "pairs", "items", "not measured", "wall"], rows))
    for name in files:
        f, s = (next(o for o in out if o["file"] == name and o["rule"] == r) for r in RULES)
        same = "same verdict" if f["passed"] == s["passed"] else "DIFFERENT verdict"
        print(f"{name}: {same}; wall {f['wall_s']:.0f} s -> {s['wall_s']:.0f} s ({s['wall_s'] / f['wall_s']:.0%})")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    write_json_atomic(SLM_DIR / "reports" / "bench_sequential.json", {"model": str(base.path), "held_out": held_out, "runs": out})


if __name__ == "__main__":
    main()
