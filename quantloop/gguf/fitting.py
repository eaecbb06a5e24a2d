"""Recover the codes and scales of a float weight that already sits on a type's grid (fit_blocks), or refuse
it with the worst deviation (OffGridError)."""

from __future__ import annotations

import numpy as np

from quantloop.gguf.block_types import (
    F32,
    KQUANT_RANGES,
    QK,
    QK_K,
    BlockType,
    OffGridError,
    QuantBlocks,
    _matrix,
    block_type,
)
from quantloop.gguf.packing import dequantize, pack
from quantloop.gguf.rounding import _concat, _row_chunks, quantize_blocks

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
    if bt.levels:
        return _rdev(X, df * np.asarray(bt.levels, F32)[q])
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
    if bt.levels:
        yield from _search_levels(X, bt, rtol)
        return
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


def _search_levels(X: np.ndarray, bt: BlockType, rtol: float):
    """`_search32` for IQ4_NL: the largest |x| is d*level for one of the 16 levels (largest first); every other
    value then goes to its nearest level."""
    levels = np.asarray(bt.levels, F32)
    big = np.take_along_axis(X, np.abs(X).argmax(axis=1)[:, None], axis=1)[:, 0]
    left = np.arange(X.shape[0])
    for k in sorted(levels, key=lambda v: -abs(v)):
        if left.size == 0:
            return
        x = X[left]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            d = (big[left] / k).astype(np.float16)
            q = np.abs(x[:, :, None] - d.astype(F32)[:, None, None] * levels).argmin(axis=2)
            e = _rdev32(x, q, d, None, bt)
        ok = np.isfinite(d) & (e <= rtol)
        if ok.any():
            yield q[ok], d[ok], None, e[ok], left[ok]
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


def _rdevk(X, q, d, sc, dmin, mn, half: int = 32):
    """`_rdev` of k-quant sub-blocks (rows), dequantized as dequantize_row_q{4,5,6}_K does."""
    D = (d * sc.astype(F32))[..., None]
    if mn is None:
        return _rdev(X, D * (q.astype(F32) - half))
    return _rdev(X, D * q.astype(F32) - (dmin * mn.astype(F32))[..., None])


def _fit_k(w, qb, bt, rtol):
    """K-quants: llama.cpp's rounding, then searches for the sub-blocks and super-blocks it misses."""
    n = bt.sub
    per = QK_K // n
    X = w.reshape(-1, n)
    codes, sc = qb.codes.reshape(-1, n).astype(np.int64), qb.scales.reshape(-1).astype(np.int64)
    mn = None if qb.mins is None else qb.mins.reshape(-1).astype(np.int64)
    d, dmin = qb.d.reshape(-1).copy(), None if qb.dmin is None else qb.dmin.reshape(-1).copy()
    dsub = np.repeat(d.astype(F32), per)
    msub = None if dmin is None else np.repeat(dmin.astype(F32), per)
    rdev = _rdevk(X, codes, dsub, sc, msub, mn, 2 ** (bt.bits - 1))

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
        if fit is not None and (fit[5] <= rtol).sum() > (rdev[rows] <= rtol).sum():
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
    smin, smax, mmax = KQUANT_RANGES[bt.name]
    half = 2 ** (bt.bits - 1)
    cands = range(smin, smax + 1) if dmin is None else range(smax + 1)
    for s in sorted(cands, key=lambda v: (v == 0, -abs(v))):
        if left.size == 0:
            break
        x, D = X[left], d[left] * F32(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            if dmin is None:
                q = np.nan_to_num(np.clip(np.rint(x / D[:, None]), -half, half - 1)).astype(np.int64) + half
                m = np.zeros(left.size, np.int64)
            else:  # w = D*q - dmin*m: the lowest value is D*t - dmin*m for some code t; take the best (t, m)
                dm, lo = dmin[left][:, None], x.min(axis=1)[:, None]
                M = D[:, None] * np.arange(nmax + 1, dtype=F32) - lo
                m = np.rint(M / dm)
                err = np.where((m >= 0) & (m <= mmax), np.abs(M - dm * m), np.inf)
                m = np.nan_to_num(np.take_along_axis(m, err.argmin(axis=1)[:, None], axis=1)[:, 0]).astype(np.int64)
                q = np.clip(np.rint((x + (dm[:, 0] * m.astype(F32))[:, None]) / D[:, None]), 0, nmax)
                q = np.nan_to_num(q).astype(np.int64)
            e = _rdevk(x, q, d[left], np.full(left.size, s), None if dmin is None else dmin[left], None if dmin is None else m, half)
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
    its values, or None. Sub-blocks with no grid step of their own (off the grid) are left out of
    the rebuild and searched under its d and dmin (their rdev says whether they fit).

    Every sub-block's grid step is a multiple of d (d*sc_j, or more when its codes share a factor),
    so d is their gcd over a small integer, tried nearest llama.cpp's estimate d_hint first; each
    sc_j is then the largest that fits; dmin makes every sub-block minimum lo_j equal
    D_j*t - dmin*mn_j for integers t and mn_j in the type's range of mins.
    """
    nmax = 2**bt.bits - 1
    steps = np.array([_step(x, nmax, rel) for x in X])
    off = np.flatnonzero(np.isnan(steps))
    if off.size:  # rebuilt from the other sub-blocks; the off ones searched under its d and dmin
        fit = None if off.size == steps.size else _superblock_fit(np.delete(X, off, axis=0), bt, rtol, d_hint, rel)
        if fit is None:
            return None
        f = _search_k(X[off], np.full(off.size, fit[0], F32), None if fit[1] is None else np.full(off.size, fit[1], F32), bt, rtol)
        out = [np.zeros((steps.size, *a.shape[1:]), a.dtype) for a in fit[2:]]
        for o, a, b in zip(out, fit[2:], f):
            o[np.delete(np.arange(steps.size), off)], o[off] = a, b
        return (*fit[:2], *out)
    if not (steps > 0).any():
        return None
    smin, smax, mmax = KQUANT_RANGES[bt.name]
    smax = -smin if bt.symmetric else smax  # symmetric: |sc| up to -smin, both signs tried
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
        if bt.symmetric:  # w = D*(q - half): try both signs of each sub-block scale
            (q1, e1), (q2, e2) = _sym_try(X, d, sc, bt), _sym_try(X, d, -sc, bt)
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
        for dmin, mn in _dmin_candidates(X, D.astype(np.float64), nmax, rel, mmax):
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


def _sym_try(X, d, sc, bt):
    """Q6_K / Q3_K codes of sub-blocks X under d and signed sub-block scales sc: (codes, rdev)."""
    half, smax = 2 ** (bt.bits - 1), KQUANT_RANGES[bt.name][1]
    D = F32(d) * sc.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.nan_to_num(np.clip(np.rint(X / D[:, None]), -half, half - 1)).astype(np.int64) + half
    e = _rdevk(X, q, np.full(X.shape[0], d, F32), sc, None, None, half)
    return q, np.where(sc > smax, np.inf, e)  # Q6_K: int8 scales -128..127, Q3_K: -32..31


def _dmin_candidates(X, steps, nmax, rel, mmax: int = 63):
    """Yield (dmin, mn per sub-block), closest first, such that every sub-block minimum lo_k is
    D_k*t - dmin*mn_k with t in 0..nmax-span_k (a constant sub-block: lo_k = -dmin*mn_k)."""
    lo = X.min(axis=1).astype(np.float64)
    D = np.where(steps > 0, steps, 1.0)
    span = np.where(steps > 0, np.rint((X.max(axis=1) - lo) / D), 0)
    j = int(np.argmin(lo))  # the most negative minimum: dmin*mn_j = D_j*t - lo_j for some t and mn_j
    M = D[j] * np.arange(nmax - span[j] + 1) - lo[j] if steps[j] > 0 else np.array([-lo[j]])
    c = (M[M > 0][:, None] / np.arange(1, mmax + 1)).astype(np.float16).ravel()
    cands = np.unique(np.concatenate([[np.float16(0)], c[np.isfinite(c) & (c > 0)]]))
    alive = np.arange(cands.size)
    miss = np.zeros((cands.size, X.shape[0]))
    mn = np.zeros((cands.size, X.shape[0]), np.int64)
    scale = max(np.abs(lo).max(), 1e-30)
    for k in np.argsort(-np.abs(lo)):  # checking every sub-block in turn prunes the candidates fast
        v = cands[alive].astype(np.float64)[:, None] * np.arange(mmax + 1) + lo[k]  # = D_k * t
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
