"""The GGUF grids in torch, for the quantizers that train or solve on them (QAT, GPTQ on the grid).

fake_quantize_torch(w, type) is llama.cpp's own rounding of a block-32 type (quantize_row_<type>_ref, as
gguf-py ports it) bit for bit in torch: same block scale choice, same float32 arithmetic for the codes,
fp16-rounded scales and offsets; it equals quantloop.gguf.blocks.fake_quantize. K-quants (Q4_K, Q5_K,
Q6_K, Q3_K, Q2_K) have a scale search that is not differentiable: kquant_grid takes the sub-block steps and offsets of
llama.cpp's rounding of a weight, and kquant_fake_quantize rounds onto that frozen grid.

Grids (block of 32 values, d and m fp16):
  Q4_0  d = x[argmax|x|] / -8,  q = trunc(x/d + 8.5)  clipped 0..15,  w = d*(q - 8)
  Q5_0  d = x[argmax|x|] / -16, q = trunc(x/d + 16.5) clipped 0..31,  w = d*(q - 16)
  Q4_1  d = (max - min)/15, m = min, q = trunc((x - m)/d + 0.5) clipped 0..15, w = d*q + m
  Q5_1  the same with 31 levels
  Q8_0  d = max|x| / 127, q = roundf(x/d) (half away from zero),  w = d*q
  IQ4_NL  d searched by weighted least squares over 16 trial scales (quantize_iq4_nl), q = the level of
        KVALUES_IQ4NL nearest x/d,  w = d*levels[q]
"""

from __future__ import annotations

import re

import numpy as np
import torch

from quantloop.errors import InputError
from quantloop.gguf import blocks as gb
from quantloop.gguf.block_types import GROUP_MAX_EPS, KVALUES_IQ4NL
from quantloop.gguf.blocks import fallback_type, gguf_type_for_layout
from quantloop.gguf.tensor_names import gguf_tensor_name, linear_modules

BLOCK = 32
QAT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")


def check_grid_type(gguf_type: str | None = None, bits: int | None = None, symmetric: bool = True, who: str = "QAT") -> str:
    """The GGUF type a torch quantizer (QAT, GPTQ on the grid) aims at, from a type name or (bits, symmetric);
    InputError otherwise."""
    if gguf_type is None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise InputError(None, f"{who} bits must be an integer from 2 to 8, not {bits!r}", "use 4, 5 or 8")

        t = gguf_type_for_layout(bits, BLOCK, symmetric)
        if t is None:
            kind = "symmetric" if symmetric else "asymmetric"
            raise InputError(None, f"no block-32 GGUF type holds {bits}-bit {kind} weights",
                             f"{who} supports Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (4/5-bit either way, 8-bit symmetric)")
        return t
    t = str(gguf_type).upper()
    if t in QAT_TYPES or t in KQUANTS:
        return t
    raise InputError(None, f"{who} cannot aim at GGUF type '{gguf_type}'", f"use one of {', '.join(QAT_TYPES + KQUANTS)}")


def layer_type(gguf_type: str, width: int) -> str:
    """The type a linear of input width `width` gets: k-quants fall back where 256 does not divide the rows."""
    return fallback_type(gguf_type, width) if gguf_type in KQUANTS else gguf_type


def kquant_grid(w: torch.Tensor, gguf_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sub-block steps and offsets of llama.cpp's k-quant rounding of w: value = step * q - offset.

    Q4_K/Q5_K: sub-blocks of 32, step = d * scale, offset = dmin * min (float32, as dequantize_row_q4_K).
    Q2_K: the same on sub-blocks of 16 (q from 0 to 3).
    Q6_K, Q3_K: sub-blocks of 16, step = d * scale, no offset (q from -32 to 31, -4 to 3)."""
    rows, cols = w.shape
    qb = gb.quantize_blocks(w.detach().float().cpu().numpy(), gguf_type)
    ns = gb.QK_K // gb.block_type(gguf_type).sub
    d = qb.d.astype(np.float32).reshape(rows, -1, 1)
    step = (d * qb.scales.reshape(rows, -1, ns).astype(np.float32)).reshape(rows, -1)
    off = None
    if qb.dmin is not None:
        dmin = qb.dmin.astype(np.float32).reshape(rows, -1, 1)
        off = torch.from_numpy((dmin * qb.mins.reshape(rows, -1, ns).astype(np.float32)).reshape(rows, -1)).to(w.device)
    return torch.from_numpy(step).to(w.device), off


def kquant_fake_quantize(w: torch.Tensor, gguf_type: str, step: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
    """w rounded to the nearest point of a frozen k-quant grid (kquant_grid), in float32."""
    rows, cols = w.shape
    x = w.detach().float().reshape(rows, step.shape[1], -1)
    s = step[..., None]
    safe = torch.where(s == 0, torch.ones((), device=x.device), s)  # a zero step holds only its offset
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[gguf_type]
    if off is None:  # Q6_K, Q3_K
        y = s * torch.clamp(torch.round(x / safe), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        o = off[..., None]
        y = s * torch.clamp(torch.round((x + o) / safe), 0, 2**bits - 1) - o
    return y.reshape(rows, cols).to(w.dtype)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """gguf-py np_roundf: round half away from zero, with its exact float32 steps."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def fake_quantize_torch(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """The grid point llama.cpp stores for a (rows, cols) weight: equals gguf_blocks.fake_quantize(w, type).

    Computed in float32 (result in w's dtype), no gradient tracking of its own (see ste_fake_quantize).
    """
    t = check_grid_type(gguf_type)
    if t in KQUANTS:
        raise InputError(None, f"{t} is a k-quant: its grid comes from kquant_grid", "use kquant_fake_quantize")
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise InputError(None, f"{t}: expected a 2-D weight with a multiple of {BLOCK} columns, got {tuple(w.shape)}")
    rows, cols = w.shape
    x = w.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if t == "IQ4_NL":
        deq = _iq4_nl(x)
    elif t == "Q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, zero, 1 / d)
        q = _roundf(x * inv)
        deq = d.half().float() * q
    elif t in ("Q4_0", "Q5_0"):
        half = 8 if t == "Q4_0" else 16
        idx = x.abs().argmax(dim=-1, keepdim=True)
        d = x.gather(-1, idx) / -half
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.clamp(torch.trunc(x * inv + (half + 0.5)), 0, 2 * half - 1)
        deq = d.half().float() * (q - half)
    else:  # Q4_1, Q5_1
        levels = 15 if t == "Q4_1" else 31
        mx, mn = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
        d = (mx - mn) / levels
        inv = torch.where(d == 0, zero, 1 / d)
        q = torch.clamp(torch.trunc((x - mn) * inv + 0.5), 0, levels)
        deq = d.half().float() * q + mn.half().float()
    return deq.reshape(rows, cols).to(w.dtype)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sums over the last axis accumulated left to right in float32, as a C loop does."""
    acc = t[..., 0].clone()
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    """IQ4_NL blocks (..., 32) as quantize_iq4_nl rounds them (rounding_lowbit.quantize_iq4_nl), dequantized."""
    levels = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    f32 = lambda v: torch.full((), v, dtype=torch.float32, device=x.device)  # noqa: E731

    mids = (levels[:-1] + levels[1:]) / 2  # exact: half-integers

    def nearest(v):  # best_index_int8: x - lo < hi - x is exact near each midpoint, so it is x < mid
        return torch.bucketize(v, mids, right=True)

    def trial(iscale):
        q = levels[nearest(iscale[..., None] * x)]
        wq = weight * q
        return _seqsum(wq * x), _seqsum(wq * q)

    weight = x * x
    ax = x.abs()
    zero = ax.amax(dim=-1) < float(GROUP_MAX_EPS)
    big = torch.where(zero, f32(1), x.gather(-1, ax.argmax(dim=-1, keepdim=True))[..., 0])
    d = -big / levels[0]
    sumqx, sumq2 = trial(f32(1) / d)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, f32(1)), f32(0))
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = trial(torch.full_like(big, itry + KVALUES_IQ4NL[0]) / big)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(sumq2 > 0, sumq2, f32(1)), d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, f32(0), d)
    iscale = torch.where(d != 0, f32(1) / torch.where(d != 0, d, f32(1)), f32(0))
    return d.half().float()[..., None] * levels[nearest(iscale[..., None] * x)]


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, gguf_type, grid=None):
        return fake_quantize_torch(w, gguf_type) if grid is None else kquant_fake_quantize(w, gguf_type, *grid)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def ste_fake_quantize(w: torch.Tensor, gguf_type: str, grid=None) -> torch.Tensor:
    """Forward: exactly fake_quantize_torch(w) (k-quants: kquant_fake_quantize on the frozen `grid`);
    backward: the identity (straight-through estimator).

    (Not w + (fq(w) - w).detach(): that differs from fq(w) by float rounding, so the student would
    train slightly off the grid it exports.)"""
    return _STE.apply(w, gguf_type, grid)


def check_grid_model(model, gguf_type: str, where=None, who: str = "QAT") -> list[str]:
    """The names of the linears a torch quantizer quantizes; InputError naming the first layer the block does not divide."""
    lins = linear_modules(model)
    if not lins:
        raise InputError(where, "model has no q/k/v/o/gate/up/down_proj linear layers", f"{who} supports Llama-style models")
    for name, m in lins:
        width = m.weight.shape[1]
        if width % BLOCK:
            raise InputError(where, f"layer {name}: the {gguf_type} block of {BLOCK} does not divide its input width {width}",
                             "quantize this architecture with a type whose block divides every linear width")
    return [n for n, _ in lins]


def linear_types(model, gguf_type: str, tensor_types: dict[str, str] | None = None) -> dict[str, str]:
    """The GGUF type each quantized linear trains for: the first tensor_types pattern matching its llama.cpp
    name, else gguf_type."""
    rules = [(re.compile(p), check_grid_type(t)) for p, t in (tensor_types or {}).items()]
    return {name: next((t for rx, t in rules if rx.search(gguf_tensor_name(name))), gguf_type) for name, _ in linear_modules(model)}
