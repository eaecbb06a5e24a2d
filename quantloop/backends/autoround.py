"""AutoRound (Intel, PyPI ``auto-round``) on CPU: GGUF export or AutoRound's own checkpoint formats.

Verified with auto-round 0.15.1 beside torch 2.13.0 (CPU), transformers 5.23.0.

- With ``spec.gguf_type`` set (``Q4_K_M``, ``Q4_0``, ``Q8_0`` ...), AutoRound
  quantizes with the scheme ``gguf:<type>`` and writes a GGUF itself
  (``format="gguf:<type>"``; needs the ``gguf`` and ``sentencepiece``
  packages), in a child Python that imports the bundled llama.cpp's gguf-py
  (:func:`run_in_child`: AutoRound's own llama.cpp conversion modules need one
  that new for Qwen2, Qwen3 and Gemma 3). ``iters=0`` (the default here, :data:`GGUF_ITERS`) is AutoRound's
  recommendation for GGUF: an optimized round-to-nearest whose search is
  weighted by an importance matrix gathered from the calibration data. Sign
  gradient tuning (iters > 0) measured worse on SmolLM2 (see ASSETS.md) and is
  far slower on CPU. The spec's bits / group size / symmetric fields do not
  apply: the GGUF type fixes them. Rows whose width is not a multiple of 256
  (SmolLM2's 576, the tests' 64) cannot hold k-quants; AutoRound then falls
  back per tensor (Q5_0 / Q8_0), as llama.cpp's own mixes do.
- Without ``gguf_type``, AutoRound's own format (``auto_round``, or
  ``auto_gptq`` via ``fmt``) with the spec's bits, group size and symmetry;
  the default is AutoRound's own 200 sign-gradient iterations
  (:data:`DEFAULT_ITERS`).

Calibration is always the caller's token ids, handed to AutoRound as a list of
``[1, seqlen]`` tensors: given no ``dataset``, AutoRound would fetch
``NeelNanda/pile-10k`` from the hub. Hub access is switched off here as well
(``HF_HUB_OFFLINE`` and friends, set if the caller has not).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from quantloop.backends.base import Backend, BackendJob, BackendOutput
from quantloop.data.calibration import check_calibration
from quantloop.errors import InputError, require_optional
from quantloop.fileio import read_hf_config
from quantloop.gguf.llamacpp import source_dir

AUTOROUND_VERSION = "0.15.1"
# Sign-gradient iterations: 0 (optimized RTN + importance matrix) for GGUF, AutoRound's default otherwise.
GGUF_ITERS = 0
DEFAULT_ITERS = 200
# GGUF types AutoRound 0.15 exports (its export_to_gguf.config.GGUF_CONFIG keys, without "gguf:").
GGUF_TYPES = ("Q2_K_S", "Q2_K_MIXED", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
              "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
HF_FORMATS = ("auto_round", "auto_gptq")
BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128)


# --------------------------------------------------------------------------- checks


def gguf_scheme(gguf_type: str) -> str:
    """'Q4_K_M' -> 'gguf:q4_k_m', refusing types AutoRound cannot export."""
    t = str(gguf_type).strip().upper().removeprefix("GGUF:")
    if t not in GGUF_TYPES:
        raise InputError(None, f"AutoRound cannot export GGUF type {gguf_type!r}", f"use one of {', '.join(GGUF_TYPES)}")
    return f"gguf:{t.lower()}"


def check_autoround_settings(hf_dir: Path, spec, fmt: str = "auto_round") -> dict:
    """Cheap checks (no AutoRound import); returns the checkpoint's config.json."""
    hf_dir = Path(hf_dir)
    method = getattr(spec, "method", "autoround")
    if method != "autoround":
        raise InputError(None, f"spec.method is {method!r}, not 'autoround'", "set method: autoround")
    config = read_hf_config(hf_dir)
    if not list(hf_dir.glob("*.safetensors")):
        raise InputError(hf_dir, "no *.safetensors weights", "save the float model with save_pretrained(safe_serialization=True)")
    if spec.gguf_type:
        gguf_scheme(spec.gguf_type)
        return config
    if fmt not in HF_FORMATS:
        raise InputError(None, f"unknown AutoRound format {fmt!r}", f"use one of {', '.join(HF_FORMATS)}")
    bits, group_size = spec.bits, spec.group_size
    if bits not in BITS:
        raise InputError(None, f"AutoRound does not support {bits!r} bits here", f"use {', '.join(map(str, BITS))} bits")
    if group_size not in GROUP_SIZES:
        raise InputError(None, f"AutoRound group size {group_size!r} is not supported",
                         f"use one of {', '.join(map(str, GROUP_SIZES))} (-1 = one group per row)")
    widths = {config.get("hidden_size"), config.get("intermediate_size")} - {None}
    for w in sorted(widths):
        if group_size > 0 and w % group_size:
            raise InputError(hf_dir / "config.json", f"group size {group_size} does not divide the layer width {w}",
                             "pick a group size that divides every width (32 or 64 for SmolLM2-135M, whose width is 576)")
    return config


# --------------------------------------------------------------------------- quantize


def quantize_autoround(hf_dir: Path, out_dir: Path, spec, calibration: list[list[int]],
                       iters: int | None = None, fmt: str = "auto_round", device: str | None = None) -> Path:
    """Quantize the float HF checkpoint `hf_dir` with AutoRound; return what a runtime loads.

    `spec` is a :class:`quantloop.schemas.AutoRoundSpec` (it has no act-order, tensor types or overrides: a spec
    that gives them is refused when it is made).
    With `spec.gguf_type` set, the return value is the single GGUF file written
    in `out_dir` (``<hf_dir name>-<TYPE>.gguf``); otherwise `out_dir` itself,
    holding AutoRound's `fmt` checkpoint ("auto_round" or "auto_gptq") and the
    tokenizer. `calibration` is a list of equally long token-id lists. `iters`
    defaults to :data:`GGUF_ITERS` (0) for GGUF and :data:`DEFAULT_ITERS`
    otherwise. `device` defaults to "cuda" when torch sees one, else "cpu".
    `out_dir` must not exist yet or be empty. Seeded with `spec.seed`: the same
    inputs give byte-identical output on the same machine.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = check_autoround_settings(hf_dir, spec, fmt)
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    calib = check_calibration(calibration, vocab, same_length=True)
    if iters is None:
        iters = GGUF_ITERS if spec.gguf_type else DEFAULT_ITERS
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise InputError(None, f"iters must be a non-negative integer, got {iters!r}", "use 0 (RTN + imatrix) or e.g. 200")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "output folder exists and is not empty", "pass a new folder")

    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / ".autoround-stage"
    skip = [m for m in (getattr(spec, "skip_modules", None) or []) if m != "lm_head"]
    job = dict(hf_dir=str(hf_dir), stage=str(stage), calibration=calib, iters=iters, seed=spec.seed, device=device,
               ignore_layers=",".join(skip) or None)
    try:
        if spec.gguf_type:
            scheme = gguf_scheme(spec.gguf_type)
            run_in_child(job | dict(scheme=scheme, format=scheme))
            written = sorted(stage.rglob("*.gguf"))
            if len(written) != 1:
                raise RuntimeError(f"AutoRound wrote {len(written)} GGUF files under {stage}, expected 1: {written}")
            target = out_dir / f"{hf_dir.name}-{scheme.split(':', 1)[1].upper()}.gguf"
            os.replace(written[0], target)
            shutil.rmtree(stage)
            return target
        run_autoround(job | dict(scheme="W4A16", format=fmt, bits=spec.bits, group_size=spec.group_size,
                                 sym=bool(spec.symmetric)))
        # AutoRound may nest its output one level down; flatten it into out_dir.
        files = [p for p in stage.rglob("*") if p.is_file()]
        root = stage if (stage / "config.json").is_file() else files[0].parent
        for p in sorted(root.iterdir()):
            os.replace(p, out_dir / p.name)
        shutil.rmtree(stage)
        return out_dir
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def run_autoround(job: dict) -> None:
    """One AutoRound quantize_and_save into job["stage"], seeded (job: see quantize_autoround and run_in_child)."""
    import torch  # deferred: torch
    from auto_round import AutoRound  # deferred: auto_round
    from transformers import AutoTokenizer  # deferred: transformers

    seed, calib = job["seed"], job["calibration"]
    device = job["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    extra = {k: job[k] for k in ("bits", "group_size", "sym", "ignore_layers") if job.get(k) is not None}
    ar = AutoRound(job["hf_dir"], scheme=job["scheme"], tokenizer=AutoTokenizer.from_pretrained(job["hf_dir"]),
                   dataset=[torch.tensor([ids], dtype=torch.long) for ids in calib], iters=job["iters"],
                   nsamples=len(calib), seqlen=len(calib[0]), batch_size=min(8, len(calib)), seed=seed,
                   device_map=device, **extra)
    ar.quantize_and_save(job["stage"], format=job["format"])


def run_in_child(job: dict) -> None:
    """run_autoround in a child Python whose `gguf` is the bundled llama.cpp's gguf-py. AutoRound's GGUF writer
    imports llama.cpp conversion modules (its own copy) that need a gguf-py as new as theirs: under PyPI's gguf
    0.19 its qwen and gemma modules fail to import (gguf.MODEL_ARCH.DFLASH, GEMMA4_ASSISTANT), which refused
    Qwen2, Qwen3 and Gemma 3. The bundled llama.cpp's gguf-py is the one quantloop's own converter runs with."""
    job_file = Path(job["stage"]).parent / ".autoround-job.json"
    job_file.write_text(json.dumps(job))
    path = os.pathsep.join(p for p in (str(source_dir() / "gguf-py"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "quantloop.backends.autoround", str(job_file)],
                          env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True)
    job_file.unlink()
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"AutoRound failed (exit {proc.returncode}): {last[0][:300]}")


class AutoRoundBackend(Backend):
    """AutoRound (Intel) into a GGUF of a k-quant or legacy type."""

    method = "autoround"
    libraries = ("auto-round", "torch", "transformers")

    def check(self, job: BackendJob) -> None:
        require_optional("auto_round")  # AutoRound runs in a child process: say which extra is missing here
        if not job.spec.gguf_type:
            raise InputError(None, "AutoRound is offered with GGUF output only", "set a GGUF type, e.g. --type Q4_K_M")

    def quantize(self, job: BackendJob) -> BackendOutput:
        path = quantize_autoround(job.model.hf_dir, job.work_dir, job.spec, job.sequences)
        return BackendOutput(path, f"gguf:{job.spec.gguf_type.upper()}")


if __name__ == "__main__":  # run_in_child's child
    import json
    import sys

    run_autoround(json.loads(Path(sys.argv[1]).read_text()))
