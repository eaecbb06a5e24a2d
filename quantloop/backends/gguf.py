"""llama.cpp k-quants and legacy quants: llama_model_quantize from the llama.cpp
library inside llama-cpp-python, on an F16/F32 GGUF."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from quantloop.errors import InputError
from quantloop.llamacpp import check_gguf_file


def gguf_types() -> list[str]:
    """Every llama.cpp file type name ('Q4_K_M', 'Q8_0', ...) this gguf-py knows."""
    from gguf import LlamaFileType

    return [t.name.removeprefix("MOSTLY_") for t in LlamaFileType if t.name.startswith("MOSTLY_") and "GUESSED" not in t.name]


def quantize_gguf(src: str | Path, dst: str | Path, type_name: str, threads: int | None = None) -> Path:
    """Quantize `src` to `type_name`, written to a temporary file and renamed to `dst`."""
    import llama_cpp
    from gguf import LlamaFileType

    src, dst = check_gguf_file(src), Path(dst)
    key = "MOSTLY_" + type_name.upper()
    if key not in LlamaFileType.__members__:
        raise InputError(None, f"unknown GGUF type '{type_name}'", f"choose one of {', '.join(gguf_types())}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LlamaFileType[key].value
    params.nthread = threads or os.cpu_count() or 1
    tmp = dst.with_name(f".{dst.name}.tmp-quantize")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise InputError(src, f"llama.cpp could not quantize this model to {type_name} (code {rc})", "start from an F16 or F32 GGUF")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
