"""GPTQ onto an exact GGUF grid: any block type (Q4_0 ... Q8_0, IQ4_NL and the k-quants Q2_K ... Q6_K) and any
precision map (mixed_precision), so a GPTQ-optimized model becomes a GGUF that holds its weights exactly.

GPTQModel writes its own integer layouts (a scale and zero per group), which hold Q4_0/Q8_0 but none of
llama.cpp's k-quants, whose super-blocks of 256 carry 6-bit sub-block scales under one fp16 d (and dmin);
no library runs GPTQ's error compensation on that grid. This module does, by hand:

- GPTQ as in Frantar et al. (2022): per linear, H = X^T X from the layer's calibration inputs, dampened,
  the upper Cholesky factor of H^-1, columns quantized left to right in lazy batches, each column's
  rounding error spread over the columns not yet quantized;
- the rounding is to the GGUF grid of the column's block: when the column loop reaches a block (32
  columns; k-quants: a super-block of 256), its grid is fixed by llama.cpp's own rounding of the weights
  as GPTQ has updated them so far (gguf_blocks.quantize_blocks: d, m, dmin, sub-block scales), and
  every column of the block then goes to the nearest level of that grid. Every block is thus one that
  llama.cpp can store; the export writes GPTQ's own codes and scales (export_gguf checks that they
  dequantize to the checkpoint's weights, row for row);
- decoder layers in order: layer i is calibrated on the outputs of layers 0..i-1 already quantized.

Rows a k-quant super-block does not divide get llama.cpp's fallback type (Q4_K -> Q5_0, ...), as
llama-quantize does. Public: grid_gptq_weight, gptq_gguf_checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantloop.backends.base import Backend, BackendJob, BackendOutput, save_and_export
from quantloop.errors import InputError
from quantloop.gguf import blocks as gb
from quantloop.gguf.block_types import FLOAT_TYPES
from quantloop.gguf.export import export_note, llama_embedding_type, planned_export_types
from quantloop.gguf.precision_map import plan_precision_map
from quantloop.gguf.tensor_names import gguf_tensor_name
from quantloop.gguf.torch_grid import check_grid_model, check_grid_type, layer_type, linear_types
from quantloop.models.checkpoints import load_hf_model

DAMP = 0.01  # H += DAMP * mean(diag H) * I, GPTQ's default


class _Grid:
    """The levels of one block of columns: value = step * (q - zero) + base, q in lo..hi; step and base per
    (row, sub-block). Non-uniform types (IQ4_NL): value = d * levels[q], the nearest of the 16 levels."""

    def __init__(self, w: torch.Tensor, type_name: str):
        bt = gb.block_type(type_name)
        qb = gb.quantize_blocks(w.detach().float().cpu().numpy(), type_name)
        rows = w.shape[0]
        self.blocks = qb._replace(codes=None)  # the scales GPTQ's codes are stored with
        f = lambda a: torch.from_numpy(a.astype("float32")).reshape(rows, -1)  # noqa: E731
        self.sub = bt.sub if bt.kquant else bt.block
        self.lo, self.hi = (-128, 127) if bt.bits == 8 else (0, 2**bt.bits - 1)
        self.levels = None
        if bt.levels:  # (rows, block, level): every value the block can hold
            self.levels = f(qb.scales)[:, :, None] * torch.tensor(bt.levels, dtype=torch.float32)
        elif bt.kquant:  # value = d * sc * q - dmin * mn (Q6_K, Q3_K: d * sc * (q - 32), d * sc * (q - 4))
            sc, d = f(qb.scales), f(qb.d)
            per = sc.shape[1] // d.shape[1]
            self.step = d.repeat_interleave(per, dim=1) * sc
            self.zero = 2 ** (bt.bits - 1) if bt.symmetric else 0
            self.base = torch.zeros_like(self.step) if qb.mins is None else \
                -(f(qb.dmin).repeat_interleave(per, dim=1) * f(qb.mins))
        else:
            self.step = f(qb.scales)
            self.zero = 0 if bt.bits == 8 or not bt.symmetric else 2 ** (bt.bits - 1)
            self.base = torch.zeros_like(self.step) if qb.mins is None else f(qb.mins)

    def round(self, x: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column j of the block (a [rows] vector) on its nearest level: (values, stored codes)."""
        g = j // self.sub
        if self.levels is not None:
            vals = self.levels[:, g]
            q = (x[:, None] - vals).abs().argmin(dim=1)
            q = torch.where(vals[:, 0] == 0, 8, q)  # d = 0: code 8 (level 1) holds +0.0
            return vals.gather(1, q[:, None])[:, 0], q
        step, base = self.step[:, g], self.base[:, g]
        safe = torch.where(step == 0, torch.ones_like(step), step)  # a zero step holds only its base
        q = torch.clamp(torch.round((x - base) / safe) + self.zero, self.lo, self.hi)
        return torch.where(step == 0, base, step * (q - self.zero) + base), q


def _join(grids: list[_Grid], codes: torch.Tensor) -> gb.QuantBlocks:
    """The blocks of a whole weight: its codes with the scales of its grids, in column order."""
    rows = codes.shape[0]
    cat = lambda field: None if getattr(grids[0].blocks, field) is None else np.concatenate(  # noqa: E731
        [getattr(g.blocks, field).reshape(rows, -1) for g in grids], axis=1)
    return gb.QuantBlocks(codes.numpy(), cat("scales"), cat("mins"), cat("d"), cat("dmin"))


def grid_gptq_weight(w: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = DAMP,
                     act_order: bool = False) -> tuple[torch.Tensor, str, gb.QuantBlocks]:
    """GPTQ of one [out, in] weight with the Hessian H [in, in] onto the GGUF grid of `type_name` (after
    llama.cpp's fallback for its width). Returns the float32 weight, every block on that grid, the type it
    is on, and its blocks (codes and scales as the GGUF stores them; they dequantize to the weight exactly).

    act_order: columns in order of falling diag(H) (the inputs with the most energy first), with every block's
    grid fixed up front by llama.cpp's rounding of the original weights (GPTQ's "static groups"), so the
    blocks stay contiguous runs of 32 (256) columns that a GGUF can hold."""
    W = w.detach().float().clone()
    cols = W.shape[1]
    t = layer_type(type_name, cols)
    span = gb.block_type(t).block
    if cols % span:
        raise InputError(None, f"the {t} block of {span} does not divide the input width {cols}", "use a block-32 type")
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    perm = grids = None
    if act_order:
        grids = [_Grid(W[:, b:b + span], t) for b in range(0, cols, span)]
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    batch = max(128, span)
    Q = torch.zeros_like(W)
    C = torch.zeros(W.shape, dtype=torch.int16)
    in_order: list[_Grid] = []
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        grid = None
        for i in range(i2 - i1):
            w_col = W1[:, i]
            if perm is not None:  # the column's own block, whose grid was fixed up front
                col = int(perm[i1 + i])
                q, code = grids[col // span].round(w_col, col % span)
            else:  # blocks in order: a block's grid is fixed when the loop reaches it
                if i % span == 0:
                    grid = _Grid(W1[:, i:i + span], t)
                    in_order.append(grid)
                q, code = grid.round(w_col, i % span)
            Q[:, i1 + i], C[:, i1 + i] = q, code.to(torch.int16)
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, C, in_order = Q[:, inv], C[:, inv], grids
    return Q, t, _join(in_order, C)


class _Stop(Exception):
    pass


def _layer_inputs(model, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The hidden states the first decoder layer receives for each batch, and the keyword arguments every layer
    receives (per layer, per batch: a sliding-window layer of Gemma 3 gets another mask and rotary table)."""
    layers = model.model.layers
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def grab(li):
        def pre(_, args, kw):
            h = args[0] if args else kw.pop("hidden_states")
            if li == 0:
                hidden.append(h)
            kwargs[li].append(kw)
            if li == len(layers) - 1:
                raise _Stop
        return pre

    handles = [layer.register_forward_pre_hook(grab(li), with_kwargs=True) for li, layer in enumerate(layers)]
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def _run_layer(layer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def gptq_gguf_model_(model, sequences, linear_types: dict[str, str], batch_size: int = 8, damp: float = DAMP,
                     act_order: bool = False, progress: bool = True, blocks: dict | None = None,
                     head_type: str | None = None) -> dict:
    """GPTQ in place of every linear named in `linear_types` (module name -> GGUF type), layer by layer, then,
    when `head_type` is a GGUF type, of the output projection (the tied token embedding or lm_head) onto it.
    Fills `blocks` (llama.cpp tensor name -> (type, QuantBlocks)) when given; returns timings and settings."""
    blocks = {} if blocks is None else blocks

    ids = torch.tensor(sequences, dtype=torch.long)
    batches = list(torch.split(ids, batch_size))
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden, kwargs = _layer_inputs(model, batches)
        layers = model.model.layers
        for li in tqdm(range(len(layers)), desc="GPTQ (GGUF grid)", unit="layer", disable=not progress):
            layer = layers[li]
            prefix = f"model.layers.{li}."
            mods = {n: m for n, m in layer.named_modules() if prefix + n in linear_types}
            H = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods.items()}
            last: dict = {}  # q/k/v (and gate/up) see the same input tensor: one X^T X for all of them

            def hook(name):
                def acc(_, inp, __):
                    x = inp[0]
                    if last.get("input") is not x:
                        flat = x.reshape(-1, x.shape[-1]).float()
                        last.update(input=x, xtx=flat.T @ flat)
                    H[name] += last["xtx"]
                return acc

            handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
            try:
                for h, kw in zip(hidden, kwargs[li]):
                    _run_layer(layer, h, kw)
            finally:
                for hd in handles:
                    hd.remove()
            last.clear()
            for n, m in mods.items():
                q, t, qb = grid_gptq_weight(m.weight, H[n], linear_types[prefix + n], damp, act_order)
                m.weight.copy_(q.to(m.weight.dtype))
                blocks[gguf_tensor_name(prefix + n)] = (t, qb)
            hidden = [_run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs[li])]
        if head_type is not None:
            blocks[head_tensor_name(model)] = _gptq_head_(model, hidden, head_type, damp, act_order)
    return {"wall_s": round(time.perf_counter() - t0, 3), "calibration_samples": len(sequences),
            "calibration_tokens": int(ids.numel()), "damp_percent": damp, "act_order": act_order}


def head_tensor_name(model) -> str:
    """The GGUF tensor of the output projection: token_embd.weight when it is tied to the embedding."""
    tied = getattr(model.config, "tie_word_embeddings", False) or model.lm_head.weight is model.get_input_embeddings().weight
    return "token_embd.weight" if tied else "output.weight"


def head_hessian(model, hidden: list[torch.Tensor]) -> torch.Tensor:
    """X^T X of what the output projection reads: the last decoder layer's outputs after the final norm."""
    width = model.lm_head.in_features
    H = torch.zeros(width, width)
    for h in hidden:
        x = model.model.norm(h).reshape(-1, width).float()
        H += x.T @ x
    return H


def _gptq_head_(model, hidden: list[torch.Tensor], type_name: str, damp: float, act_order: bool) -> tuple:
    """GPTQ of the output projection onto `type_name`, in place. A tied embedding is one tensor for both roles:
    it is optimized as the projection (the role whose error reaches the logits directly), the lookup reads the
    same grid values."""
    w = model.lm_head.weight
    q, t, qb = grid_gptq_weight(w, head_hessian(model, hidden), type_name, damp, act_order)
    w.copy_(q.to(w.dtype))
    return t, qb


def gptq_gguf_checkpoint(hf_dir, out_dir, base_type: str, sequences, tensor_types: dict[str, str] | None = None,
                         embedding_type: str = "auto", gguf_name: str | None = None, act_order: bool = False,
                         gptq_head: bool = True) -> Path:
    """GPTQ of the float checkpoint hf_dir onto the GGUF grids a precision map names (tensor_types: llama.cpp
    tensor-name pattern -> type, first match wins; other linears get base_type). Writes out_dir (float32 HF
    checkpoint, weights on the grid, tokenizer, gptq_result.json) and out_dir/<name>.gguf; returns the GGUF.
    gptq_head: the output projection (a tied embedding included) is GPTQ'd onto the embedding's type too, with
    the Hessian of the final normed hidden states; otherwise the export rounds it as llama-quantize would."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    base_type = check_grid_type(base_type, who="GPTQ on the grid")
    model = load_hf_model(hf_dir)
    check_grid_model(model, base_type, hf_dir, who="GPTQ on the grid")
    types = linear_types(model, base_type, tensor_types)
    blocks: dict = {}
    head = head_grid_type(base_type, embedding_type, model.lm_head.in_features) if gptq_head else None
    info = gptq_gguf_model_(model, sequences, types, act_order=act_order, blocks=blocks, head_type=head)
    info["head"] = head or "rounded by llama.cpp's rules"
    info["linear_types"] = {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}
    gguf_name = gguf_name or f"{hf_dir.resolve().name}-gptq-{base_type}.gguf"
    return save_and_export(model, hf_dir, out_dir, "gptq_result.json", info, gguf_name, base_type, tensor_types=tensor_types,
                           embedding_type=embedding_type, blocks=blocks)


def head_grid_type(base_type: str, embedding_type: str, width: int) -> str | None:
    """The grid the output projection is GPTQ'd onto: the embedding type the export plans (auto: llama-quantize's
    choice), or None when it stays in float."""
    t = llama_embedding_type(base_type, width) if embedding_type == "auto" else embedding_type.upper()
    return None if t in FLOAT_TYPES else t


class GridGPTQBackend(Backend):
    """GPTQ by quantloop's own solver on llama.cpp's grids: a k-quant type, a precision map, or act-order into a GGUF type."""

    method = "gptq"
    writer = "the GPTQ export"
    libraries = ("torch", "transformers", "gguf")

    def handles(self, spec) -> bool:
        return spec.gptq_on_gguf_grid()

    def quantize(self, job: BackendJob) -> BackendOutput:
        spec = job.spec
        if spec.has_precision_map():
            base, rules, planned, embedding_type = plan_precision_map(job.model.gguf, spec)
        else:  # one type; embeddings as llama-quantize types them
            base, rules, embedding_type = spec.gguf_type.upper(), {}, "auto"
            planned = planned_export_types(job.model.gguf, base)
        path = gptq_gguf_checkpoint(job.model.hf_dir, job.work_dir, base, job.sequences, tensor_types=rules,
                                    embedding_type=embedding_type, gguf_name=job.gguf_name(), act_order=spec.act_order)

        exported = json.loads((job.work_dir / "gptq_result.json").read_text())["export"]
        return BackendOutput(path, f"gguf:mixed-{spec.preset or 'custom'}" if spec.has_precision_map() else f"gguf:{base}", planned,
                             notes=[export_note(exported)])
