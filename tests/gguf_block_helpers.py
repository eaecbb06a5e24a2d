"""References for the exact GGUF block packers: llama.cpp's own quantizer (ggml_quantize_chunk, called through
ctypes), what each type's codes and scales mean, and the packer applied to a QuantBlocks (shared by the block
tests of every type)."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantloop.gguf import blocks as gb


def _ggml():
    import llama_cpp

    try:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        f = lib.ggml_quantize_chunk
    except (OSError, AttributeError):
        pytest.skip("llama.cpp's libggml-base with ggml_quantize_chunk is not available")
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return f


def ggml_quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's own quantizer (what llama-quantize runs without an importance matrix)."""
    t = GGMLQuantizationType[type_name]
    w = np.ascontiguousarray(w, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[t]
    out = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
    _ggml()(int(t), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
    return out


def dequant_formula(qb: gb.QuantBlocks, type_name: str) -> np.ndarray:
    """What each type's codes and scales mean (the table in gguf_blocks' docstring), in float32."""
    bt = gb.TYPES[type_name]
    f = np.float32
    rows, cols = qb.codes.shape
    q = qb.codes.astype(f)
    if bt.levels:
        return np.repeat(qb.scales.astype(f), 32, axis=1) * np.asarray(bt.levels, f)[qb.codes]
    if not bt.kquant:
        d = np.repeat(qb.scales.astype(f), 32, axis=1)
        if bt.symmetric:
            return d * (q - (0 if bt.bits == 8 else 2 ** (bt.bits - 1)))
        return d * q + np.repeat(qb.mins.astype(f), 32, axis=1)
    n = bt.sub
    D = np.repeat(np.repeat(qb.d.astype(f), 256 // n, axis=1) * qb.scales.astype(f), n, axis=1)
    if bt.symmetric:  # Q6_K, Q3_K
        return D * (q - 2 ** (bt.bits - 1))
    M = np.repeat(np.repeat(qb.dmin.astype(f), 256 // n, axis=1) * qb.mins.astype(f), n, axis=1)
    return D * q - M


def packed(qb: gb.QuantBlocks, type_name: str) -> np.ndarray:
    return gb.pack(qb.codes, qb.scales, qb.mins, type_name, qb.d, qb.dmin)
