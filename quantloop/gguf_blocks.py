"""Exact GGUF block packers: llama.cpp's quantized block layouts, in numpy.

Optimizing quantizers (GPTQ, AWQ, QAT) aim at a GGUF type's exact grid; this
module turns the integers and scales they chose into the bytes llama.cpp reads,
so exporting changes no weight. Types and what one block stores (codes are the
integers exactly as stored; d, m, dmin are fp16):

  Q4_0  32 values  d, q in 0..15      w = d*(q - 8)
  Q4_1  32 values  d, m, q in 0..15   w = d*q + m
  Q5_0  32 values  d, q in 0..31      w = d*(q - 16)   (low nibbles in qs, bit 4 in qh)
  Q5_1  32 values  d, m, q in 0..31   w = d*q + m
  Q8_0  32 values  d, q in -128..127  w = d*q
  Q4_K  256 values d, dmin, 8 x (sc, mn in 0..63), q in 0..15   w = d*sc*q - dmin*mn  (sub-blocks of 32)
  Q5_K  256 values d, dmin, 8 x (sc, mn in 0..63), q in 0..31   w = d*sc*q - dmin*mn  (sub-blocks of 32)
  Q6_K  256 values d, 16 x sc in -128..127, q in 0..63          w = d*sc*(q - 32)     (sub-blocks of 16)

Quantizing reproduces llama.cpp's reference rounding (ggml-quants.c,
quantize_row_*_ref, which is what llama-quantize runs without an importance
matrix): gguf-py's numpy quantizers for the block-32 types, a numpy port for
the k-quants. Dequantizing is gguf-py's (`gguf.quants.dequantize`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

QK = 32  # block-32 types
QK_K = 256  # k-quant super-blocks
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c
F32 = np.float32


class BlockType(NamedTuple):
    name: str
    block: int  # values per block (32) or super-block (256)
    bits: int
    symmetric: bool  # no offset stored
    kquant: bool


TYPES = {
    "Q4_0": BlockType("Q4_0", QK, 4, True, False),
    "Q4_1": BlockType("Q4_1", QK, 4, False, False),
    "Q5_0": BlockType("Q5_0", QK, 5, True, False),
    "Q5_1": BlockType("Q5_1", QK, 5, False, False),
    "Q8_0": BlockType("Q8_0", QK, 8, True, False),
    "Q4_K": BlockType("Q4_K", QK_K, 4, False, True),
    "Q5_K": BlockType("Q5_K", QK_K, 5, False, True),
    "Q6_K": BlockType("Q6_K", QK_K, 6, True, True),
}


class QuantBlocks(NamedTuple):
    """Codes and scales of a (rows, cols) weight, as a GGUF type stores them.

    Block-32 types: `scales` is d (fp16, one per block), `mins` is m (Q4_1/Q5_1) or None.
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

    def __init__(self, type_name: str, n_bad: int, n_blocks: int, max_deviation: float, relative: float):
        self.type_name, self.n_bad, self.n_blocks = type_name, n_bad, n_blocks
        self.max_deviation, self.relative = max_deviation, relative
        super().__init__(f"{n_bad} of {n_blocks} blocks are not on the {type_name} grid "
                         f"(max deviation {max_deviation:.3g}, {relative:.1%} of the block's largest magnitude)")


def block_type(type_name: str) -> BlockType:
    bt = TYPES.get(str(type_name).upper())
    if bt is None:
        raise ValueError(f"unknown GGUF block type {type_name!r}; supported: {', '.join(TYPES)}")
    return bt


def qtype(type_name: str):
    """The gguf-py GGMLQuantizationType of a type name."""
    from gguf import GGMLQuantizationType

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
    """Row sums accumulated left to right in float32, as a C loop does (numpy's sum is pairwise)."""
    acc = t[:, 0].copy()
    for i in range(1, t.shape[1]):
        acc += t[:, i]
    return acc


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml-quants.c nearest_int: round half to even (the 1.5*2^23 trick)."""
    return np.rint(x).astype(np.int64)


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
            raise ValueError(f"{bt.name} is symmetric and stores no mins; an offset needs {bt.name[:2]}_1")
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


def unpack(raw: np.ndarray, type_name: str) -> QuantBlocks:
    """Raw GGUF bytes (rows, bytes_per_row) -> QuantBlocks; the inverse of `pack`."""
    from gguf import GGML_QUANT_SIZES

    bt = block_type(type_name)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    block, size = GGML_QUANT_SIZES[qtype(bt.name)]
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{bt.name}: raw data must be (rows, k*{size}) bytes, got {raw.shape}")
    rows, n = raw.shape[0], raw.size // size
    b = raw.reshape(n, size)

    def f16(lo, hi=None):
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
    import gguf.quants

    return gguf.quants.dequantize(np.ascontiguousarray(raw, dtype=np.uint8), qtype(type_name))


# --------------------------------------------------------------------------- quantize


def quantize_blocks(w: np.ndarray, type_name: str) -> QuantBlocks:
    """Round a float (rows, cols) weight as llama.cpp does (quantize_row_<type>_ref).

    Block-32 types use gguf-py's numpy ports, which are bit-exact with ggml-quants.c;
    the k-quants use the numpy ports below.
    """
    bt = block_type(type_name)
    w = _matrix(w, bt)
    if not bt.kquant:
        import gguf.quants

        return unpack(gguf.quants.quantize(w, qtype(bt.name)), bt.name)
    return _quantize_q6_k(w) if bt.name == "Q6_K" else _quantize_q45_k(w, bt)


def fake_quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """dequantize(pack(quantize_blocks(w))): the grid point llama.cpp stores for w, float32."""
    return dequantize(quantize_to_bytes(w, type_name), type_name)


def quantize_to_bytes(w: np.ndarray, type_name: str) -> np.ndarray:
    qb = quantize_blocks(w, type_name)
    return pack(qb.codes, qb.scales, qb.mins, type_name, qb.d, qb.dmin)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml-quants.c make_qkx2_quants (use_mad = false) over rows of x: (L, scale, the_min)."""
    n = x.shape[1]
    mn, mx = x.min(axis=1), x.max(axis=1)
    sum_w = _seqsum(weights)
    sum_x = _seqsum(weights * x)
    mn = np.minimum(mn, F32(0))
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        diff = scale[:, None] * L.astype(F32) + mn[:, None] - x
        best = _seqsum(weights * (diff * diff))
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            la = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = la.astype(F32)
            wl = weights * lf
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * lf + this_min[:, None] - x
            cur = _seqsum(weights * (diff * diff))
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale).astype(F32)
    assert n == x.shape[1]
    return L, scale, (-mn).astype(F32)


def _quantize_q45_k(w: np.ndarray, bt: BlockType) -> QuantBlocks:
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref (no importance matrix)."""
    rows, cols = w.shape
    nmax, rmin, nstep = (15, -1.0, 20) if bt.bits == 4 else (31, -0.5, 15)
    x = w.reshape(-1, 32)
    av_x = np.sqrt(_seqsum(x * x) / F32(32))
    weights = av_x[:, None] + np.abs(x)
    L, scales, mins = _make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # (uint8_t) of nearest_int, then MIN(63, .)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    dj = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)
    dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = np.clip(_nearest_int((x + dm[:, None]) / dj[:, None]), 0, nmax)
    L = np.where(dj[:, None] != 0, l2, L)
    nb = cols // QK_K
    return QuantBlocks(L.reshape(rows, cols), ls.reshape(rows, nb * 8), lm.reshape(rows, nb * 8),
                       d.reshape(rows, nb), dmin.reshape(rows, nb))


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int):
    """ggml-quants.c make_qx_quants with rmse_type = 1 and no weights: (L = l + nmax, scale)."""
    ax = np.abs(x)
    mx = np.take_along_axis(x, ax.argmax(axis=1)[:, None], axis=1)[:, 0]  # first largest |x|, with its sign
    zero = ax.max(axis=1) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x

    def trial(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l + nmax, _seqsum(wx * lf), _seqsum(w * lf * lf)

    L, sumlx, suml2 = trial(F32(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in [s for s in range(-9, 10) if s]:
            l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero[:, None], 0, L), np.where(zero, F32(0), scale).astype(F32)


def _quantize_q6_k(w: np.ndarray) -> QuantBlocks:
    """quantize_row_q6_K_ref (no importance matrix)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    L, scales = _make_qx_quants_rmse1(x, 32)
    scales = scales.reshape(-1, 16)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d = np.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
        sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
        sc = np.where(zero[:, None], 0, sc)
        dj = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
        l2 = np.clip(_nearest_int(x / dj[:, None]), -32, 31) + 32
    L = np.where(dj[:, None] != 0, l2, L)
    L = np.where(np.repeat(zero, 16)[:, None], 0, L)
    nb = cols // QK_K
    return QuantBlocks(L.reshape(rows, cols), sc.astype(np.int8).reshape(rows, nb * 16), None, d.reshape(rows, nb))


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


# --------------------------------------------------------------------------- recover codes from on-grid weights

GRID_RTOL = 2.0**-10  # one fp16 step at the block's largest magnitude


def _deq32(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bt: BlockType) -> np.ndarray:
    """dequantize_row_* for block-32 types from (n, 32) stored codes and fp16 d (and m)."""
    d = d.astype(F32)[:, None]
    if m is not None:
        return d * q.astype(F32) + m.astype(F32)[:, None]
    return d * (q.astype(F32) - (0 if bt.bits == 8 else 2 ** (bt.bits - 1)))


def fit_blocks(w: np.ndarray, type_name: str, rtol: float = GRID_RTOL) -> QuantBlocks:
    """Codes and scales that reproduce a weight already on the type's grid, to fp16 rounding.

    A block fits when every value is within rtol x (its largest magnitude, or |m|) of
    the packed block's dequantized value. llama.cpp's own rounding is tried first (so
    a weight made by its round-to-nearest packs to llama-quantize's bytes); for
    block-32 types, blocks it misses (e.g. GPTQ codes that do not reach the ends of
    the range) are searched over every scale their largest value (symmetric) or their
    range (asymmetric) allows. K-quants accept only weights llama.cpp's rounding
    reproduces. Raises OffGridError (a ValueError) naming the worst deviation.
    """
    bt = block_type(type_name)
    w = _matrix(w, bt)
    qb = quantize_blocks(w, bt.name)
    deq = dequantize(pack(qb.codes, qb.scales, qb.mins, bt.name, qb.d, qb.dmin), bt.name)
    X, D = w.reshape(-1, bt.block), deq.reshape(-1, bt.block)
    ref = np.abs(X).max(axis=1)
    dev = np.abs(D - X).max(axis=1)
    bad = np.flatnonzero(dev > rtol * ref)
    if bad.size and not bt.kquant:
        codes, scales = qb.codes.reshape(-1, QK).copy(), qb.scales.reshape(-1).copy()
        mins = None if bt.symmetric else qb.mins.reshape(-1).copy()
        for q, d, m, rows in _search32(X[bad], bt, rtol):
            codes[bad[rows]], scales[bad[rows]] = q, d
            if mins is not None:
                mins[bad[rows]] = m
            dev[bad[rows]] = 0
        bad = bad[dev[bad] > rtol * ref[bad]]
        qb = QuantBlocks(codes.reshape(w.shape), scales.reshape(qb.scales.shape), None if mins is None else mins.reshape(qb.scales.shape))
    if bad.size:
        worst = bad[np.argmax(dev[bad] / np.maximum(ref[bad], 1e-30))]
        raise OffGridError(bt.name, int(bad.size), int(X.shape[0]), float(dev[bad].max()), float(dev[worst] / max(ref[worst], 1e-30)))
    return qb


def _search32(X: np.ndarray, bt: BlockType, rtol: float):
    """Yield (codes, d, m, rows) for the rows of X (n, 32) that some block of the type reproduces."""
    left = np.arange(X.shape[0])
    if bt.symmetric:
        nmax = 2 ** (bt.bits - 1)  # value d*k, k in -nmax..nmax-1; the largest |x| is d*k for some k != 0
        big = np.take_along_axis(X, np.abs(X).argmax(axis=1)[:, None], axis=1)[:, 0]
        ks = [k for a in range(nmax, 0, -1) for k in (-a, a) if k < nmax]
        cands = ((k, None) for k in ks)
    else:
        nmax = 2**bt.bits - 1  # value d*q + m; the range is d*span for some span, the minimum d*qlo + m
        lo, hi = X.min(axis=1), X.max(axis=1)
        cands = ((span, qlo) for span in range(nmax, 0, -1) for qlo in range(nmax - span + 1))
    for a, b in cands:
        if left.size == 0:
            return
        x = X[left]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if bt.symmetric:
                d = (big[left] / F32(a)).astype(np.float16)
                m = None
                k = np.clip(np.rint(x / d.astype(F32)[:, None]), -nmax, nmax - 1)
                q = k if bt.bits == 8 else k + nmax
            else:
                d = ((hi[left] - lo[left]) / F32(a)).astype(np.float16)
                m = (lo[left] - F32(b) * d.astype(F32)).astype(np.float16)
                q = np.clip(np.rint((x - m.astype(F32)[:, None]) / d.astype(F32)[:, None]), 0, nmax)
            q = np.nan_to_num(q).astype(np.int64)
            ref = np.abs(x).max(axis=1) if m is None else np.maximum(np.abs(x).max(axis=1), np.abs(m.astype(F32)))
            ok = np.isfinite(d) & (np.abs(_deq32(q, d, m, bt) - x).max(axis=1) <= rtol * ref)
        if ok.any():
            yield q[ok], d[ok], None if m is None else m[ok], left[ok]
            left = left[~ok]
