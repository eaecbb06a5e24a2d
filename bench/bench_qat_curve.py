"""QAT quality against steps on SmolLM2-135M (off-grid twin): one run, GGUFs exported at a few step counts, each
validated on llama.cpp against the F16 GGUF (perplexity increase, mean KLD, same top) on the test split.

    .venv/bin/python bench/bench_qat_curve.py [--type Q4_0] [--embedding-type Q4_0] [--steps 200]
        [--at 0,25,50,100,200] [--init gptq] [--samples 128] [--seqlen 256] [--data-free] [--chunks 16]
        [--policy-step int4-qat-iq4nl] [--held-out python-docs --held-out bible ...] [--held-out-chunks 8]

--policy-step takes the grids, the size budget (measured, as the run plans it) and the calibration mix from a
step of specs/policy.yaml instead of --type/--embedding-type; --held-out scores each snapshot on more test texts.

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
from quantloop.backends.qat.backend import QATConfig, run_qat  # noqa: E402
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
    p.add_argument("--policy-step", help="take grids, size budget and calibration mix from this step of specs/policy.yaml")
    p.add_argument("--held-out", action="append", default=[], help="more test text to score each snapshot on (repeatable)")
    p.add_argument("--held-out-chunks", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = Path(a.model)
    at = sorted({int(s) for s in a.at.split(",")})
    spec = CalibrationSpec(source="synthetic" if a.data_free else "dataset", samples=a.samples, seqlen=a.seqlen)
    t_start = time.perf_counter()
    gguf_type, embedding_type, rules = a.type, a.embedding_type, {}
    if a.policy_step:
        gguf_type, embedding_type, rules, spec = policy_step_grids(model_dir, a.policy_step, a.data_free)
    seqs, _ = calibration_sequences(spec, load_hf_tokenizer(model_dir), model_dir)
    teacher = load_hf_model(model_dir)
    cfg = QATConfig(gguf_type=gguf_type, embedding_type=embedding_type, tensor_types=rules, steps=a.steps, init=a.init, lr=a.lr,
                    scale_lr=a.scale_lr, groups=1, global_fraction=1.0, check_every=0, device="cpu", snapshot_steps=tuple(at),
                    progress=True, threads=a.threads)
    report: dict = {"model": str(model_dir), "config": {k: v for k, v in cfg.__dict__.items() if k != "tensor_types"},
                    "calibration": spec.model_dump(), "threads": a.threads, "points": []}
    with tempfile.TemporaryDirectory(dir=SLM_DIR) as scratch:
        tmp = a.keep or scratch
        files: dict[int, tuple[Path, float]] = {}

        def snapshot(step, model, blocks):
            out = Path(tmp) / f"step{step}"
            path = save_and_export(model, model_dir, out, "snapshot.json", {"step": step}, f"qat-{step}.gguf", gguf_type,
                                   embedding_type=embedding_type, tensor_types=rules, blocks=blocks)
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
                                                        held_out=a.held_out, held_out_chunks=a.held_out_chunks,
                                                        measure_speed=False, check_generation=False,
                                                        report_path=str(Path(tmp) / f"v{step}.json")))
            k = r.kld
            domains = {name: {"ppl_increase_pct": h.ppl_increase_pct, "ppl_increase_se_pct": 100 * h.ppl_ratio * h.ln_ppl_ratio_stderr,
                              "kld_mean": h.kld_mean} for name, h in r.held_out_kld.items()}
            report["points"].append({"step": step, "ppl_increase_pct": k.ppl_increase_pct, "kld_mean": k.kld_mean,
                                     "same_top_rate": k.same_top_rate, "bits_per_weight": r.size_quantized.bits_per_weight,
                                     "size_ratio": r.size_ratio, "bytes": path.stat().st_size, "wall_s_at_export": round(wall, 1),
                                     "heldout_kl": kl_at.get(step), "domains": domains})
            others = "  ".join(f"{n} {d['ppl_increase_pct']:+.2f} %" for n, d in domains.items())
            print(f"  step {step}: ppl {k.ppl_increase_pct:+.2f} %  KLD {k.kld_mean:.4f}  {others}", flush=True)
            write_json_atomic(Path(a.out), report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(Path(a.out), report)
    names = list(report["points"][0]["domains"]) if report["points"] else []
    print(table(["step", "ppl increase", "mean KLD", "same top", *names, "bits/weight", "wall s at export"],
                [[x["step"], f"{x['ppl_increase_pct']:+.2f} %", f"{x['kld_mean']:.4f}", f"{100 * x['same_top_rate']:.1f} %",
                  *(f"{x['domains'][n]['ppl_increase_pct']:+.2f} % / {x['domains'][n]['kld_mean']:.3f}" for n in names),
                  f"{x['bits_per_weight']:.3f}", x["wall_s_at_export"]] for x in report["points"]]))
    print(f"report: {a.out}")


def policy_step_grids(model_dir: Path, step_name: str, data_free: bool):
    """(base type, embedding type, tensor-type rules, calibration) of a policy step, its size budget met as a run
    meets it (the measured sensitivity decides which tensors go lower)."""
    from quantloop.agents.policy import load_policy
    from quantloop.gguf.precision_map import plan_precision_map
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.budget import fit_to_budget

    policy, _ = load_policy()
    step = next((s for s in policy.plan_steps() if s.name == step_name), None)
    if step is None or step.spec is None:
        raise SystemExit(f"policy step {step_name!r} not found (or has no spec) in specs/policy.yaml")
    spec = step.spec
    if data_free:
        spec = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"source": "synthetic", "mix": []})})
    model = resolve_model(model_dir)
    if spec.min_size_ratio:
        spec, record = fit_to_budget(model, spec)
        print(f"size budget: {record.bytes if record.bytes is not None else record.planned_bytes:,} bytes, "
              f"{len(record.downgrades)} downgrades", flush=True)
    base, rules, _, embedding_type = plan_precision_map(model.gguf, spec)
    return base, embedding_type, rules, spec.calibration


if __name__ == "__main__":
    main()
