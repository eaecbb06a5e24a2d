"""QAT quality against steps on SmolLM2-135M (off-grid twin): one run, GGUFs exported at a few step counts, each
validated on llama.cpp against the F16 GGUF (perplexity increase, mean KLD, same top) on the test split.

    .venv/bin/python bench/bench_qat_curve.py [--type Q4_0] [--embedding-type Q4_0] [--steps 200]
        [--at 0,25,50,100,200] [--init gptq] [--samples 128] [--seqlen 256] [--data-free] [--chunks 16]

Step 0 is the starting point (GPTQ's solution with init gptq, round-to-nearest with init teacher). The GGUFs are
validated after training, so validation does not compete with it for the CPU. Writes SLM/reports/qat_curve.json.
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

import torch  # noqa: E402

from quantloop.backends.base import save_and_export  # noqa: E402
from quantloop.backends.qat import QATConfig, run_qat  # noqa: E402
from quantloop.data.calibration import calibration_sequences  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer  # noqa: E402
from quantloop.paths import DATASETS_DIR, OFFGRID_MODEL_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, ValidationRequest  # noqa: E402
from quantloop.tools import validate_quantization  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(OFFGRID_MODEL_DIR), help="prepared checkpoint (default: the off-grid twin)")
    p.add_argument("--type", default="Q4_0")
    p.add_argument("--embedding-type", default="Q4_0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--at", default="0,25,50,100,200", help="step counts to export and validate")
    p.add_argument("--init", default="gptq", choices=["gptq", "teacher"])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=QATConfig.lr)
    p.add_argument("--scale-lr", type=float, default=QATConfig.scale_lr)
    p.add_argument("--data-free", action="store_true")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("QUANTLOOP_THREADS", os.cpu_count() or 1)))
    p.add_argument("--out", default=str(SLM_DIR / "reports" / "qat_curve.json"))
    p.add_argument("--keep", help="folder to keep the exported GGUFs in (default: a temporary folder)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = Path(a.model)
    at = sorted({int(s) for s in a.at.split(",")})
    spec = CalibrationSpec(source="synthetic" if a.data_free else "dataset", samples=a.samples, seqlen=a.seqlen)
    t_start = time.perf_counter()
    seqs, _ = calibration_sequences(spec, load_hf_tokenizer(model_dir), model_dir)
    teacher = load_hf_model(model_dir)
    cfg = QATConfig(gguf_type=a.type, embedding_type=a.embedding_type, steps=a.steps, init=a.init, lr=a.lr, scale_lr=a.scale_lr,
                    groups=1, global_fraction=1.0, check_every=0, device="cpu", snapshot_steps=tuple(at), progress=True,
                    threads=a.threads)
    report: dict = {"model": str(model_dir), "config": {k: v for k, v in cfg.__dict__.items() if k != "tensor_types"},
                    "calibration": spec.model_dump(), "threads": a.threads, "points": []}
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as scratch:
        tmp = a.keep or scratch
        files: dict[int, tuple[Path, float]] = {}

        def snapshot(step, model, blocks):
            out = Path(tmp) / f"step{step}"
            path = save_and_export(model, model_dir, out, "snapshot.json", {"step": step}, f"qat-{step}.gguf", a.type,
                                   embedding_type=a.embedding_type, blocks=blocks)
            (out / "model.safetensors").unlink()  # the GGUF is what is measured
            files[step] = (path, time.perf_counter() - t_start)
            print(f"  exported step {step} ({files[step][1]:.0f} s)", flush=True)

        _, res, _ = run_qat(teacher, seqs, cfg, snapshot=snapshot)
        del teacher
        report["qat"] = {k: v for k, v in res.to_dict().items() if k not in ("stages",)}
        print(f"QAT done: {res.steps} steps, {res.timings}", flush=True)
        kl_at = {c["step"]: c["kl"] for c in res.curve}
        for step, (path, wall) in sorted(files.items()):
            r = validate_quantization(ValidationRequest(quantized=str(path), baseline=str(model_dir),
                                                        dataset_dir=str(DATASETS_DIR / "shakespeare"), chunks=a.chunks,
                                                        measure_speed=False, check_generation=False,
                                                        report_path=str(Path(tmp) / f"v{step}.json")))
            k = r.kld
            report["points"].append({"step": step, "ppl_increase_pct": k.ppl_increase_pct, "kld_mean": k.kld_mean,
                                     "same_top_rate": k.same_top_rate, "bits_per_weight": r.size_quantized.bits_per_weight,
                                     "bytes": path.stat().st_size, "wall_s_at_export": round(wall, 1), "heldout_kl": kl_at.get(step)})
            print(f"  step {step}: ppl {k.ppl_increase_pct:+.2f} %  KLD {k.kld_mean:.4f}", flush=True)
            write_json_atomic(Path(a.out), report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(Path(a.out), report)
    print(table(["step", "ppl increase", "mean KLD", "same top", "bits/weight", "wall s at export"],
                [[x["step"], f"{x['ppl_increase_pct']:+.2f} %", f"{x['kld_mean']:.4f}", f"{100 * x['same_top_rate']:.1f} %",
                  f"{x['bits_per_weight']:.3f}", x["wall_s_at_export"]] for x in report["points"]]))
    print(f"report: {a.out}")


if __name__ == "__main__":
    main()
