"""QAT throughput on SmolLM2-135M (off-grid twin): tokens/s and s/step of the training steps, in one run.

    .venv/bin/python bench/bench_qat_speed.py [--steps 4] [--seqlen 256] [--samples 10] [--threads N]

Rows (batch 4 x seqlen tokens per step, real calibration text):
  - Q4_K, the teacher run at every step on the full vocabulary (how QAT ran before the teacher cache);
  - Q4_K, the teacher's top-256 log-probabilities cached per sequence (the default);
  - Q4_0 everywhere with learned block scales and the Q4_0 token embedding trained (the INT4 recipe).
The cached rows run the teacher once per sequence, the first time it is drawn (a real run of 200 steps over 128
sequences draws each about 6 times); "s/step, cache warm" leaves those teacher passes out, which is the cost of
every later step. A regression shows as a higher s/step than an earlier run of the same row on the same machine.
Writes SLM/reports/bench_qat_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantloop.backends.qat.backend import QATConfig, run_qat  # noqa: E402
from quantloop.data.calibration import calibration_sequences  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer  # noqa: E402
from quantloop.paths import OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec  # noqa: E402


def rows() -> list[tuple[str, dict]]:
    return [
        ("Q4_K, teacher every step, full-vocabulary KL", dict(gguf_type="Q4_K", teacher_top_k=0)),
        ("Q4_K, cached teacher top-256", dict(gguf_type="Q4_K")),
        ("Q4_0 + Q4_0 embedding, learned scales, cached top-256", dict(gguf_type="Q4_0", embedding_type="Q4_0")),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--samples", type=int, default=10, help="calibration sequences (2 of them held out)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("QUANTLOOP_THREADS", os.cpu_count() or 1)))
    a = p.parse_args()
    samples = a.samples
    seqs, _ = calibration_sequences(CalibrationSpec(source="dataset", samples=samples, seqlen=a.seqlen),
                                    load_hf_tokenizer(OFFGRID_MODEL_DIR), OFFGRID_MODEL_DIR)
    teacher = load_hf_model(OFFGRID_MODEL_DIR)
    out = []
    for label, kw in rows():
        cfg = QATConfig(steps=a.steps, groups=1, global_fraction=1.0, check_every=0, batch_size=4, progress=False,
                        device="cpu", threads=a.threads, **kw)
        t = time.perf_counter()
        _, res, _ = run_qat(teacher, seqs, cfg)
        tm = res.timings
        warm = tm["s_per_step_cache_warm"] or tm["s_per_step"]
        out.append({"row": label, "tokens_per_s": tm["tokens_per_s"], "s_per_step": tm["s_per_step"], "s_per_step_warm": warm,
                    "tokens_per_s_warm": round(4 * a.seqlen / warm, 1), "steps": res.steps,
                    "teacher_sequences": tm["teacher_sequences"], "setup_s": round(tm["sensitivity_s"] + tm["init_s"], 1),
                    "wall_s": round(time.perf_counter() - t, 1), "start_kl": res.rtn_kl, "final_kl": res.final_kl})
        print(f"{label}: {tm['tokens_per_s']} tokens/s, {tm['s_per_step']} s/step, {warm} s/step cache warm", flush=True)
    print(f"\noff-grid SmolLM2-135M, {a.steps} steps of 4 x {a.seqlen} tokens, {a.threads} threads")
    print(table(["row", "tokens/s", "s/step", "tokens/s, cache warm", "s/step, cache warm", "teacher passes", "setup s", "wall s"],
                [[r["row"], f"{r['tokens_per_s']:.0f}", f"{r['s_per_step']:.2f}", f"{r['tokens_per_s_warm']:.0f}", f"{r['s_per_step_warm']:.2f}",
                  r["teacher_sequences"], r["setup_s"], r["wall_s"]] for r in out]))
    write_json_atomic(SLM_DIR / "reports" / "bench_qat_speed.json", {"threads": a.threads, "seqlen": a.seqlen, "steps": a.steps, "rows": out})


if __name__ == "__main__":
    main()
