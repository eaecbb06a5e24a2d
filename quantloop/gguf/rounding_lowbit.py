"""llama.cpp's rounding (ggml-quants.c, no importance matrix) of the non-uniform IQ4_NL and the low-bit k-quants, in
numpy with the C code's float32 steps: quantize_iq4_nl (what llama-quantize runs for IQ4_NL, through
ggml_quantize_chunk), quantize_row_q3_K_ref, quantize_row_q2_K_ref; make_qkx2_quants is shared with Q4_K/Q5_K."""

from __future__ import annotations

import numpy as np

from quantloop.gguf.block_types import (
    F32,
    GROUP_MAX_EPS,
    KVALUES_IQ4NL,
    QK,
    QK_K,
    QuantBlocks,
    _nearest_int,
    _seqsum,
)

IQ4NL_LEVELS = np.array(KVALUES_IQ4NL, dtype=F32)
IQ4NL_NTRY = 7  # quantize_iq4_nl's scale search: 2 * 7 + 1 trial scales after the first


IQ4NL_MIDS = (IQ4NL_LEVELS[:-1] + IQ4NL_LEVELS[1:]) / F32(2)  # half-integers, exact


# The midpoints are multiples of 1/2 in -115.5..101, so "mid <= x" is "2 mid <= floor(2 x)" (2 x and its floor are
# exact): a table over floor(2 x) in -256..256 counts the midpoints at or below each value.
_TWICE_MIDS = (2 * IQ4NL_MIDS).astype(np.int64)
_COUNT_AT = np.searchsorted(_TWICE_MIDS, np.arange(-256, 257), side="right").astype(np.intp)


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml-quants.c best_index_int8 over the IQ4_NL levels: the index of the level nearest x (float32), the upper
    one on a tie. Its test x - lo < hi - x is exact in float32 wherever x is near the midpoint of lo and hi (both
    differences are then exact), so it is x < (lo + hi) / 2: the index is the number of midpoints <= x, read from
    a table by floor(2 x) (2.3 times faster than a binary search on 2M values; equal to np.searchsorted(IQ4NL_MIDS, x, "right"),
    NaN and +inf counting every midpoint, as there)."""
    with np.errstate(invalid="ignore"):
        twice = np.floor(np.asarray(x, dtype=np.float32) * np.float32(2))
        twice = np.nan_to_num(twice, nan=256.0, posinf=256.0, neginf=-256.0)
        return _COUNT_AT[np.clip(twice, -256, 256).astype(np.intp) + 256]


def quantize_iq4_nl(w: np.ndarray) -> QuantBlocks:
    """quantize_iq4_nl without quant_weights (quantize_row_iq4_nl_impl with block 32, ntry 7): per block of 32,
    weights x^2, a first scale max/127 refined by least squares, 15 trial scales (k - 127)/max for k in -7..7,
    the best by weighted error; codes are the nearest levels of x times the float32 1/d, d is stored in fp16."""
    rows, cols = w.shape
    X = w.reshape(-1, QK)
    weight = X * X
    ax = np.abs(X)
    zero = ax.max(axis=1) < GROUP_MAX_EPS
    big = np.take_along_axis(X, ax.argmax(axis=1)[:, None], axis=1)[:, 0]  # first largest |x|, with its sign
    big = np.where(zero, F32(1), big)

    def trial(iscale):
        q = IQ4NL_LEVELS[best_index(iscale[:, None] * X)]
        wq = weight * q
        return _seqsum(wq * X), _seqsum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        d = -big / IQ4NL_LEVELS[0]
        sumqx, sumq2 = trial(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-IQ4NL_NTRY, IQ4NL_NTRY + 1):
            sumqx, sumq2 = trial(F32(itry + KVALUES_IQ4NL[0]) / big)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(F32)
            best = np.where(better, d * sumqx, best)
        d = np.where(zero, F32(0), d)
        iscale = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    codes = best_index(iscale[:, None] * X)
    return QuantBlocks(codes.reshape(rows, cols), d.astype(np.float16).reshape(rows, cols // QK), None)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool = False):
    """ggml-quants.c make_qkx2_quants over rows of x: (L, scale, the_min)."""
    err = np.abs if use_mad else np.square
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
        best = _seqsum(weights * err(diff))
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
            cur = _seqsum(weights * err(diff))
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale).astype(F32)
    return L, scale, (-mn).astype(F32)


def _make_q3_quants(x: np.ndarray, nmax: int = 4):
    """ggml-quants.c make_q3_quants with do_rmse over rows of x (sub-blocks of 16): (L = l + nmax, scale).
    Up to 5 sweeps, each moving one value at a time to the level that best improves the weighted fit
    (weights x^2); a sweep that changes nothing changes nothing the next time, so all rows run every sweep."""
    ax = np.abs(x)
    zero = ax.max(axis=1) < GROUP_MAX_EPS
    big = np.take_along_axis(x, ax.argmax(axis=1)[:, None], axis=1)[:, 0]
    big = np.where(zero, F32(1), big)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / big
        L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = L.astype(F32)
        wx = w * x
        sumlx, suml2 = _seqsum(wx * lf), _seqsum(w * lf * lf)
        for _ in range(5):
            for i in range(x.shape[1]):
                li, xi, wi = L[:, i].astype(F32), x[:, i], w[:, i]
                slx0 = sumlx - wi * xi * li
                sl20 = suml2 - wi * li * li
                pos = slx0 > 0
                new = np.clip(_nearest_int(np.where(pos, xi * sl20 / slx0, F32(0))), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx = slx0 + wi * xi * nf
                sl2 = sl20 + wi * nf * nf
                take = pos & (new != L[:, i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[:, i] = np.where(take, new, L[:, i])
                sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero[:, None], 0, L + nmax), np.where(zero, F32(0), scale)


def quantize_q3_k(w: np.ndarray) -> QuantBlocks:
    """quantize_row_q3_K_ref: make_q3_quants per sub-block of 16, 6-bit signed sub-block scales under
    d = max_scale / -32, codes recomputed from the stored scales (3 bits, offset 4)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    L, scales = _make_q3_quants(x)
    scales = scales.reshape(-1, 16)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)[:, 0]
    off = max_scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / np.where(off, F32(1), max_scale)
        sc = np.clip(_nearest_int(iscale[:, None] * scales), -32, 31)
        sc = np.where(off[:, None], -32, sc)  # scale bytes left at zero: stored 0 reads as -32
        d = np.where(off, F32(0), F32(1) / iscale).astype(np.float16)
        dj = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
        l2 = np.clip(_nearest_int(x / dj[:, None]), -4, 3) + 4
    L = np.where(dj[:, None] != 0, l2, L)
    nb = cols // QK_K
    return QuantBlocks(L.reshape(rows, cols), sc.astype(np.int8).reshape(rows, nb * 16), None, d.reshape(rows, nb))


def quantize_q2_k(w: np.ndarray) -> QuantBlocks:
    """quantize_row_q2_K_ref: make_qkx2_quants (weights |x|, rmin -0.5, rdelta 0.1, 15 steps, absolute error) per
    sub-block of 16, 4-bit scales and mins under d = max_scale / 15 and dmin = max_min / 15, codes recomputed from
    the stored scales and mins (2 bits)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    L, scales, mins = _make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale[:, None] > 0, _nearest_int((F32(15) / max_scale)[:, None] * scales), 0) & 0xFF
        lm = np.where(max_min[:, None] > 0, _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
        byte = ls | ((lm << 4) & 0xFF)  # y->scales[j] = l, then |= l << 4, in uint8
        d = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(np.float16)
        dmin = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(np.float16)
        dj = (d.astype(F32)[:, None] * (byte & 0xF).astype(F32)).reshape(-1)
        dm = (dmin.astype(F32)[:, None] * (byte >> 4).astype(F32)).reshape(-1)
        l2 = np.clip(_nearest_int((x + dm[:, None]) / dj[:, None]), 0, 3)
    L = np.where(dj[:, None] != 0, l2, L)
    nb = cols // QK_K
    return QuantBlocks(L.reshape(rows, cols), (byte & 0xF).reshape(rows, nb * 16), (byte >> 4).reshape(rows, nb * 16),
                       d.reshape(rows, nb), dmin.reshape(rows, nb))
