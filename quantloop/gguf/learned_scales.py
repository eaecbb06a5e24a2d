"""Learned block scales on a GGUF block-32 grid with fixed levels (LSQ / ParetoQ / DWQ style), in torch.

A block of 32 weights stores one fp16 scale d and 32 codes; each value is d * L[code] for the type's
levels L (Q4_0: -8..7, Q5_0: -16..15, Q8_0: -128..127, IQ4_NL: llama.cpp's 16 non-uniform values).
Here d is a trainable number per block next to the latent weights: the forward rounds d to fp16, takes
for each weight the nearest level of w / d, and returns d * L[code] in float32, which is exactly what
llama.cpp dequantizes from the stored block. Gradients: the weights pass straight through where they lie
inside the block's range (zero where the range clips them); d gets LSQ's gradient, L[code] - w/d inside
the range and L[code] outside. d is parametrized as d0 * exp(s) with s trainable, so it keeps its sign
and never crosses zero.

Public: LEVELS_TYPES, has_levels, type_levels, LearnedScales.
"""

from __future__ import annotations

import numpy as np
import torch

from quantloop.gguf import blocks as gb
from quantloop.gguf.block_types import QK, TYPES

BLOCK = 32


# uniform symmetric block-32 types: levels in code order and the code of the first level (a code is the level's
# index plus that offset); non-uniform types (IQ4_NL, any block-32 type whose BlockType lists `levels`) store the index
_UNIFORM = {"Q4_0": (tuple(range(-8, 8)), 0), "Q5_0": (tuple(range(-16, 16)), 0), "Q8_0": (tuple(range(-128, 128)), -128)}


def _levels(gguf_type: str) -> tuple[tuple, int] | None:
    t = str(gguf_type).upper()
    if t in _UNIFORM:
        return _UNIFORM[t]
    bt = TYPES.get(t)
    levels = getattr(bt, "levels", None)
    if bt is not None and levels is not None and bt.block == QK and bt.symmetric and not bt.kquant:
        return tuple(levels), 0
    return None


LEVELS_TYPES = tuple(t for t in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL") if _levels(t) is not None)


def has_levels(gguf_type: str) -> bool:
    """Whether a type is block-32 with one scale and fixed levels, so its scales can be learned here."""
    return _levels(gguf_type) is not None


def type_levels(gguf_type: str) -> tuple[torch.Tensor, int]:
    """(levels as a sorted float32 tensor, code offset): the stored code of level i is i + offset."""
    found = _levels(gguf_type)
    if found is None:
        raise ValueError(f"{gguf_type} is not a block-32 type with fixed levels")
    lv = torch.tensor(found[0], dtype=torch.float32)
    if not bool((lv[1:] > lv[:-1]).all()):
        raise ValueError(f"{gguf_type}: levels must be sorted in code order")
    return lv, found[1]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _scaled(w: torch.Tensor, d16: torch.Tensor) -> torch.Tensor:
    """w / d per block of 32 (as w * (1 / d); 0 where d is 0), shape (rows, blocks, 32), float32."""
    rows, cols = w.shape
    inv = torch.where(d16 == 0, torch.zeros((), device=d16.device), 1 / d16)[..., None]
    return w.detach().float().reshape(rows, cols // BLOCK, BLOCK) * inv


def _level_of(x: torch.Tensor, levels: torch.Tensor, mids: torch.Tensor | None) -> torch.Tensor:
    """The nearest level of each x (float32 level values). Uniform integer levels (mids None): round and clip,
    about 30 times faster than a search; others: a search over the midpoints (ties to the lower level)."""
    if mids is None:
        return x.round().clamp_(float(levels[0]), float(levels[-1]))
    return levels[torch.bucketize(x, mids)]


class _LearnedRound(torch.autograd.Function):
    """value = d16 * L(w / d16) per block; backward: LSQ (see the module docstring). Saves w and d only."""

    @staticmethod
    def forward(ctx, w, d, levels, mids):
        d16 = _fp16(d.detach().float())
        value = _level_of(_scaled(w, d16), levels, mids) * d16[..., None]
        ctx.save_for_backward(w, d16, levels, mids if mids is not None else levels[:0])
        ctx.uniform = mids is None
        return value.reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, d16, levels, mids = ctx.saved_tensors
        x = _scaled(w, d16)
        lv = _level_of(x, levels, None if ctx.uniform else mids)
        inside = ((x >= levels[0]) & (x <= levels[-1])).float()
        g = grad.float().reshape(x.shape)
        grad_w = g * inside
        grad_d = (g * (lv - x * inside)).sum(-1)
        return grad_w.reshape(grad.shape).to(grad.dtype), grad_d, None, None


class LearnedScales(torch.nn.Module):
    """The trainable fp16 block scales of one (rows, cols) weight on a level type's grid.

    `d0` (rows, cols // 32) are the starting scales (llama.cpp's rounding, or GPTQ's); `log_scale`
    is the trainable parameter (d = d0 * exp(log_scale)). Call it with the latent weight to get the
    value the GGUF will store; `blocks(w)` gives the (codes, fp16 d) the export writes."""

    def __init__(self, d0: torch.Tensor, gguf_type: str):
        super().__init__()
        self.gguf_type = str(gguf_type).upper()
        lv, self.code_offset = type_levels(self.gguf_type)
        self.register_buffer("levels", lv.to(d0.device), persistent=False)
        uniform = bool((lv[1:] - lv[:-1] == 1).all()) and bool((lv == lv.round()).all())
        self.register_buffer("mids", None if uniform else ((lv[1:] + lv[:-1]) / 2).to(d0.device), persistent=False)
        self.register_buffer("d0", _fp16(d0.detach().float()), persistent=False)
        self.log_scale = torch.nn.Parameter(torch.zeros_like(self.d0))

    @classmethod
    def from_weight(cls, w: torch.Tensor, gguf_type: str) -> LearnedScales:
        """Start from llama.cpp's own scales for w where quantloop's grid module rounds the type (Q4_0: d =
        x[argmax|x|] / -8), else from the block's largest magnitude on the type's extreme level."""
        t = str(gguf_type).upper()
        if t in gb.TYPES:
            qb = gb.quantize_blocks(w.detach().float().cpu().numpy(), t)
            return cls(torch.from_numpy(qb.scales.astype("float32")).to(w.device), t)
        rows, cols = w.shape
        x = w.detach().float().reshape(rows, cols // BLOCK, BLOCK)
        lv, _ = type_levels(t)
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        return cls(peak / float(lv[0]), t)

    def scales(self) -> torch.Tensor:
        """The block scales as float32 numbers, before fp16 rounding."""
        return self.d0 * torch.exp(self.log_scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _LearnedRound.apply(w, self.scales(), self.levels, self.mids)

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        return _LearnedRound.apply(w, self.scales(), self.levels, self.mids)

    @torch.no_grad()
    def blocks(self, w: torch.Tensor):
        """(codes, fp16 scales) as the GGUF stores them: codes (rows, cols) int, scales (rows, cols // 32) float16."""
        d16 = _fp16(self.scales().float())
        lv = _level_of(_scaled(w, d16), self.levels, self.mids)
        idx = torch.searchsorted(self.levels, lv.reshape(-1).contiguous()).reshape(w.shape)  # lv is one of the levels
        codes = (idx + self.code_offset).cpu().numpy().astype(np.int64)
        return codes, d16.cpu().numpy().astype(np.float16)
