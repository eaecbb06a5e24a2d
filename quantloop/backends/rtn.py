"""Round-to-nearest (RTN) fake quantization: the calibration-free baseline.

Each output row is cut into groups of `group_size` consecutive input columns;
each group gets its own scale, and every weight is rounded to the nearest
level (ties round up, as llama.cpp does) and written back dequantized. Scales
and offsets are rounded to fp16 first, as GGUF and GPTQ store them, so a
layout that a GGUF block type holds (group 32) exports to it exactly.

- asymmetric (GGUF Q4_1 style): scale = (max - min) / (2^bits - 1), offset = min,
  w ~ q * scale + min with q in [0, 2^bits - 1]. Error at most half a step.
- symmetric (GGUF Q4_0 style): m = the group's value of largest magnitude, with
  its sign; scale = m / -2^(bits-1), w ~ (q - 2^(bits-1)) * scale with q in
  [0, 2^bits - 1]. m itself is exact; values on the side opposite m beyond
  2^(bits-1) - 1/2 steps clamp to the last level (error up to one step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantloop.backends.base import Backend, BackendJob, BackendOutput
from quantloop.errors import InputError
from quantloop.gguf import blocks as gb
from quantloop.gguf.export import export_exact_gguf, export_note
from quantloop.gguf.tensor_names import gguf_tensor_name, linear_modules
from quantloop.models.checkpoints import load_hf_model, save_tokenizer


def check_rtn_settings(width: int, bits: int, group_size: int, where: str | None = None) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise InputError(where, f"RTN bits must be an integer from 2 to 8, not {bits!r}", "use 4 or 8")
    if not isinstance(group_size, int) or group_size < 1:
        raise InputError(where, f"RTN group size must be a positive integer, not {group_size!r}", "use e.g. 32")
    if width % group_size:
        raise InputError(where, f"RTN group size {group_size} does not divide the weight width {width}", "pick a group size that divides every input width (32 for SmolLM2)")


def rtn_fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, codes: bool = False):
    """Round a [out, in] weight to a bits-wide grid per group of input columns; returns the dequantized weight,
    or with codes=True (weight, q, scale, offset): q integer codes, scale and offset (None when symmetric) fp16
    per group, so that weight = scale * (q - 2^(bits-1)) or scale * q + offset exactly, as the GGUF stores it."""
    if w.dim() != 2:
        raise InputError(None, f"RTN expects a 2-D weight, got shape {tuple(w.shape)}")
    out_features, width = w.shape
    check_rtn_settings(width, bits, group_size)
    x = w.detach().float().reshape(out_features, width // group_size, group_size)
    levels = 2**bits - 1
    lo = None
    if symmetric:
        half = 2 ** (bits - 1)
        idx = x.abs().argmax(dim=-1, keepdim=True)
        scale = (x.gather(-1, idx) / -half).half().float()  # fp16 scales, as stored by GGUF and GPTQ
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.floor(x / safe + half + 0.5), 0, levels)
        deq = (q - half) * scale
    else:
        lo = x.amin(dim=-1, keepdim=True).half().float()
        scale = ((x.amax(dim=-1, keepdim=True) - lo) / levels).half().float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.floor((x - lo) / safe + 0.5), 0, levels)
        deq = q * scale + lo
    deq = deq.reshape(out_features, width).to(w.dtype)
    if not codes:
        return deq
    return deq, q.reshape(out_features, width).to(torch.uint8), scale.reshape(out_features, -1), \
        None if lo is None else lo.reshape(out_features, -1)


def rtn_quantize_model_(model, bits: int, group_size: int, symmetric: bool, gguf_type: str | None = None) -> dict:
    """Fake-quantize every q/k/v/o/gate/up/down linear weight in place. Returns the module names it changed, or,
    with a block-32 `gguf_type` (group 32), the blocks the GGUF holds: GGUF name -> (type, QuantBlocks)."""
    linears = linear_modules(model)
    if not linears:
        raise InputError(None, "model has no q/k/v/o/gate/up/down_proj linear layers", "RTN supports Llama-style models")
    for name, m in linears:  # check every width first, so a bad setting changes nothing
        check_rtn_settings(m.weight.shape[1], bits, group_size, name)
    out = {}
    with torch.no_grad():
        for name, m in linears:
            deq, q, scale, lo = rtn_fake_quantize(m.weight, bits, group_size, symmetric, codes=True)
            m.weight.copy_(deq)
            if gguf_type:
                mins = None if lo is None else lo.half().numpy()
                codes = q.numpy().astype(np.int16) - 128 if gguf_type == "Q8_0" else q.numpy()  # Q8_0 stores q - 128, signed
                out[gguf_tensor_name(name)] = (gguf_type, gb.QuantBlocks(codes.astype(np.int8) if gguf_type == "Q8_0" else codes,
                                                                         scale.half().numpy(), mins))
            else:
                out[name] = None
    return out


def quantize_rtn_checkpoint(hf_dir, out_dir, spec) -> Path:
    """RTN of a float checkpoint into out_dir: a float32 transformers checkpoint whose
    linear weights lie on the RTN grid (dense: it runs at float speed on transformers)."""
    model = load_hf_model(Path(hf_dir))
    torch.manual_seed(spec.seed)
    blocks = rtn_quantize_model_(model, spec.bits, spec.group_size, spec.symmetric, (spec.gguf_type or "").upper() or None)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(Path(hf_dir), Path(out_dir))
    return Path(out_dir), blocks if spec.gguf_type else {}


class RTNBackend(Backend):
    """Round-to-nearest per group: a float checkpoint on the grid, and with a block-32 --type its exact GGUF."""

    method = "rtn"
    libraries = ("torch", "transformers")

    def check(self, job: BackendJob) -> None:
        if job.spec.gguf_type:
            export_exact_gguf(None, None, job.spec)  # a layout no GGUF block holds is refused before the work

    def quantize(self, job: BackendJob) -> BackendOutput:
        model_path, blocks = quantize_rtn_checkpoint(job.model.hf_dir, job.work_dir, job.spec)
        if not job.spec.gguf_type:
            return BackendOutput(model_path, "rtn")
        exported: dict = {}
        path = export_exact_gguf(model_path, job.work_dir / job.gguf_name(), job.spec, blocks=blocks, report=exported)
        return BackendOutput(path, f"gguf:{job.spec.gguf_type.upper()}", notes=[export_note(exported)])
