"""The tensors a precision map can set: their names (GGUF and transformers), widths, weights, the GGUF types each
can hold, and the exact bytes of each choice.

Widths decide the types: block-32 types need rows divisible by 32, k-quants by 256 (SmolLM2's 576-wide rows
cannot hold a k-quant, its 1536-wide ffn_down can); F16 is always possible. Bytes per tensor are exact (ggml's
block sizes, padded to the file's alignment), so the sum over a genome plus the header is the file's size,
the same number `quantloop estimate` prints (quantloop.gguf.precision_map.estimate_bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantloop.errors import InputError
from quantloop.gguf import blocks as gguf_blocks
from quantloop.gguf.architectures import SUPPORTED, of_gguf_arch
from quantloop.gguf.llamacpp import padded, read_metadata
from quantloop.gguf.precision_map import estimate_bytes

BLOCK32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")
FLOAT16 = "F16"

def hf_names(gguf_arch: str) -> dict[str, str]:
    """GGUF tensor name (middle part) -> transformers module in a decoder layer, from the architecture table."""
    arch = of_gguf_arch(gguf_arch)
    if arch is None:
        raise InputError(None, f"GGUF architecture '{gguf_arch}' has no transformers names in quantloop's table",
                         f"supported: {SUPPORTED}")
    return {g: m for m, g in arch.gguf_names}


# layer x module groups: one row of the sensitivity heatmap per module group
MODULE_GROUPS = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "attn_output": "attn_output",
                 "ffn_gate": "ffn_gate_up", "ffn_up": "ffn_gate_up", "ffn_down": "ffn_down"}
BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF name, e.g. blk.3.attn_q.weight
    hf_name: str  # transformers parameter, e.g. model.layers.3.self_attn.q_proj.weight
    width: int  # values per row (the input dimension)
    n_weights: int
    layer: int  # -1 for the embedding / output
    module: str  # attn_q, ..., token_embd, output
    types: tuple[str, ...]  # the GGUF types this tensor can be stored in, smallest first

    @property
    def group(self) -> str:
        return MODULE_GROUPS.get(self.module, self.module)

    @property
    def block(self) -> str:
        """attn or ffn (the embedding / output: their own name)."""
        return self.module.split("_")[0] if self.layer >= 0 else self.module


@dataclass(frozen=True)
class ModelTensors:
    gguf: Path
    tensors: tuple[TensorInfo, ...]
    fixed_bytes: int  # header + every tensor no precision map changes (norms)
    n_weights: int  # all weights of the file (what bits per weight divides by)
    alignment: int
    header_bytes: int = 0  # the header without its padding (data_offset rounds it up to the alignment)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def storable_types(width: int, candidates: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """GGUF types a row of `width` values can be stored in without llama.cpp's fallback (F16 always)."""
    out = [t for t in BLOCK32 if width % gguf_blocks.QK == 0] + [t for t in KQUANTS if width % gguf_blocks.QK_K == 0]
    out.append(FLOAT16)
    if candidates is not None:
        want = {c.upper() for c in candidates}
        out = [t for t in out if t in want] or [FLOAT16]
    return tuple(sorted(out, key=lambda t: bytes_per_weight(t)))


def bytes_per_weight(type_name: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return size / block


def tensor_bytes(n_weights: int, type_name: str, alignment: int) -> int:
    """Bytes one tensor takes in the file (data padded to the alignment), as llama-quantize writes it."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    n = n_weights // block * size
    return padded(n, alignment)


def _hf_name(gguf_name: str, gguf_arch: str = "llama") -> tuple[str, int, str]:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight", -1, "token_embd"
    if gguf_name == "output.weight":
        return "lm_head.weight", -1, "output"
    m = BLK.match(gguf_name)
    names = hf_names(gguf_arch)
    if m is None or m.group(2) not in names:
        raise InputError(None, f"tensor {gguf_name} has no known transformers name", f"a {gguf_arch} model quantizes {', '.join(names)}")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.weight", int(m.group(1)), m.group(2)


@lru_cache(maxsize=8)
def _model_tensors(gguf: str, mtime: float, candidates: tuple[str, ...] | None) -> ModelTensors:
    meta = read_metadata(gguf)
    align = meta.alignment
    rows, fixed = [], meta.data_offset
    n_all = 0
    for t in meta.tensors:
        n_all += t.n_elements
        dims = meta.shapes[t.name]
        if len(dims) < 2:
            fixed += tensor_bytes(t.n_elements, t.type, align)
            continue
        hf, layer, module = _hf_name(t.name, meta.architecture)
        rows.append(TensorInfo(t.name, hf, int(dims[0]), int(t.n_elements), layer, module, storable_types(int(dims[0]), candidates)))
    return ModelTensors(Path(gguf), tuple(rows), fixed, n_all, align, meta.header_bytes)


def model_tensors(gguf: str | Path, candidates: tuple[str, ...] | None = None) -> ModelTensors:
    """Every quantizable (2-D) tensor of an F16/F32 GGUF with the types it can take (restricted to `candidates`)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(gguf, "no such GGUF file", "run `quantloop prepare` on the model first")
    cands = tuple(sorted({c.upper() for c in candidates})) if candidates else None
    for c in cands or ():
        if c not in BLOCK32 + KQUANTS + (FLOAT16,):
            raise InputError(None, f"unknown candidate type '{c}'", f"use some of {', '.join(BLOCK32 + KQUANTS + (FLOAT16,))}")
    return _model_tensors(str(gguf), gguf.stat().st_mtime, cands)


def genome_bytes(mt: ModelTensors, genome: dict[str, str], extra_header: int = 0) -> int:
    """Exact bytes of the GGUF file llama-quantize writes for this genome (tensor -> type); `extra_header`: the
    metadata an importance matrix adds (quantloop.gguf.precision_map.imatrix_header_bytes)."""
    header = padded(mt.header_bytes + extra_header, mt.alignment) - padded(mt.header_bytes, mt.alignment)
    return mt.fixed_bytes + header + sum(tensor_bytes(t.n_weights, genome[t.name], mt.alignment) for t in mt.tensors)


def genome_bits_per_weight(mt: ModelTensors, genome: dict[str, str]) -> float:
    """Bits per weight as quantloop reports it everywhere: 8 x tensor data bytes / all weights."""
    return estimate_bytes(mt.gguf, full_types(mt, genome))["bits_per_weight"]


def full_types(mt: ModelTensors, genome: dict[str, str]) -> dict[str, str]:
    """Type of every tensor of the file: the genome for 2-D tensors, the F16 file's own type for the rest."""
    out = {t.name: t.type for t in read_metadata(mt.gguf).tensors}
    out.update(genome)
    return out


def smallest_genome(mt: ModelTensors) -> dict[str, str]:
    return {t.name: t.types[0] for t in mt.tensors}


def uniform_genome(mt: ModelTensors, type_name: str) -> dict[str, str]:
    """Every tensor at `type_name`, or at the nearest larger type it can hold."""
    want = bytes_per_weight(type_name)
    return {t.name: (type_name if type_name in t.types else next((x for x in t.types if bytes_per_weight(x) >= want), t.types[-1]))
            for t in mt.tensors}


def check_genome(mt: ModelTensors, genome: dict[str, str], where: str | Path | None = None) -> dict[str, str]:
    """A precision map over exact tensor names: every name must be a tensor of the model, every type one it can hold."""
    known = mt.by_name()
    unknown = [n for n in genome if n not in known]
    if unknown:
        raise InputError(where, f"the precision map names tensor '{unknown[0]}', which this model does not have",
                         f"the model's tensors are e.g. {', '.join(list(known)[:3])}")
    out = dict(smallest_genome(mt))
    for n, t in genome.items():
        t = str(t).upper()
        if t not in known[n].types:
            raise InputError(where, f"tensor {n} (rows of {known[n].width}) cannot be stored as {t}", f"use one of {', '.join(known[n].types)}")
        out[n] = t
    missing = [n for n in known if n not in genome]
    if missing:
        raise InputError(where, f"the precision map gives no type for tensor '{missing[0]}'", "name every 2-D tensor of the model")
    return out
