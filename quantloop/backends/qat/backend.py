"""Quantization-aware training by distillation onto an exact GGUF grid (block-32 types and k-quants): the backend.

The student is a copy of the float teacher whose q/k/v/o/gate/up/down linear weights (and a block-typed token
embedding / output head) pass through a fake quantizer equal bit for bit to what the GGUF will hold
(quantloop.gguf.torch_grid, quantloop.gguf.learned_scales), trained with a straight-through estimator by KL
distillation (train.py); at export the trained codes and scales are written block for block, so the GGUF holds
exactly what was trained. K-quants: each layer's sub-block grid is frozen from llama.cpp's rounding when the layer
is switched on; at the end every weight is re-rounded by llama.cpp's k-quant rounding (what the GGUF holds) and the
final KL is measured after that. Rows a super-block does not divide use llama.cpp's fallback type, as llama-quantize
does.

Public: kl_divergence, QATConfig, QATResult, run_qat, qat_checkpoint, QATBackend.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from quantloop.backends.base import (
    Backend,
    BackendJob,
    BackendOutput,
    save_and_export,
)
from quantloop.backends.qat.teacher import kl_divergence  # noqa: F401
from quantloop.backends.qat.train import QATConfig, QATResult, run_qat  # noqa: F401
from quantloop.gguf.export import export_note
from quantloop.gguf.precision_map import plan_precision_map
from quantloop.gguf.torch_grid import check_grid_model, check_grid_type
from quantloop.models.checkpoints import load_hf_model


def qat_checkpoint(hf_dir, out_dir, gguf_type: str, sequences, steps: int = 200, seed: int = 0,
                   config: QATConfig | None = None, overwrite: bool = False, gguf_name: str | None = None,
                   tensor_types: dict[str, str] | None = None, embedding_type: str = "auto") -> Path:
    """QAT of the float checkpoint hf_dir for `gguf_type`; writes out_dir (float32 HF checkpoint, weights on
    the grid, plus tokenizer and qat_result.json) and out_dir/<name>-<type>.gguf; returns the GGUF path."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    gguf_type = check_grid_type(gguf_type)
    cfg = dataclasses.replace(config or QATConfig(), gguf_type=gguf_type, steps=int(steps), seed=int(seed),
                              tensor_types=dict(tensor_types or {}), embedding_type=embedding_type)
    teacher = load_hf_model(hf_dir)
    check_grid_model(teacher, gguf_type, hf_dir)
    student, result, blocks = run_qat(teacher, sequences, cfg)
    trained_unix = round(time.time(), 3)  # when training stopped: what the step does after it (export) is timed from here
    del teacher
    gguf_name = gguf_name or f"{hf_dir.resolve().name}-{gguf_type}.gguf"
    return save_and_export(student, hf_dir, out_dir, "qat_result.json", result.to_dict() | {"trained_unix": trained_unix},
                           gguf_name, gguf_type,
                           embedding_type=result.embedding_type or "F16", tensor_types=cfg.tensor_types, overwrite=overwrite,
                           blocks=blocks)


def qat_config(spec) -> QATConfig:
    """The trainer's settings for a spec. From GPTQ's solution every weight is on its grid from the start, so the
    progressive stages (which put layers on their grids in turn, most sensitive first) have nothing to stage: one
    global stage, no per-layer sensitivity pass (111 s on SmolLM2), every step trains every layer."""
    staged = {} if spec.qat_init != "gptq" else {"groups": 1, "global_fraction": 1.0, "check_every": 0}
    return QATConfig(init=spec.qat_init, max_s=60 * spec.qat_max_minutes if spec.qat_max_minutes else None, **staged)


class QATBackend(Backend):
    """Quantization-aware training by KL distillation onto a GGUF type's grid (or a precision map's grids)."""

    method = "qat"
    writer = "the QAT export"
    libraries = ("torch", "transformers", "gguf")

    def plan(self, job: BackendJob) -> tuple[str, dict[str, str], dict[str, str], str]:
        """(GGUF type, tensor-type rules, planned types, embedding type); the type is checked for QAT."""
        spec = job.spec
        if not spec.has_precision_map():
            return check_grid_type(spec.gguf_type, spec.bits, spec.symmetric), {}, {}, "auto"
        base, rules, planned, embedding_type = plan_precision_map(job.model.gguf, spec)  # base: the embeddings' type
        return check_grid_type(base), rules, planned, embedding_type

    def check(self, job: BackendJob) -> None:
        self.plan(job)

    def quantize(self, job: BackendJob) -> BackendOutput:
        spec = job.spec
        gguf_type, rules, planned, embedding_type = self.plan(job)
        path = qat_checkpoint(job.model.hf_dir, job.work_dir, gguf_type, job.sequences, steps=spec.qat_steps, seed=spec.seed,
                              config=qat_config(spec), gguf_name=job.gguf_name(), tensor_types=rules, embedding_type=embedding_type)


        result = json.loads((job.work_dir / "qat_result.json").read_text())
        notes = [export_note(result["export"])]
        if result.get("kept_start"):
            notes.append(f"QAT kept its starting weights ({result['init']}): after {result['steps']} steps the held-out KL "
                         f"was above the start's {result['rtn_kl']:.4g}")
        return BackendOutput(path, f"gguf:mixed-{spec.preset or 'custom'}" if spec.has_precision_map() else f"gguf:{gguf_type}",
                             planned, notes=notes)
