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

Public functions:
  quantize_blocks(w, type) -> QuantBlocks   llama.cpp's rounding (ggml-quants.c quantize_row_*_ref, what
                                            llama-quantize runs without an importance matrix): gguf-py's
                                            numpy ports for block-32 types, ports here for the k-quants
  pack(codes, scales, mins, type[, d, dmin]) -> uint8 (rows, bytes)   the ggml block layout; unpack() inverts
  dequantize(raw, type), fake_quantize(w, type), quantize_to_bytes(w, type)   (gguf-py's dequantizers)
  pack_from_codes(codes, scales, type, zeros, group_size)   GPTQ-style integer codes -> block-32 bytes
  fit_blocks(w, type) -> QuantBlocks       codes and scales of a float weight already on the grid
  gguf_type_for_layout(bits, group_size, symmetric), fallback_type(type, width)
Every one refuses (ValueError) what the type cannot hold exactly, rather than rounding it.
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


def fallback_type(type_name: str, width: int) -> str:
    """The type llama-quantize writes for rows of `width` values when `type_name`'s block does not divide
    them (llama-quant.cpp tensor_type_fallback): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16.

    A fake quantizer aiming at a k-quant grid must use this type for such layers (SmolLM2's 576-wide
    rows, for example), or the exported file cannot match it.
    """
    bt = block_type(type_name)
    if width % bt.block == 0:
        return bt.name
    fallback = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(bt.name, "F16")
    return fallback if fallback != "F16" and width % QK == 0 else "F16"


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
            raise ValueError(f"{bt.name} is symmetric and stores no mins" + (f"; an offset needs {bt.name[:2]}_1" if bt.bits < 8 else ""))
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

        qb = unpack(gguf.quants.quantize(w, qtype(bt.name)), bt.name)
        return _c_signed_zeros(qb, w.reshape(-1, QK), bt)
    return _concat([_quantize_q6_k(c) if bt.name == "Q6_K" else _quantize_q45_k(c, bt) for c in _row_chunks(w)])


CHUNK = 1 << 20  # values per piece of work, to bound the memory of the vectorised searches


def _row_chunks(w: np.ndarray):
    step = max(1, CHUNK // w.shape[1])
    return [w[i:i + step] for i in range(0, w.shape[0], step)]


def _concat(parts: list[QuantBlocks]) -> QuantBlocks:
    return QuantBlocks(*[None if f[0] is None else np.concatenate(f) for f in zip(*parts)])


def _c_signed_zeros(qb: QuantBlocks, X: np.ndarray, bt: BlockType) -> QuantBlocks:
    """The sign of zero scales and offsets as the C loops pick them (numpy's argmax/min differ on +-0)."""
    shape = qb.scales.shape
    if bt.bits == 8:
        return qb
    if bt.symmetric:  # max stays 0.0f when every |x| is 0, so d = 0.0f/-nmax = -0.0
        d = np.where(np.abs(X).max(axis=1) == 0, np.float16(-0.0), qb.scales.reshape(-1))
        return qb._replace(scales=d.reshape(shape))
    lo, hi = X.min(axis=1), X.max(axis=1)  # the C loop keeps the first of equal values
    first = lambda v: np.take_along_axis(X, (X == v[:, None]).argmax(axis=1)[:, None], axis=1)[:, 0]  # noqa: E731
    m = first(lo).astype(np.float16)
    d = np.where(hi == lo, np.float16(0), qb.scales.reshape(-1))
    return qb._replace(scales=d.reshape(shape), mins=m.reshape(shape))


def fake_quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """dequantize(pack(quantize_blocks(w))): the grid point llama.cpp stores for w, float32."""
    return dequantize(quantize_to_bytes(w, type_name), type_name)


def quantize_to_bytes(w: np.ndarray, type_name: str) -> np.ndarray:
    """pack(quantize_blocks(w)): the bytes llama-quantize writes for w (without an importance matrix)."""
    qb = quantize_blocks(w, type_name)
    return pack(qb.codes, qb.scales, qb.mins, type_name, qb.d, qb.dmin)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml-quants.c make_qkx2_quants (use_mad = false) over rows of x: (L, scale, the_min)."""
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

GRID_RTOL = 2.0**-11 * 1.0625  # fp16 rounding (half a unit in the last place), with a little slack
EXACT_RTOL = 2.0**-20  # float32 arithmetic only


def _rdev(X: np.ndarray, deq: np.ndarray, offset=None) -> np.ndarray:
    """Per row, the largest |deq - X| in units of each value's magnitude: max |deq_i - x_i| / (|x_i| + 2|offset|).

    A block is on the grid "to fp16 rounding" when this is at most GRID_RTOL: each weight is within
    fp16 rounding of itself, plus that of the block's fp16 offset (Q4_1/Q5_1 m, when an optimizer's
    zero point made it non-fp16). The floor 2^-10 x the row's largest |x| keeps values near zero
    from asking more than float32 arithmetic gives (a formula evaluated in another order).
    """
    size = np.abs(X)
    floor = 2.0**-10 * size.max(axis=-1, keepdims=True) + 1e-30
    if offset is not None:
        size = size + 2 * np.abs(offset.astype(F32))[..., None]
    return (np.abs(deq - X) / (size + floor)).max(axis=-1)


def fit_blocks(w: np.ndarray, type_name: str, rtol: float = GRID_RTOL) -> QuantBlocks:
    """Codes and scales that reproduce a weight already on the type's grid, to fp16 rounding.

    The inverse of fake quantization, for weights whose codes are not at hand (a float
    checkpoint written by RTN, GPTQ or QAT). A block (k-quants: a sub-block) fits when
    each value is within rtol of itself (see `_rdev`); where several fit, the closest is
    kept. llama.cpp's own rounding comes first, so a weight it rounded packs to
    llama-quantize's bytes. Blocks it does not reproduce exactly (GPTQ/QAT codes that do
    not reach the ends of the range) are searched: block-32 types over every scale that
    the largest value (symmetric) or the range (asymmetric) allows; k-quants over every
    sub-block scale and min under llama.cpp's super-block d and dmin, then, for
    super-blocks still off, over d and dmin rebuilt from the gaps between their values.
    Raises OffGridError (a ValueError) with the worst deviation when some block fits nothing.
    """
    bt = block_type(type_name)
    w = _matrix(w, bt)
    fit = _fit_k if bt.kquant else _fit32
    parts = [fit(c, quantize_blocks(c, bt.name), bt, rtol) for c in _row_chunks(w)]
    qb, rdev, unit = _concat([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), parts[0][2]
    bad = np.flatnonzero(rdev > rtol)
    if bad.size:
        X = w.reshape(-1, unit)
        err = np.abs(dequantize(pack(qb.codes, qb.scales, qb.mins, bt.name, qb.d, qb.dmin), bt.name).reshape(-1, unit) - X)
        dev, top = err[bad].max(axis=1), np.abs(X[bad]).max(axis=1)
        raise OffGridError(bt.name, int(bad.size), int(rdev.size), unit, float(dev.max()),
                           float((dev / np.maximum(top, 1e-30)).max()))
    return qb


# block-32 types


def _fit32(w, qb, bt, rtol):
    X = w.reshape(-1, QK)
    codes, d = qb.codes.reshape(-1, QK).copy(), qb.scales.reshape(-1).copy()
    m = None if bt.symmetric else qb.mins.reshape(-1).copy()
    rdev = _rdev32(X, codes, d, m, bt)
    todo = np.flatnonzero(rdev > EXACT_RTOL)
    if todo.size:
        for q, dd, mm, e, rows in _search32(X[todo], bt, rtol):
            i = todo[rows]
            better = e < rdev[i]
            i = i[better]
            codes[i], d[i], rdev[i] = q[better], dd[better], e[better]
            if m is not None:
                m[i] = mm[better]
    shape = qb.scales.shape
    return QuantBlocks(codes.reshape(w.shape), d.reshape(shape), None if m is None else m.reshape(shape)), rdev, QK


def _rdev32(X, q, d, m, bt):
    """`_rdev` of block-32 codes and fp16 d (and m), dequantized as dequantize_row_* does."""
    df = d.astype(F32)[..., None]
    if m is None:
        return _rdev(X, df * (q.astype(F32) - (0 if bt.bits == 8 else 2 ** (bt.bits - 1))))
    return _rdev(X, df * q.astype(F32) + m.astype(F32)[..., None], m)


def _search32(X: np.ndarray, bt: BlockType, rtol: float):
    """Yield (codes, d, m, rdev, rows) for rows of X (n, 32) that a block of the type fits.

    Symmetric: the largest |x| is d*k for some k != 0 in -nmax..nmax-1, so d = x/k (finest grids
    first). Asymmetric: the range is d*span for some span (largest first) and the minimum is
    d*qlo + m; every qlo is tried at once and the closest kept, and a fit that is not exact is
    compared with the coarser grids whose span divides its span (an exact fit may hide there).
    """
    left = np.arange(X.shape[0])
    if bt.symmetric:
        nmax = 2 ** (bt.bits - 1)
        big = np.take_along_axis(X, np.abs(X).argmax(axis=1)[:, None], axis=1)[:, 0]
        for k in [k for a in range(nmax, 0, -1) for k in (-a, a) if k < nmax]:
            if left.size == 0:
                return
            x = X[left]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                d = (big[left] / F32(k)).astype(np.float16)
                q = np.clip(np.rint(x / d.astype(F32)[:, None]), -nmax, nmax - 1)
                q = np.nan_to_num(q if bt.bits == 8 else q + nmax).astype(np.int64)
                e = _rdev32(x, q, d, None, bt)
            ok = np.isfinite(d) & (e <= rtol)
            if ok.any():
                yield q[ok], d[ok], None, e[ok], left[ok]
                left = left[~ok]
        return
    for span in range(2**bt.bits - 1, 0, -1):
        if left.size == 0:
            return
        q, d, m, e = _asym_try(X[left], span, bt)
        ok = e <= rtol
        if ok.any():
            q, d, m, e, rows = q[ok], d[ok], m[ok], e[ok], left[ok]
            for coarse in [c for c in range(1, span) if span % c == 0]:
                loose = np.flatnonzero(e > EXACT_RTOL)
                if loose.size == 0:
                    break
                q2, d2, m2, e2 = _asym_try(X[rows[loose]], coarse, bt)
                j = e2 < e[loose]
                i = loose[j]
                q[i], d[i], m[i], e[i] = q2[j], d2[j], m2[j], e2[j]
            yield q, d, m, e, rows
            left = left[~ok]


def _asym_try(x: np.ndarray, span: int, bt: BlockType):
    """Closest Q4_1/Q5_1 block to each row of x whose range is d*span: (codes, d, m, rdev)."""
    nmax = 2**bt.bits - 1
    lo, hi = x.min(axis=1), x.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = ((hi - lo) / F32(span)).astype(np.float16)
        mq = (lo[:, None] - np.arange(nmax - span + 1, dtype=F32) * d.astype(F32)[:, None]).astype(np.float16)
        q = np.clip(np.rint((x[:, None, :] - mq.astype(F32)[..., None]) / d.astype(F32)[:, None, None]), 0, nmax)
        q = np.nan_to_num(q).astype(np.int64)  # (row, qlo, value)
        e = _rdev32(np.broadcast_to(x[:, None, :], q.shape), q, np.broadcast_to(d[:, None], mq.shape), mq, bt)
    e = np.where(np.isfinite(mq) & np.isfinite(d)[:, None], e, np.inf)
    pick = (np.arange(x.shape[0]), e.argmin(axis=1))
    return q[pick], d, mq[pick], e[pick]


# k-quants


def _rdevk(X, q, d, sc, dmin, mn):
    """`_rdev` of k-quant sub-blocks (rows), dequantized as dequantize_row_q{4,5,6}_K does."""
    D = (d * sc.astype(F32))[..., None]
    if mn is None:
        return _rdev(X, D * (q.astype(F32) - 32))
    return _rdev(X, D * q.astype(F32) - (dmin * mn.astype(F32))[..., None])


def _fit_k(w, qb, bt, rtol):
    """K-quants: llama.cpp's rounding, then searches for the sub-blocks and super-blocks it misses."""
    n = 16 if bt.name == "Q6_K" else 32
    per = QK_K // n
    X = w.reshape(-1, n)
    codes, sc = qb.codes.reshape(-1, n).astype(np.int64), qb.scales.reshape(-1).astype(np.int64)
    mn = None if qb.mins is None else qb.mins.reshape(-1).astype(np.int64)
    d, dmin = qb.d.reshape(-1).copy(), None if qb.dmin is None else qb.dmin.reshape(-1).copy()
    dsub = np.repeat(d.astype(F32), per)
    msub = None if dmin is None else np.repeat(dmin.astype(F32), per)
    rdev = _rdevk(X, codes, dsub, sc, msub, mn)

    def accept(rows, fit):
        codes[rows], sc[rows], rdev[rows] = fit[0], fit[1], fit[3]
        if mn is not None:
            mn[rows] = fit[2]

    # 1. sub-blocks llama.cpp does not reproduce exactly, under its super-block d and dmin
    todo = np.flatnonzero(rdev > EXACT_RTOL)
    if todo.size:
        fit = _search_k(X[todo], dsub[todo], None if msub is None else msub[todo], bt, rtol)
        better = fit[3] < rdev[todo]
        accept(todo[better], [f[better] for f in fit])
    # 2. super-blocks whose d (or dmin) llama.cpp estimated differently: rebuild them from their values
    for blk in np.unique(np.flatnonzero(rdev > rtol) // per):
        rows = np.arange(blk * per, (blk + 1) * per)
        fit = _superblock_fit(X[rows], bt, rtol, float(d[blk]))
        if fit is not None:
            d[blk] = fit[0]
            if dmin is not None:
                dmin[blk] = fit[1]
            accept(rows, fit[2:])
    out = QuantBlocks(codes.reshape(w.shape), sc.reshape(qb.scales.shape), None if mn is None else mn.reshape(qb.mins.shape),
                      d.reshape(qb.d.shape), None if dmin is None else dmin.reshape(qb.dmin.shape))
    return out, rdev, n


def _search_k(X, d, dmin, bt, rtol):
    """For each sub-block (row of X) under super-block scales d (and dmin), the first sub-block scale
    (largest first) that reproduces it, with the min that fits it best: (codes, sc, mn, rdev); rows
    that nothing fits keep an infinite rdev."""
    nmax = 2**bt.bits - 1
    k = X.shape[0]
    codes, sc, mn = np.zeros(X.shape, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
    rdev = np.full(k, np.inf)
    left = np.arange(k)
    cands = range(-128, 128) if dmin is None else range(64)
    for s in sorted(cands, key=lambda v: (v == 0, -abs(v))):
        if left.size == 0:
            break
        x, D = X[left], d[left] * F32(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            if dmin is None:
                q = np.nan_to_num(np.clip(np.rint(x / D[:, None]), -32, 31)).astype(np.int64) + 32
                m = np.zeros(left.size, np.int64)
            else:  # w = D*q - dmin*m: the lowest value is D*t - dmin*m for some code t; take the best (t, m)
                dm, lo = dmin[left][:, None], x.min(axis=1)[:, None]
                M = D[:, None] * np.arange(nmax + 1, dtype=F32) - lo
                m = np.rint(M / dm)
                err = np.where((m >= 0) & (m <= 63), np.abs(M - dm * m), np.inf)
                m = np.nan_to_num(np.take_along_axis(m, err.argmin(axis=1)[:, None], axis=1)[:, 0]).astype(np.int64)
                q = np.clip(np.rint((x + (dm[:, 0] * m.astype(F32))[:, None]) / D[:, None]), 0, nmax)
                q = np.nan_to_num(q).astype(np.int64)
            e = _rdevk(x, q, d[left], np.full(left.size, s), None if dmin is None else dmin[left], None if dmin is None else m)
        hit = np.flatnonzero(e <= rtol)
        if hit.size:
            i = left[hit]
            codes[i], sc[i], mn[i], rdev[i] = q[hit], s, m[hit], e[hit]
            left = np.delete(left, hit)
    return codes, sc, mn, rdev


def _fgcd(values: np.ndarray, rel: float) -> float:
    """Approximate gcd of positive floats that are near-integer multiples of a common step (Euclid)."""
    tol = rel * values.min()
    step = values.min()
    for v in values:
        a, b = v, step
        while b > tol:
            r = np.fmod(a, b)
            a, b = b, (0.0 if b - r <= tol else r)
        step = a
    return step


def _step(x: np.ndarray, nmax: int, rel: float) -> float:
    """A grid step of one sub-block: the gcd of the gaps between its distinct values (a multiple of the
    true step when all codes share a factor). 0 for a constant sub-block, nan when there is none."""
    g = np.diff(np.unique(x)).astype(np.float64)
    if g.size == 0:
        return 0.0
    step = _fgcd(g, rel)
    k = g / step
    if np.abs(k - np.rint(k)).max() > rel or g.sum() / step > nmax + rel:
        return np.nan
    return step


def _superblock_fit(X: np.ndarray, bt: BlockType, rtol: float, d_hint: float, rel: float = 1e-3):
    """(d, dmin, codes, sc, mn, rdev) of one k-quant super-block (rows = sub-blocks) rebuilt from
    its values, or None.

    Every sub-block's grid step is a multiple of d (d*sc_j, or more when its codes share a factor),
    so d is their gcd over a small integer, tried nearest llama.cpp's estimate d_hint first; each
    sc_j is then the largest that fits; dmin makes every sub-block minimum lo_j equal
    D_j*t - dmin*mn_j for integers t and mn_j in 0..63.
    """
    nmax = 2**bt.bits - 1
    steps = np.array([_step(x, nmax, rel) for x in X])
    if np.isnan(steps).any() or not (steps > 0).any():
        return None
    smax = 128 if bt.name == "Q6_K" else 63
    per = X.shape[0]
    G = _fgcd(steps[steps > 0], rel)
    s0 = G / d_hint if d_hint > 0 else 1.0
    near = sorted(range(max(1, int(s0 * 0.9)), int(s0 * 1.1) + 2), key=lambda v: abs(v - s0))
    spans = (X.max(axis=1) - X.min(axis=1)).astype(np.float64)
    for s in dict.fromkeys(near + list(range(1, 65))):
        d = np.float16(G / s)
        if not np.isfinite(d) or d <= 0:
            continue
        ratio = steps / np.float64(d)
        if not (np.abs(ratio - np.rint(ratio)) <= rel).all():
            continue
        sc = _largest_scales(np.rint(ratio).astype(np.int64), spans / np.float64(d), smax, nmax)
        if sc is None:
            continue
        if bt.name == "Q6_K":  # w = D*(q - 32): try both signs of each sub-block scale
            (q1, e1), (q2, e2) = _q6_try(X, d, sc), _q6_try(X, d, -sc)
            pos = e1 <= e2
            q, sc, e = np.where(pos[:, None], q1, q2), np.where(pos, sc, -sc), np.where(pos, e1, e2)
            flat = np.flatnonzero(steps == 0)  # constant sub-blocks: any scale that holds the value
            if flat.size:
                f = _search_k(X[flat], np.full(flat.size, d, F32), None, bt, rtol)
                q[flat], sc[flat], e[flat] = f[0], f[1], f[3]
            if (e <= rtol).all():
                return d, None, q, sc, np.zeros(per, np.int64), e
            continue
        D = F32(d) * sc.astype(F32)
        for dmin, mn in _dmin_candidates(X, D.astype(np.float64), nmax, rel):
            M = F32(dmin) * mn.astype(F32)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.nan_to_num(np.clip(np.rint((X + M[:, None]) / D[:, None]), 0, nmax)).astype(np.int64)
            e = _rdevk(X, q, np.full(per, d, F32), sc, np.full(per, dmin, F32), mn)
            if (e <= rtol).all():
                return d, dmin, q, sc, mn, e
    return None


def _largest_scales(ratio: np.ndarray, span: np.ndarray, smax: int, nmax: int) -> np.ndarray | None:
    """Per sub-block the largest sc <= smax dividing its step ratio (step = d*ratio) whose codes
    still fit (range/(d*sc) <= nmax); 0 for constant sub-blocks; None when one has none."""
    out = np.zeros(ratio.size, np.int64)
    for j, (r, sp) in enumerate(zip(ratio, span)):
        if r == 0:
            continue
        k = np.arange(1, r + 1)
        ok = (r % k == 0) & (r // k <= smax) & (sp / (r // k) <= nmax + 0.5)
        if not ok.any():
            return None
        out[j] = r // k[ok.argmax()]
    return out


def _q6_try(X, d, sc):
    """Q6_K codes of sub-blocks X under d and signed sub-block scales sc: (codes, rdev)."""
    D = F32(d) * sc.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.nan_to_num(np.clip(np.rint(X / D[:, None]), -32, 31)).astype(np.int64) + 32
    e = _rdevk(X, q, np.full(X.shape[0], d, F32), sc, None, None)
    return q, np.where(sc > 127, np.inf, e)  # int8 scales: -128..127


def _dmin_candidates(X, steps, nmax, rel):
    """Yield (dmin, mn per sub-block), closest first, such that every sub-block minimum lo_k is
    D_k*t - dmin*mn_k with t in 0..nmax-span_k (a constant sub-block: lo_k = -dmin*mn_k)."""
    lo = X.min(axis=1).astype(np.float64)
    D = np.where(steps > 0, steps, 1.0)
    span = np.where(steps > 0, np.rint((X.max(axis=1) - lo) / D), 0)
    j = int(np.argmin(lo))  # the most negative minimum: dmin*mn_j = D_j*t - lo_j for some t and mn_j
    M = D[j] * np.arange(nmax - span[j] + 1) - lo[j] if steps[j] > 0 else np.array([-lo[j]])
    c = (M[M > 0][:, None] / np.arange(1, 64)).astype(np.float16).ravel()
    cands = np.unique(np.concatenate([[np.float16(0)], c[np.isfinite(c) & (c > 0)]]))
    alive = np.arange(cands.size)
    miss = np.zeros((cands.size, X.shape[0]))
    mn = np.zeros((cands.size, X.shape[0]), np.int64)
    scale = max(np.abs(lo).max(), 1e-30)
    for k in np.argsort(-np.abs(lo)):  # checking every sub-block in turn prunes the candidates fast
        v = cands[alive].astype(np.float64)[:, None] * np.arange(64) + lo[k]  # = D_k * t
        if steps[k] > 0:
            t = v / D[k]
            err = np.abs(t - np.rint(t))
            ok = (err <= rel) & (np.rint(t) >= 0) & (np.rint(t) <= nmax - span[k])
        else:
            err = np.abs(v) / scale
            ok = err <= rel
        err = np.where(ok, err, np.inf)
        keep = np.isfinite(err.min(axis=1))
        alive, err = alive[keep], err[keep]
        miss[alive, k], mn[alive, k] = err.min(axis=1), err.argmin(axis=1)
        if alive.size == 0:
            return
    for i in alive[np.argsort(miss[alive].max(axis=1), kind="stable")]:
        yield cands[i], mn[i]
