"""GPTQ and AWQ through GPTQModel (the maintained successor of AutoGPTQ and AutoAWQ).

GPTQModel 7.6.0 is the last release that installs beside torch 2.13 (7.7 needs
torch >= 2.14.1). On CPU:

- quantization runs with ``GPTQMODEL_CPU_WORKERS`` worker threads: the caller's
  number, at least 2 (GPTQModel's model loader fails with 1; set_env); AWQ must be given
  ``backend=BACKEND.AWQ_TORCH`` (the default AWQ_GEMM kernel is CUDA only);
- calibration is always the caller's token ids: GPTQModel never sees a dataset
  name, so it never fetches one;
- the first GPTQ quantization on a machine JIT-compiles GPTQModel's small C++
  packer (``pack_block_cpu``, about a minute on 2 cores, cached under
  ``~/.cache/gptqmodel/torch_extensions`` or ``$GPTQMODEL_TORCH_EXTENSIONS_DIR``);
  if no compiler is there it falls back to a Python packer with identical output;
- reloaded 4-bit checkpoints run a real int4 matmul on CPU (``TorchAtenLinear``,
  ``aten::_weight_int4pack_mm_for_cpu``), which rounds scales and activations to
  bfloat16 internally; 8-bit ones run a dequantizing torch kernel
  (``TorchLinear``) that torch.compiles itself on its first calls;
- AWQ only packs from a float16/bfloat16 model, and half-precision matmul on an
  AVX2-only CPU runs about 100x slower than float32 (measured 1.1 vs 117
  GFLOP/s here): AWQ on CPU is practical for tiny models only; GPTQ calibrates
  in float32 and is not affected.

Saved layout (``format`` "gptq", the AutoGPTQ v1 layout that transformers,
vLLM and llama.cpp converters read), per quantized linear ``<name>``:

- ``<name>.qweight`` int32 ``[in * bits / 32, out]``: each word holds
  ``32 / bits`` consecutive *input* rows, row ``r * (32 / bits) + j`` in bits
  ``[bits * j, bits * (j + 1))``;
- ``<name>.scales`` float16 ``[groups, out]``;
- ``<name>.qzeros`` int32 ``[groups, out * bits / 32]``, consecutive *output*
  columns packed the same way, holding ``zero - 1`` (the v1 convention; the
  subtraction is done on the whole 32-bit word, so decoding adds
  ``0x11111111`` (4-bit) / ``0x01010101`` (8-bit) to the whole word before
  unpacking). Symmetric: every zero is ``2 ** (bits - 1)``;
- ``<name>.g_idx`` int32 ``[in]``: the group of each input column; ``i // group``
  unless act-order (``desc_act``) permuted it.

AWQ (``format`` "gemm"): ``qweight`` int32 ``[in, out * bits / 32]`` packed
along the *output* axis in AWQ's interleaved order (word ``k``, field ``j``
holds column ``8k + [0, 2, 4, 6, 1, 3, 5, 7][j]``), ``qzeros`` int32
``[groups, out * bits / 32]`` likewise with the zero itself (no offset),
``scales`` float16 ``[groups, out]``, no ``g_idx``.

Either way ``W[o, i] = scale[o, g] * (q[o, i] - zero[o, g])``, ``g = g_idx[i]``,
which :func:`read_quantized_linear` returns as plain tensors for exporters.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from quantloop.backends.base import Backend, BackendJob, BackendOutput
from quantloop.backends.gptq.checkpoint import (
    DTYPES,
    export_gptq_to_gguf,
    safetensors_header,
    set_env,
    weight_files,
)
from quantloop.data.calibration import check_calibration
from quantloop.errors import InputError
from quantloop.fileio import read_hf_config
from quantloop.gguf.export import export_exact_gguf, export_note
from quantloop.memory import peak_rss_bytes, reset_peak_rss

GPTQMODEL_VERSION = "7.6.0"
METHOD_BITS = {"gptq": (2, 3, 4, 8), "awq": (4,)}
GROUP_SIZES = (-1, 32, 64, 128)
# Non-quantized tensors (embeddings, norms, lm_head) are written in this dtype,
# the precision of the F16 reference the acceptance criteria compare against.
SAVE_DTYPE = "float16"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


# --------------------------------------------------------------------------- checks


def linear_shapes(hf_dir: Path) -> dict[str, tuple[int, int]]:
    """Every 2-D ``*.weight`` inside the decoder layers of a float checkpoint: name -> (out, in)."""
    shapes = {}
    for f in weight_files(Path(hf_dir)):
        for name, meta in safetensors_header(f).items():
            if name.endswith(".weight") and ".layers." in name and len(meta.get("shape", ())) == 2:
                shapes[name.removesuffix(".weight")] = tuple(meta["shape"])
    return shapes


def check_gptq_settings(hf_dir: Path, method: str, bits: int, group_size: int, symmetric: bool,
                        act_order: bool) -> dict[str, tuple[int, int]]:
    """Cheap checks (no GPTQModel import): method, bits, group size against every layer width."""
    hf_dir = Path(hf_dir)
    if method not in METHOD_BITS:
        raise InputError(None, f"unknown method {method!r}", f"use one of {', '.join(METHOD_BITS)}")
    allowed = METHOD_BITS[method]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise InputError(None, f"{method.upper()} does not support {bits!r} bits",
                         f"use {' or '.join(map(str, allowed))} bits")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise InputError(None, f"{method.upper()} group size {group_size!r} is not supported",
                         f"use one of {', '.join(map(str, GROUP_SIZES))} (-1 = one group per row)")
    if method == "awq" and act_order:
        raise InputError(None, "act-order is a GPTQ option; AWQ has none", "leave act_order off for AWQ")
    if method == "awq" and group_size == -1:
        raise InputError(None, "AWQ needs a group size", "use 32, 64 or 128")
    read_hf_config(hf_dir)
    shapes = linear_shapes(hf_dir)
    if not shapes:
        raise InputError(hf_dir, "no 2-D layer weights found under '*.layers.*'", "GPTQ/AWQ quantize decoder-layer linears")
    for name, (out_f, in_f) in sorted(shapes.items()):
        if group_size > 0 and in_f % group_size:
            raise InputError(hf_dir, f"group size {group_size} does not divide the input width {in_f} of {name}",
                             "pick a group size that divides every input width (32 or 64 for SmolLM2-135M, whose width is 576)")
        if in_f % 32 or out_f % 32:
            raise InputError(hf_dir, f"{name} is {out_f}x{in_f}; GPTQ/AWQ packing needs widths that are multiples of 32",
                             "quantize a model whose layer widths are multiples of 32")
        # AWQ's clip search walks output channels in blocks of 64 (q/k are not clipped).
        if method == "awq" and out_f % 64 and not any(k in name.rsplit(".", 1)[-1] for k in ("q_", "k_")):
            raise InputError(hf_dir, f"{name} has {out_f} outputs; GPTQModel's AWQ needs multiples of 64",
                             "use GPTQ for this model")
    return shapes


def supported_architectures() -> list[str]:
    from gptqmodel.models.auto import SUPPORTED_MODELS  # deferred: gptqmodel

    return sorted(SUPPORTED_MODELS)


# --------------------------------------------------------------------------- quantize


def _cast_unquantized(out_dir: Path, dtype: str) -> None:
    """Rewrite float tensors that are not GPTQ/AWQ buffers (embeddings, norms) in `dtype`; scales stay float16."""
    import torch  # deferred: torch
    from safetensors.torch import load_file, save_file  # deferred: safetensors

    target = getattr(torch, dtype)
    quant_suffixes = (".scales",)
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(f))
        changed = False
        for k, v in tensors.items():
            if v.is_floating_point() and v.dtype != target and not k.endswith(quant_suffixes):
                tensors[k] = v.to(target).contiguous()
                changed = True
        if changed:
            tmp = f.with_name(f".{f.name}.tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, f)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    qc = cfg.get("quantization_config", {})
    if isinstance(qc, dict) and isinstance(qc.get("meta"), dict):
        qc["meta"].pop("offload_to_disk_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def quantize_gptq(hf_dir: Path, out_dir: Path, bits: int, group_size: int, symmetric: bool, act_order: bool,
                  calibration: list[list[int]], method: str = "gptq", seed: int = 0,
                  dtype: str | None = None, damp_percent: float | None = None) -> dict:
    """Quantize the float HF checkpoint `hf_dir` with GPTQModel (GPTQ or AWQ) on CPU and save it to `out_dir`.

    `calibration` is a list of token-id lists (the caller's calibration split);
    `out_dir` must not exist yet or be empty (callers write to a temporary
    folder and rename it into place). `dtype` is the compute dtype of the
    calibration forward passes: float32 for GPTQ (fastest and most exact on
    CPUs without native half precision), float16 for AWQ (its CPU kernels take
    float16 or bfloat16, not float32; float16 keeps three more mantissa bits;
    both are ~100x slower than float32 on AVX2-only CPUs).
    Non-quantized tensors are saved as float16 either way.
    Returns versions, the on-disk format, the settings used and timings.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    method = str(method).lower()
    check_gptq_settings(hf_dir, method, bits, group_size, symmetric, act_order)
    config = read_hf_config(hf_dir)
    calib = check_calibration(calibration, config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    if dtype is None:
        dtype = "float16" if method == "awq" else "float32"
    if dtype not in DTYPES:
        raise InputError(None, f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if method == "awq" and dtype == "float32":
        raise InputError(None, "GPTQModel's AWQ packs only float16/bfloat16 models", "use dtype float16 or bfloat16 for AWQ")
    if damp_percent is not None and not 0 < damp_percent < 1:
        raise InputError(None, f"damp_percent {damp_percent!r} must lie strictly between 0 and 1", "use e.g. 0.05")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(out_dir, "output folder exists and is not empty", "pass a new folder")

    set_env()
    import gptqmodel  # deferred: gptqmodel
    import torch  # deferred: torch
    from gptqmodel import BACKEND, GPTQModel  # deferred: gptqmodel
    from gptqmodel.models.auto import SUPPORTED_MODELS  # deferred: gptqmodel
    from gptqmodel.quantization.config import AWQConfig, GPTQConfig  # deferred: gptqmodel

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODELS:
        raise InputError(hf_dir / "config.json", f"architecture {model_type!r} is not supported by GPTQModel {gptqmodel.__version__}",
                         f"supported: {', '.join(sorted(SUPPORTED_MODELS))}")

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    common = dict(bits=bits, group_size=group_size, sym=bool(symmetric), offload_to_disk=False)
    if method == "gptq":
        extra = {"desc_act": bool(act_order)}
        if act_order:
            extra["act_group_aware"] = False  # GAR and desc_act exclude each other
        if damp_percent is not None:
            extra["damp_percent"] = float(damp_percent)
        qcfg = GPTQConfig(**common, **extra)
        backend = BACKEND.AUTO
    else:
        qcfg = AWQConfig(**common)
        backend = BACKEND.AWQ_TORCH

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    peak_is_this_call = reset_peak_rss()
    try:
        t0 = time.perf_counter()
        model = GPTQModel.load(str(hf_dir), qcfg, dtype=getattr(torch, dtype))
        t_load = time.perf_counter() - t0
        rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib]
        t1 = time.perf_counter()
        model.quantize(rows, batch_size=1, backend=backend, calibration_sort=None, calibration_data_min_length=0)
        t_quant = time.perf_counter() - t1
        t2 = time.perf_counter()
        model.save(str(out_dir))
        del model
        _cast_unquantized(out_dir, SAVE_DTYPE)
        for name in TOKENIZER_FILES:
            src = hf_dir / name
            if src.is_file() and not (out_dir / name).exists():
                shutil.copy2(src, out_dir / name)
        t_save = time.perf_counter() - t2
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for child in out_dir.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise

    qc = json.loads((out_dir / "quantize_config.json").read_text())
    import transformers  # deferred: transformers

    return {
        "library": "gptqmodel",
        "library_version": gptqmodel.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "method": method,
        "format": qc.get("format"),
        "bits": bits,
        "group_size": group_size,
        "symmetric": bool(symmetric),
        "act_order": bool(qc.get("desc_act", False)),
        "act_group_aware": bool(qc.get("meta", {}).get("act_group_aware", False)),
        "damp_percent": qc.get("meta", {}).get("damp_percent"),
        "compute_dtype": dtype,
        "saved_dtype": SAVE_DTYPE,
        "scale_dtype": "float16",
        "calibration_samples": len(calib),
        "calibration_tokens": sum(len(c) for c in calib),
        "seed": seed,
        "cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]),
        "load_s": round(t_load, 3),
        "quantize_s": round(t_quant, 3),
        "save_s": round(t_save, 3),
        "wall_s": round(t_load + t_quant + t_save, 3),
        # peak RSS of this process during the call (since process start where it cannot be reset)
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_is_this_call": peak_is_this_call,
        "bytes_on_disk": sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
    }


class GPTQModelBackend(Backend):
    """GPTQ and AWQ by GPTQModel (its packed checkpoint); with group 32 and a block-32 --type also its exact GGUF."""

    method = "gptq"
    libraries = ("gptqmodel", "torch", "transformers")

    def check(self, job: BackendJob) -> None:
        if job.spec.gguf_type:
            export_exact_gguf(None, None, job.spec)  # a layout no GGUF block holds is refused before the slow part

    def quantize(self, job: BackendJob) -> BackendOutput:
        spec = job.spec
        quantize_gptq(job.model.hf_dir, job.work_dir, spec.bits, spec.group_size, spec.symmetric, getattr(spec, "act_order", False), job.sequences,
                      method=spec.method, seed=spec.seed)
        if not spec.gguf_type:
            return BackendOutput(job.work_dir, spec.method)


        exported: dict = {}
        path = export_gptq_to_gguf(job.work_dir, job.model.hf_dir, job.work_dir / job.gguf_name(), spec.gguf_type.upper(), exported)
        return BackendOutput(path, f"gguf:{spec.gguf_type.upper()}", notes=[export_note(exported)])
