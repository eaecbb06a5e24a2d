"""GGUF block types: what each of llama.cpp's quantized types stores per block, and the small numpy
helpers every packer, rounding and fit shares. The public grid API is quantloop.gguf.blocks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from quantloop.errors import InputError

QK = 32  # block-32 types
QK_K = 256  # k-quant super-blocks
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c
F32 = np.float32


KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h


class BlockType(NamedTuple):
    name: str
    block: int  # values per block (32) or super-block (256)
    bits: int
    symmetric: bool  # no offset stored
    kquant: bool
    sub: int = 32  # k-quants: values per sub-block
    levels: tuple[int, ...] | None = None  # non-uniform types: value = d * levels[code]


TYPES = {
    "Q4_0": BlockType("Q4_0", QK, 4, True, False),
    "Q4_1": BlockType("Q4_1", QK, 4, False, False),
    "Q5_0": BlockType("Q5_0", QK, 5, True, False),
    "Q5_1": BlockType("Q5_1", QK, 5, False, False),
    "Q8_0": BlockType("Q8_0", QK, 8, True, False),
    "Q4_K": BlockType("Q4_K", QK_K, 4, False, True),
    "Q5_K": BlockType("Q5_K", QK_K, 5, False, True),
    "Q6_K": BlockType("Q6_K", QK_K, 6, True, True, sub=16),
    "IQ4_NL": BlockType("IQ4_NL", QK, 4, True, False, levels=KVALUES_IQ4NL),
    "Q3_K": BlockType("Q3_K", QK_K, 3, True, True, sub=16),
    "Q2_K": BlockType("Q2_K", QK_K, 2, False, True, sub=16),
}
# k-quant sub-block scales (and mins) as stored: (lowest scale, highest scale, highest min)
KQUANT_RANGES = {"Q2_K": (0, 15, 15), "Q3_K": (-32, 31, 0), "Q4_K": (0, 63, 63), "Q5_K": (0, 63, 63), "Q6_K": (-128, 127, 0)}


class QuantBlocks(NamedTuple):
    """Codes and scales of a (rows, cols) weight, as a GGUF type stores them.

    Block-32 types: `scales` is d (fp16, one per block), `mins` is m (Q4_1/Q5_1) or None;
    IQ4_NL's codes are indices 0..15 into KVALUES_IQ4NL.
    K-quants: `scales`/`mins` are the integer sub-block scales/mins, `d`/`dmin` the fp16
    super-block scales (one per 256 values).
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    d: np.ndarray | None = None
    dmin: np.ndarray | None = None


class OffGridError(ValueError):
    """A weight that no codes and scales of the type reproduce to fp16 rounding."""

    def __init__(self, type_name: str, n_bad: int, n_blocks: int, unit: int, max_deviation: float, relative: float):
        self.type_name, self.n_bad, self.n_blocks = type_name, n_bad, n_blocks
        self.max_deviation, self.relative = max_deviation, relative
        super().__init__(f"{n_bad} of {n_blocks} blocks of {unit} are not on the {type_name} grid "
                         f"(max deviation {max_deviation:.3g}, {relative:.1%} of the block's largest magnitude)")


def block_type(type_name: str) -> BlockType:
    bt = TYPES.get(str(type_name).upper())
    if bt is None:
        raise ValueError(f"unknown GGUF block type {type_name!r}; supported: {', '.join(TYPES)}")
    return bt


def qtype(type_name: str):
    """The gguf-py GGMLQuantizationType of a type name."""
    return GGMLQuantizationType[block_type(type_name).name]


def gguf_type_for_layout(bits: int, group_size: int, symmetric: bool) -> str | None:
    """The block-32 GGUF type that holds an RTN/GPTQ layout exactly, or None.

    GPTQ-style w = s*(q - z) with q in 0..2^bits-1: symmetric (z = 2^(bits-1)) is
    Q4_0/Q5_0/Q8_0, asymmetric is Q4_1/Q5_1; only group size 32 matches a block.
    """
    if group_size != QK:
        return None
    return {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1",
            (8, True): "Q8_0"}.get((bits, bool(symmetric)))


def fallback_type(type_name: str, width: int) -> str:
    """The type llama-quantize writes for rows of `width` values when `type_name`'s block does not divide
    them (llama-quant.cpp tensor_type_fallback): Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
    else F16.

    A fake quantizer aiming at a k-quant grid must use this type for such layers (SmolLM2's 576-wide
    rows, for example), or the exported file cannot match it.
    """
    bt = block_type(type_name)
    if width % bt.block == 0:
        return bt.name
    fallback = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(bt.name, "F16")
    return fallback if fallback != "F16" and width % QK == 0 else "F16"


FLOAT_TYPES = ("F32", "F16")


def check_type(t: str, where: str, floats: bool = True) -> str:
    """A GGUF type name quantloop can write exactly (upper case), or InputError naming `where`."""
    t = str(t).upper()
    if t in TYPES or (floats and t in FLOAT_TYPES):
        return t
    choices = list(TYPES) + (list(FLOAT_TYPES) if floats else [])
    raise InputError(None, f"{where}: unknown GGUF type '{t}'", f"choose one of {', '.join(choices)}")


def stored_type(type_name: str, width: int) -> str:
    """The type a tensor of rows `width` wide is stored as when `type_name` is asked for: floats as they are,
    block types with llama.cpp's width fallback (what llama-quantize and quantloop's export both write)."""
    return type_name if type_name in FLOAT_TYPES else fallback_type(type_name, width)


# --------------------------------------------------------------------------- helpers


def _matrix(w: np.ndarray, bt: BlockType) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{bt.name}: expected a 2-D weight, got shape {w.shape}")
    if w.shape[1] % bt.block:
        raise ValueError(f"{bt.name}: row length {w.shape[1]} is not a multiple of the block size {bt.block}")
    w = np.ascontiguousarray(w, dtype=F32)
    if not np.isfinite(w).all():
        raise ValueError(f"{bt.name}: weight has NaN or infinite values")
    return w


def _ints(a, name: str, lo: int, hi: int, shape: tuple, bt: BlockType) -> np.ndarray:
    """Integer array of the given shape with values in lo..hi (int64), or ValueError."""
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{bt.name}: {name} must have shape {shape}, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ValueError(f"{bt.name}: {name} must be integers")
    a = a.astype(np.int64)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{bt.name}: {name} must be in {lo}..{hi}, found {a.min()}..{a.max()}")
    return a


def _fp16(a, name: str, shape: tuple, bt: BlockType) -> np.ndarray:
    """Values that fp16 holds exactly, as float16, or ValueError."""
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{bt.name}: {name} must have shape {shape}, got {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"{bt.name}: {name} must be finite and within fp16 range (|x| <= 65504)")
    if a.dtype != np.float16 and (h.astype(np.float64) != a.astype(np.float64)).any():
        bad = np.flatnonzero(h.astype(np.float64).ravel() != a.astype(np.float64).ravel())[0]
        raise ValueError(f"{bt.name}: {name} must be representable in fp16 exactly "
                         f"({a.ravel()[bad]!r} is not); round the quantizer's scales to fp16")
    return h


def _h(a: np.ndarray) -> np.ndarray:
    """fp16 values as (n, 2) little-endian bytes."""
    return np.ascontiguousarray(a, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes, element j low nibble and j+16 high nibble (block_q4_0.qs)."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _unnibble(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _seqsum(t: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as a C loop does (numpy's sum is pairwise); the columns are
    made contiguous once, so each add reads one run of memory."""
    cols = np.ascontiguousarray(t.T)
    acc = cols[0].copy()
    for c in cols[1:]:
        acc += c
    return acc


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml-quants.c nearest_int: round half to even (the 1.5*2^23 trick)."""
    return np.rint(x).astype(np.int64)
