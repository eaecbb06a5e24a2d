"""llama.cpp's own rounding of float weights onto a type's grid (ggml-quants.c quantize_row_*_ref): gguf-py's
numpy ports for the block-32 types, ports here for the k-quants."""

from __future__ import annotations

import gguf.quants
import numpy as np

from quantloop.gguf.block_types import (
    F32,
    GROUP_MAX_EPS,
    QK,
    QK_K,
    BlockType,
    QuantBlocks,
    _matrix,
    _nearest_int,
    _seqsum,
    block_type,
    qtype,
)
from quantloop.gguf.packing import dequantize, pack, unpack
from quantloop.gguf.rounding_lowbit import (
    _make_qkx2_quants,
    quantize_iq4_nl,
    quantize_q2_k,
    quantize_q3_k,
)

# --------------------------------------------------------------------------- quantize


def quantize_blocks(w: np.ndarray, type_name: str) -> QuantBlocks:
    """Round a float (rows, cols) weight as llama.cpp does (quantize_row_<type>_ref).

    Block-32 types use gguf-py's numpy ports, which are bit-exact with ggml-quants.c;
    the k-quants use the numpy ports below, IQ4_NL, Q3_K and Q2_K those of rounding_lowbit.
    """
    bt = block_type(type_name)
    w = _matrix(w, bt)
    low = {"IQ4_NL": quantize_iq4_nl, "Q3_K": quantize_q3_k, "Q2_K": quantize_q2_k}.get(bt.name)
    if low is not None:
        return _concat([low(c) for c in _row_chunks(w)])
    if not bt.kquant:
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
