"""The student's quantized weights during QAT: every linear, the token embedding and the output head on
the GGUF grid the file will hold, trained through a straight-through estimator.

GridWeight is one trainable weight on one type's grid: level types (Q4_0, Q5_0, Q8_0, IQ4_NL, any
block-32 type quantloop.gguf.learned_scales knows) can learn their fp16 block scales next to the weights
(or keep scales given at the start, GPTQ's); other block-32 types follow llama.cpp's own rounding of the
latent weights at every step; k-quants round onto a sub-block grid frozen from llama.cpp's rounding when
the weight is switched on, and are re-rounded by llama.cpp at the end (what the GGUF holds).

In a tied model the one token embedding is both the lookup table and the output projection: the lookup
and the head use the same fake-quantized matrix, computed once per forward pass, and both train it.

Public: GridWeight, FakeQuantLinear, wrap_student, unwrap_student, grid_copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

from quantloop.gguf import blocks as gb
from quantloop.gguf.learned_scales import LearnedScales, has_levels
from quantloop.gguf.tensor_names import gguf_tensor_name, linear_modules
from quantloop.gguf.torch_grid import (
    KQUANTS,
    fake_quantize_torch,
    kquant_grid,
    layer_type,
    linear_types,
    ste_fake_quantize,
)


class GridWeight(torch.nn.Module):
    """A latent float weight and the grid it is fake-quantized onto when `enabled`.

    scales: LearnedScales for a level type when its block scales are learned or given (start_scales),
    else None (the type's own rounding at every step)."""

    def __init__(self, weight: torch.nn.Parameter, gguf_type: str, learn_scales: bool = False,
                 start_scales: torch.Tensor | None = None, enabled: bool = False):
        super().__init__()
        self.weight = weight
        self.gguf_type = layer_type(gguf_type, weight.shape[1])
        self.grid = None  # k-quants: (step, offset) frozen while the weight trains
        self.scales = None
        if has_levels(self.gguf_type) and (learn_scales or start_scales is not None):
            self.scales = LearnedScales(start_scales.to(weight.device), self.gguf_type) if start_scales is not None \
                else LearnedScales.from_weight(weight, self.gguf_type)
            self.scales.log_scale.requires_grad_(bool(learn_scales))
        self.enabled = False
        self.set_enabled(enabled)

    def set_enabled(self, on: bool) -> None:
        if on and not self.enabled and self.gguf_type in KQUANTS:
            self.grid = kquant_grid(self.weight, self.gguf_type)  # llama.cpp's rounding of the weight now
        self.enabled = on

    def forward(self) -> torch.Tensor:
        if not self.enabled:
            return self.weight
        if self.scales is not None:
            return self.scales(self.weight)
        return ste_fake_quantize(self.weight, self.gguf_type, self.grid)

    @torch.no_grad()
    def quantized(self) -> torch.Tensor:
        """The weight as the GGUF stores it (k-quants: llama.cpp's own rounding of the trained weight)."""
        w = self.weight
        if self.scales is not None:
            return self.scales.quantized(w)
        if self.gguf_type in KQUANTS:
            return torch.from_numpy(gb.fake_quantize(w.detach().float().cpu().numpy(), self.gguf_type)).to(w.device, w.dtype)
        return fake_quantize_torch(w, self.gguf_type)

    @torch.no_grad()
    def blocks(self):
        """(type, QuantBlocks) the GGUF holds for this weight, in the checkpoint's row order."""
        if self.scales is not None:
            codes, d = self.scales.blocks(self.weight)
            return self.gguf_type, gb.QuantBlocks(codes, d, None)
        return self.gguf_type, gb.quantize_blocks(self.weight.detach().float().cpu().numpy(), self.gguf_type)


class FakeQuantLinear(torch.nn.Module):
    """Wraps an nn.Linear; when enabled, its weight is fake-quantized (straight-through) in the forward pass."""

    def __init__(self, linear: torch.nn.Linear, gguf_type: str, learn_scales: bool = False,
                 start_scales: torch.Tensor | None = None):
        super().__init__()
        self.linear = linear
        self.grid_weight = GridWeight(linear.weight, gguf_type, learn_scales, start_scales)

    @property
    def gguf_type(self) -> str:
        return self.grid_weight.gguf_type

    def set_enabled(self, on: bool) -> None:
        self.grid_weight.set_enabled(on)

    def forward(self, x):
        return F.linear(x, self.grid_weight(), self.linear.bias)


class FakeQuantEmbedding(torch.nn.Module):
    """The token embedding on its grid; keeps the fake-quantized matrix of this forward pass for a tied head."""

    def __init__(self, embedding: torch.nn.Embedding, grid_weight: GridWeight):
        super().__init__()
        self.embedding = embedding
        self.grid_weight = grid_weight
        self.current = None

    def forward(self, ids):
        self.current = self.grid_weight()
        # the module's own forward with the quantized matrix (keeps e.g. Gemma's scaled lookup)
        return functional_call(self.embedding, {"weight": self.current}, (ids,))


class FakeQuantHead(torch.nn.Module):
    """The output projection: the embedding's matrix of this forward pass (tied) or its own GridWeight."""

    def __init__(self, head: torch.nn.Linear, tied_to: FakeQuantEmbedding | None, grid_weight: GridWeight | None):
        super().__init__()
        self.head, self.tied_to, self.grid_weight = head, tied_to, grid_weight

    def forward(self, h):
        w = self.tied_to.current if self.tied_to is not None else self.grid_weight()
        return functional_call(self.head, {"weight": w}, (h,))


def _set(model, name: str, module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def wrap_student(model, gguf_type: str, tensor_types: dict[str, str] | None = None, embedding_type: str | None = None,
                 learn_scales: bool = False, start_scales: dict[str, torch.Tensor] | None = None) -> dict[str, GridWeight]:
    """Put every quantized linear (and, with a block `embedding_type`, the token embedding and output head) of
    `model` behind its fake quantizer, in place. Returns GGUF tensor name -> GridWeight; the embedding's is
    enabled from the start, the linears' are switched on by the caller. start_scales: GGUF name -> fp16 block
    scales (GPTQ's) to start from."""
    start_scales = start_scales or {}
    grids: dict[str, GridWeight] = {}
    types = linear_types(model, gguf_type, tensor_types)
    for name, lin in linear_modules(model):
        g = gguf_tensor_name(name)
        fq = FakeQuantLinear(lin, types[name], learn_scales, start_scales.get(g))
        _set(model, name, fq)
        grids[g] = fq.grid_weight
    if embedding_type is None or embedding_type in ("F16", "F32"):
        return grids
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_grid = GridWeight(emb.weight, embedding_type, learn_scales, start_scales.get("token_embd.weight"), enabled=True)
    fq_emb = FakeQuantEmbedding(emb, emb_grid)
    grids["token_embd.weight"] = emb_grid
    head_name = _module_name(model, head) if head is not None else None
    _set(model, _module_name(model, emb), fq_emb)
    if head is not None:
        if head.weight is emb.weight:
            _set(model, head_name, FakeQuantHead(head, fq_emb, None))
        else:
            out_grid = GridWeight(head.weight, embedding_type, learn_scales, start_scales.get("output.weight"), enabled=True)
            _set(model, head_name, FakeQuantHead(head, None, out_grid))
            grids["output.weight"] = out_grid
    return grids


def grid_copy(model):
    """A copy of a wrapped student as the GGUF would hold it now (plain modules, weights on the grid) and its blocks;
    the student itself is left as it is."""
    for m in model.modules():
        if isinstance(m, FakeQuantEmbedding):
            m.current = None  # a tensor of the last forward pass's graph, which cannot be copied
    frozen = copy.deepcopy(model).eval()
    return frozen, unwrap_student(frozen)


def unwrap_student(model) -> dict:
    """Put the plain modules back, their weights replaced by the values the GGUF holds (exactly on the grid).
    Returns the blocks the export writes: GGUF tensor name -> (type, QuantBlocks)."""
    blocks = {}
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantHead))]
    with torch.no_grad():
        for name, m in swaps:
            if isinstance(m, FakeQuantLinear):
                blocks[gguf_tensor_name(name)] = m.grid_weight.blocks()
                m.linear.weight.copy_(m.grid_weight.quantized())
                _set(model, name, m.linear)
            elif isinstance(m, FakeQuantEmbedding):
                blocks["token_embd.weight"] = m.grid_weight.blocks()
                m.embedding.weight.copy_(m.grid_weight.quantized())
                m.current = None
                _set(model, name, m.embedding)
            else:
                if m.grid_weight is not None:
                    blocks["output.weight"] = m.grid_weight.blocks()
                    m.head.weight.copy_(m.grid_weight.quantized())
                _set(model, name, m.head)
    return blocks
