"""Pack codes and scales into llama.cpp's block bytes and back: pack, unpack, dequantize, and
pack_from_codes for GPTQ-style integer codes."""

from __future__ import annotations

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES

from quantloop.gguf.block_types import (
    QK,
    QK_K,
    QuantBlocks,
    _fp16,
    _h,
    _ints,
    _nibbles,
    _unnibble,
    block_type,
    qtype,
)

# --------------------------------------------------------------------------- pack / unpack


def pack(codes, scales, mins, type_name: str, d=None, dmin=None) -> np.ndarray:
    """Codes and scales -> raw GGUF bytes, shape (rows, cols // block * type_size), uint8.

    The layout of ggml's block_q4_0 ... block_q6_K (ggml-common.h) as the
    quantize_row_*_ref functions fill them. Refuses (ValueError) anything the
    type cannot hold exactly: codes out of range, scales that are not fp16.
    """
    bt = block_type(type_name)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % bt.block:
        raise ValueError(f"{bt.name}: codes must be (rows, cols) with cols a multiple of {bt.block}, got {codes.shape}")
    rows, cols = codes.shape
    n = rows * cols // bt.block
    if not bt.kquant:
        lo, hi = (-128, 127) if bt.bits == 8 else (0, 2**bt.bits - 1)
        q = _ints(codes, "codes", lo, hi, codes.shape, bt).reshape(n, QK)
        parts = [_h(_fp16(scales, "scales", (rows, cols // QK), bt))]
        if bt.symmetric and mins is not None:
            raise ValueError(f"{bt.name} is symmetric and stores no mins" + (f"; an offset needs {bt.name[:2]}_1" if bt.bits < 8 and not bt.levels else ""))
        if not bt.symmetric:
            if mins is None:
                raise ValueError(f"{bt.name} stores an offset per block: mins are required")
            parts.append(_h(_fp16(mins, "mins", (rows, cols // QK), bt)))
        if bt.bits == 8:
            parts.append(q.astype(np.int8).view(np.uint8))
        else:
            if bt.bits == 5:  # qh: bit j of a little-endian uint32 is bit 4 of element j
                parts.append(np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little"))
            parts.append(_nibbles(q))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)

    if bt.name in ("Q2_K", "Q3_K"):
        return _pack_low_k(codes, scales, mins, d, dmin, bt)
    ns = QK_K // 16 if bt.name == "Q6_K" else QK_K // 32  # sub-blocks per super-block
    sub = (rows, cols // QK_K * ns)
    sup = (rows, cols // QK_K)
    q = _ints(codes, "codes", 0, 2**bt.bits - 1, codes.shape, bt).astype(np.uint8).reshape(n, QK_K)
    dh = _h(_fp16(d, "d", sup, bt))
    if bt.name == "Q6_K":
        if mins is not None or dmin is not None:
            raise ValueError("Q6_K is symmetric and stores no mins")
        sc = _ints(scales, "scales", -128, 127, sub, bt).astype(np.int8).view(np.uint8).reshape(n, ns)
        L = q.reshape(n, 2, 4, 32)  # (half, quarter, l): element 128*half + 32*quarter + l
        lo, hi = L & 0xF, L >> 4
        ql = (lo[:, :, :2] | (lo[:, :, 2:] << 4)).reshape(n, 128)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
        return np.concatenate([ql, qh, sc, dh], axis=-1).reshape(rows, -1)
    if mins is None or dmin is None:
        raise ValueError(f"{bt.name} stores sub-block mins: mins and dmin are required")
    ls = _ints(scales, "scales", 0, 63, sub, bt).astype(np.uint8).reshape(n, 8)
    lm = _ints(mins, "mins", 0, 63, sub, bt).astype(np.uint8).reshape(n, 8)
    s = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),  # get_scale_min_k4, inverted
                        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=-1)
    L = q.reshape(n, 4, 2, 32)  # (64-chunk, half, l)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [dh, _h(_fp16(dmin, "dmin", sup, bt)), s]
    if bt.name == "Q5_K":  # qh[l] bit 2c+h is bit 4 of element 64c + 32h + l
        hi = (L >> 4).reshape(n, 8, 32)
        parts.append(np.bitwise_or.reduce(hi << np.arange(8, dtype=np.uint8)[:, None], axis=1).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _two_bit_planes(low: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values -> (n, 64) bytes: byte 32c + l holds element 128c + 32s + l in bits 2s (block_q2_K.qs)."""
    L = low.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _from_two_bit_planes(qs: np.ndarray) -> np.ndarray:
    return ((qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(-1, QK_K)


def _pack_low_k(codes, scales, mins, d, dmin, bt) -> np.ndarray:
    """block_q3_K (hmask, qs, 12 bytes of 6-bit signed scales, d) and block_q2_K (scale | min << 4, qs, d, dmin)."""
    rows, cols = codes.shape
    n = rows * cols // QK_K
    sub, sup = (rows, cols // 16), (rows, cols // QK_K)
    q = _ints(codes, "codes", 0, 2**bt.bits - 1, codes.shape, bt).astype(np.uint8).reshape(n, QK_K)
    dh = _h(_fp16(d, "d", sup, bt))
    if bt.name == "Q3_K":
        if mins is not None or dmin is not None:
            raise ValueError("Q3_K is symmetric and stores no mins")
        lv = (_ints(scales, "scales", -32, 31, sub, bt) + 32).astype(np.uint8).reshape(n, 16)
        hmask = np.bitwise_or.reduce(((q.reshape(n, 8, 32) >> 2) & 1) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
        h = (lv >> 4).reshape(n, 4, 4)  # (j // 4, j % 4): 2 high bits of scale j in byte 8 + j % 4, bits 2 * (j // 4)
        sc = np.concatenate([(lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4),
                             h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)], axis=-1)
        return np.concatenate([hmask.astype(np.uint8), _two_bit_planes(q & 3), sc, dh], axis=-1).reshape(rows, -1)
    if mins is None or dmin is None:
        raise ValueError("Q2_K stores sub-block mins: mins and dmin are required")
    ls = _ints(scales, "scales", 0, 15, sub, bt).astype(np.uint8).reshape(n, 16)
    lm = _ints(mins, "mins", 0, 15, sub, bt).astype(np.uint8).reshape(n, 16)
    return np.concatenate([ls | (lm << 4), _two_bit_planes(q), dh, _h(_fp16(dmin, "dmin", sup, bt))], axis=-1).reshape(rows, -1)


def unpack(raw: np.ndarray, type_name: str) -> QuantBlocks:
    """Raw GGUF bytes (rows, bytes_per_row) -> QuantBlocks; the inverse of `pack`."""
    bt = block_type(type_name)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    block, size = GGML_QUANT_SIZES[qtype(bt.name)]
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{bt.name}: raw data must be (rows, k*{size}) bytes, got {raw.shape}")
    rows, n = raw.shape[0], raw.size // size
    b = raw.reshape(n, size)

    def f16(lo):
        return np.ascontiguousarray(b[:, lo:lo + 2]).view(np.float16).reshape(rows, -1)

    if not bt.kquant:
        off = 4 if not bt.symmetric else 2
        if bt.bits == 8:
            q = b[:, off:].view(np.int8).astype(np.int8)
        else:
            q = _unnibble(b[:, -16:])
            if bt.bits == 5:
                q = q | (np.unpackbits(b[:, off:off + 4], axis=-1, bitorder="little") << 4)
        return QuantBlocks(q.reshape(rows, -1), f16(0), None if bt.symmetric else f16(2))
    if bt.name == "Q3_K":
        hi = ((b[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, QK_K)
        s = b[:, 96:108]
        lo4 = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=-1)
        hi2 = ((s[:, 8:].reshape(n, 1, 4) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, 16)
        sc = ((lo4 | (hi2 << 4)).astype(np.int16) - 32).astype(np.int8)
        q = _from_two_bit_planes(b[:, 32:96]) | (hi << 2)
        return QuantBlocks(q.reshape(rows, -1), sc.reshape(rows, -1), None, f16(108))
    if bt.name == "Q2_K":
        s = b[:, :16]
        return QuantBlocks(_from_two_bit_planes(b[:, 16:80]).reshape(rows, -1), (s & 0xF).reshape(rows, -1),
                           (s >> 4).reshape(rows, -1), f16(80), f16(82))
    if bt.name == "Q6_K":
        ql, qh = b[:, :128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32)
        lo = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (n, half, quarter, l)
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = (lo | (hi << 4)).reshape(rows, -1)
        return QuantBlocks(q, b[:, 192:208].view(np.int8).reshape(rows, -1), None, f16(208))
    s = b[:, 4:16]
    ls = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], axis=-1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=-1)
    qs = b[:, -128:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # (n, chunk, half, l)
    if bt.name == "Q5_K":
        qh = b[:, 16:48].reshape(n, 1, 32)
        q = q | ((((qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4).reshape(n, 4, 2, 32))
    return QuantBlocks(q.reshape(rows, -1), ls.reshape(rows, -1), lm.reshape(rows, -1), f16(0), f16(2))


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Raw bytes -> float32 weight, by gguf-py's reference dequantizer (dequantize_row_* in ggml-quants.c)."""
    return gguf.quants.dequantize(np.ascontiguousarray(raw, dtype=np.uint8), qtype(type_name))


# --------------------------------------------------------------------------- codes from an external optimizer


def pack_from_codes(codes, scales, type_name: str, zeros=None, group_size: int = QK) -> np.ndarray:
    """Pack GPTQ-style integer codes into a block-32 type: w = scales * (codes - zeros) per group.

    codes (rows, cols) in 0..2^bits-1, scales and zeros (rows, cols // group_size).
    Symmetric types (Q4_0, Q5_0, Q8_0) need zeros None or all 2^(bits-1); asymmetric
    types (Q4_1, Q5_1) need zeros, stored as the offset m = -scale*zero in fp16 (the
    only rounding on the way: at most half an fp16 step of m). Scales must be fp16 values.
    Anything else is refused with ValueError, never requantized.
    """
    bt = block_type(type_name)
    if bt.levels:
        raise ValueError(f"{bt.name} codes index its non-uniform levels; pack them with pack(codes, d, None, {bt.name!r})")
    if bt.kquant:
        raise ValueError(f"{bt.name} has two-level scales; pack its codes with pack(codes, scales, mins, {bt.name!r}, d, dmin)")
    if group_size != QK:
        raise ValueError(f"{bt.name} holds groups of {QK} values, not {group_size}; quantize with group size {QK}")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % QK:
        raise ValueError(f"{bt.name}: codes must be (rows, cols) with cols a multiple of {QK}, got {codes.shape}")
    gshape = (codes.shape[0], codes.shape[1] // QK)
    q = _ints(codes, "codes", 0, 2**bt.bits - 1, codes.shape, bt)
    s = _fp16(scales, "scales", gshape, bt)
    half = 2 ** (bt.bits - 1)
    if bt.symmetric:
        if zeros is not None and (np.asarray(zeros) != half).any():
            raise ValueError(f"{bt.name} is symmetric (zero point {half}); asymmetric zero points need "
                             f"{bt.name[:2]}_1" + ("" if bt.bits < 8 else " (no 8-bit asymmetric block type exists)"))
        return pack(q - half if bt.bits == 8 else q, s, None, bt.name)
    if zeros is None:
        raise ValueError(f"{bt.name} is asymmetric: pass the zero points (a symmetric layout belongs in {bt.name[:2]}_0)")
    z = _ints(zeros, "zeros", 0, 2**bt.bits - 1, gshape, bt)
    m = -(s.astype(np.float64) * z)
    if not np.isfinite(m.astype(np.float16)).all():
        raise ValueError(f"{bt.name}: offset -scale*zero is out of fp16 range")
    return pack(q, s, m.astype(np.float16), bt.name)
