"""llama.cpp k-quants and legacy quants: llama_model_quantize from the llama.cpp
library inside llama-cpp-python, on an F16/F32 GGUF."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

from gguf import LlamaFileType

from quantloop.backends.base import Backend, BackendJob, BackendOutput
from quantloop.errors import InputError, disk_full
from quantloop.eval.runtimes import default_threads
from quantloop.gguf.llamacpp import check_gguf_file, fallback_summary, llama_cpp_version, stderr_to, tool
from quantloop.gguf.precision_map import plan_mixed_file
from quantloop.paths import CACHE_DIR

LOG_NAME = "llama-quantize.log"  # llama.cpp's output while quantizing, kept beside the file it wrote


def gguf_types() -> list[str]:
    """Every llama.cpp file type name ('Q4_K_M', 'Q8_0', ...) this gguf-py knows."""
    return [t.name.removeprefix("MOSTLY_") for t in LlamaFileType if t.name.startswith("MOSTLY_") and "GUESSED" not in t.name]


def _run(cmd: list[str], what: str, where: Path, log: Path | None = None, needed: int = 0) -> None:
    """Run a llama.cpp tool; its output goes to `log`; a failure is one line (ENOSPC when the disk is full)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        if needed and (full := disk_full(log.parent if log else where.parent, needed)):
            raise full
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise InputError(where, f"{what} failed: {tail[0][:200]}", "see the llama.cpp message")


def compute_imatrix(model_gguf: Path, text_file: Path, out: Path, chunks: int, context: int = 512, threads: int | None = None) -> Path:
    """llama-imatrix over `chunks` x `context` tokens of `text_file` (calibration text, real or synthetic)."""
    tmp = out.with_name(f".{out.name}.tmp-imatrix.gguf")
    try:
        _run([tool("llama-imatrix"), "-m", model_gguf, "-f", text_file, "-o", tmp, "--chunks", chunks, "-c", context,
              "-t", threads or default_threads(), "--no-ppl"], "llama-imatrix", model_gguf)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def cached_imatrix(model_gguf: Path, text_file: Path, chunks: int, context: int) -> Path:
    """The importance matrix of `model_gguf` over `text_file`, computed once: kept under the cache folder, keyed
    by the model file, the text's bytes, the windows and the llama.cpp version (a search quantizes dozens of
    candidates with the same matrix; an equal request reuses it)."""
    st = model_gguf.stat()
    h = hashlib.sha256(f"{model_gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{chunks}x{context}:{llama_cpp_version()}".encode())
    h.update(text_file.read_bytes())
    out = CACHE_DIR / "imatrix" / f"{model_gguf.stem}-{h.hexdigest()[:16]}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        compute_imatrix(model_gguf, text_file, out, chunks, context)
    return out


def quantize_gguf_tool(src: Path, dst: Path, type_name: str, imatrix: Path | None = None,
                       tensor_types: dict[str, str] | None = None, threads: int | None = None, pure: bool = False) -> Path:
    """llama-quantize with an importance matrix and/or per-tensor type overrides (--tensor-type);
    `pure` turns off llama.cpp's k-quant mixture rules (unmatched tensors get exactly `type_name`)."""
    check_gguf_file(src)
    if type_name.upper() not in gguf_types():
        raise InputError(None, f"unknown GGUF type '{type_name}'", f"choose one of {', '.join(gguf_types())}")
    cmd: list = [tool("llama-quantize")] + (["--pure"] if pure else [])
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    for pattern, t in (tensor_types or {}).items():
        cmd += ["--tensor-type", f"{pattern}={t.lower()}"]
    tmp = dst.with_name(f".{dst.name}.tmp-quantize")
    try:
        _run(cmd + [src, tmp, type_name.upper(), threads or default_threads()], "llama-quantize", src,
             log=dst.with_name(LOG_NAME), needed=src.stat().st_size)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def quantize_gguf(src: str | Path, dst: str | Path, type_name: str, threads: int | None = None) -> Path:
    """Quantize `src` to `type_name` with the llama.cpp library in llama-cpp-python (no tools needed);
    written to a temporary file and renamed to `dst`."""
    import llama_cpp  # deferred: llama_cpp

    src, dst = check_gguf_file(src), Path(dst)
    key = "MOSTLY_" + type_name.upper()
    if key not in LlamaFileType.__members__:
        raise InputError(None, f"unknown GGUF type '{type_name}'", f"choose one of {', '.join(gguf_types())}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LlamaFileType[key].value
    params.nthread = threads or default_threads()
    tmp = dst.with_name(f".{dst.name}.tmp-quantize")
    log = dst.with_name(LOG_NAME)
    try:
        with stderr_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            if full := disk_full(dst.parent, src.stat().st_size):
                raise full
            raise InputError(src, f"llama.cpp could not quantize this model to {type_name} (code {rc}; log: {log})",
                             "start from an F16 or F32 GGUF")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


class LlamaCppBackend(Backend):
    """llama.cpp's own quantizers on the prepared F16 GGUF: the library call for a plain type, llama-quantize
    (+ llama-imatrix) for an importance matrix, per-tensor types or a precision map."""

    method = "gguf"
    writer = "llama-quantize"
    libraries = ("llama_cpp_python",)

    def quantize(self, job: BackendJob) -> BackendOutput:
        spec, src = job.spec, job.model.gguf
        gguf_type = (spec.gguf_type or "Q4_K_M").upper()
        dst = job.work_dir / job.gguf_name(spec.tag().removeprefix("gguf-"))
        mixed, planned = spec.has_precision_map(), {}
        if mixed:
            gguf_type, rules, planned = plan_mixed_file(src, spec.gguf_type, spec.preset, spec.layer_types, spec.gguf_tensor_types)
        if not (spec.imatrix or spec.gguf_tensor_types or mixed):
            path = quantize_gguf(src, dst, gguf_type)
            return BackendOutput(path, f"gguf:{gguf_type}", notes=self.notes(job))
        imatrix = None
        if spec.imatrix:
            imatrix = cached_imatrix(src, job.text_file, spec.calibration.samples, spec.calibration.seqlen)
        model_path = quantize_gguf_tool(src, dst, gguf_type, imatrix, rules if mixed else spec.gguf_tensor_types, pure=mixed)
        if imatrix is not None:
            (job.work_dir / "synthetic-calibration.txt").unlink(missing_ok=True)
        return BackendOutput(model_path, f"gguf:mixed-{spec.preset or 'custom'}" if mixed else f"gguf:{gguf_type}", planned,
                             notes=self.notes(job))

    @staticmethod
    def notes(job: BackendJob) -> list[str]:
        log = job.work_dir / LOG_NAME
        line = fallback_summary(log.read_text(errors="replace")) if log.is_file() else None
        return [f"{line} (every tensor: {LOG_NAME})"] if line else []
