"""Per-layer mixed precision for GGUF: layer-type presets, the exact type of every tensor, and the
file size before anything is quantized (`quantloop estimate`).

A precision map gives a GGUF type per layer type (embeddings, attention, feed_forward, output,
norms) and/or per tensor-name pattern. The architecture-aware default preset keeps embeddings
at 8 bits, attention at 4, the feed-forward at 6 and norms in float:
Q8_0 / Q4_K / Q6_K / F32. llama-quantize writes the file (`--pure` plus one `--tensor-type` per
rule), so every quantizable tensor gets exactly the type the map names, after llama.cpp's own
fallback for rows a block does not divide (gguf_blocks.fallback_type: Q4_K -> Q5_0, Q6_K ->
Q8_0, ...; SmolLM2's 576-wide rows hit it). `estimate` applies the same rules to the F16 GGUF's
tensor table, so it knows every tensor's type and the file's bytes before quantizing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypedDict

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from quantloop.errors import InputError
from quantloop.gguf.block_types import check_type, stored_type
from quantloop.gguf.llamacpp import GGUFTensor, padded, read_metadata
from quantloop.gguf.tensor_names import ATTENTION, FEED_FORWARD

# GGUF tensor-name patterns of each layer type (llama.cpp's names, any architecture it converts)
LAYER_TYPES: dict[str, str] = {
    "embeddings": r"^token_embd\.weight$",
    "output": r"^output\.weight$",
    "attention": ATTENTION,
    "feed_forward": FEED_FORWARD,
    "norms": r"_norm\.weight$",
}
PRESETS: dict[str, dict[str, str]] = {
    # seeds 000/001: embeddings 8-bit, attention 4-bit, feed-forward 6-bit, norms kept in float
    "arch-default": {"embeddings": "Q8_0", "attention": "Q4_K", "feed_forward": "Q6_K", "norms": "F32"},
}
def precision_map(preset: str | None = None, layer_types: dict[str, str] | None = None) -> dict[str, str]:
    """Layer type -> GGUF type: the preset, then the user's per-layer-type entries on top."""
    out: dict[str, str] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(None, f"unknown precision preset '{preset}'", f"use one of {', '.join(PRESETS)}")
        out.update(PRESETS[preset])
    for layer, t in (layer_types or {}).items():
        if layer not in LAYER_TYPES:
            raise InputError(None, f"unknown layer type '{layer}'", f"use one of {', '.join(LAYER_TYPES)}")
        out[layer] = t
    for layer, t in out.items():
        out[layer] = check_type(t, f"layer type {layer}")
    if out.get("norms", "F32") != "F32":
        raise InputError(None, f"norms must stay F32, not {out['norms']}", "llama.cpp keeps 1-D tensors in float; drop the norms entry")
    return out


def tensor_rules(pmap: dict[str, str], tensor_types: dict[str, str] | None = None) -> dict[str, str]:
    """Ordered (pattern -> type) rules, llama-quantize --tensor-type style: the user's tensor patterns first, then layer types."""
    rules = {p: check_type(t, f"tensor pattern {p}") for p, t in (tensor_types or {}).items()}
    for layer, t in pmap.items():
        if layer != "norms":
            rules[LAYER_TYPES[layer]] = t
    for p in rules:
        try:
            re.compile(p)
        except re.error as e:
            raise InputError(None, f"tensor type pattern '{p}' is not a regular expression ({e})", "use e.g. 'ffn_down'") from None
    return rules


def planned_types(gguf_f16: str | Path, base_type: str, rules: dict[str, str], pmap: dict[str, str] | None = None) -> dict[str, str]:
    """The GGUF type llama-quantize --pure writes for every tensor of `gguf_f16` under `rules` (first match wins,
    unmatched 2-D tensors get `base_type`, 1-D tensors stay as they are, then llama.cpp's width fallback)."""
    meta = read_metadata(gguf_f16)
    names = [t.name for t in meta.tensors]
    for layer in pmap or {}:
        if not any(re.search(LAYER_TYPES[layer], n) for n in names):
            raise InputError(gguf_f16, f"the preset names layer type '{layer}', which this model does not have",
                             f"drop it; the model's tensors are e.g. {', '.join(names[:4])}")
    base = check_type(base_type, "base type")
    out = {}
    for tensor in meta.tensors:
        name, dims = tensor.name, meta.shapes[tensor.name]
        if len(dims) < 2:
            out[name] = tensor.type  # norms, biases: never quantized
            continue
        t = next((rt for p, rt in rules.items() if re.search(p, name)), base)
        out[name] = stored_type(t, dims[0])
    return out


def plan_mixed_file(gguf_f16: str | Path, base_type: str | None, preset: str | None, layer_types: dict[str, str] | None,
                    tensor_types: dict[str, str] | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """(base type, llama-quantize --tensor-type rules, planned type of every tensor) of a mixed-precision file.
    The base type (anything no rule matches) defaults to the embeddings' type, else Q8_0."""
    pmap = precision_map(preset, layer_types)
    base = (base_type or pmap.get("embeddings") or "Q8_0").upper()
    if base.endswith(("_S", "_M", "_L", "_XS", "_XXS")):
        raise InputError(None, f"--type {base} is a llama.cpp mixture chosen inside llama-quantize",
                         "use a uniform type (Q4_K, Q6_K, Q8_0, ...) or a --preset / --layer-type map")
    rules = tensor_rules(pmap, tensor_types)
    return base, rules, planned_types(gguf_f16, base, rules, pmap)


def imatrix_header_bytes(imatrix: str | Path) -> int:
    """Bytes llama-quantize adds to the file's metadata when given this importance matrix (tools/quantize: the
    quantize.imatrix.file and .dataset strings, cut to 127 bytes, and the entries and chunks counts as u32): the
    same for every file quantized with it, whatever the types."""
    r = GGUFReader(str(imatrix))
    field = r.fields.get("imatrix.datasets")
    datasets = field.contents() if field is not None else []
    chunks = r.fields["imatrix.chunk_count"].contents() if "imatrix.chunk_count" in r.fields else 0
    text = lambda key, value: 8 + len(key) + 4 + 8 + len(value.encode()[:127])  # noqa: E731 (key, type, string)
    count = lambda key: 8 + len(key) + 4 + 4  # noqa: E731
    return (text("quantize.imatrix.file", str(imatrix)) + (text("quantize.imatrix.dataset", datasets[0]) if datasets else 0)
            + count("quantize.imatrix.entries_count") + (count("quantize.imatrix.chunks_count") if chunks > 0 else 0))


class SizeEstimate(TypedDict):
    """estimate_bytes's answer (a dict: it is read by key)."""

    bytes: int  # the whole file
    tensor_bytes: int  # the tensors' data, without padding
    n_weights: int  # every tensor's elements
    bits_per_weight: float  # 8 x tensor_bytes / n_weights
    tensors: list[GGUFTensor]  # every tensor with the type and bytes it is written with


def estimate_bytes(gguf_f16: str | Path, types: dict[str, str]) -> SizeEstimate:
    """Bytes and bits per weight of the file llama-quantize writes with these tensor types."""
    meta = read_metadata(gguf_f16)
    align = meta.alignment
    data, n_weights, rows = 0, 0, []
    for t in meta.tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[types[t.name]]]
        nbytes = t.n_elements // block * size
        data += padded(nbytes, align)
        n_weights += t.n_elements
        rows.append(GGUFTensor(t.name, types[t.name], t.n_elements, nbytes))
    # the header (metadata, tokenizer, tensor infos) keeps its size; only general.file_type's value changes
    total = meta.data_offset + data
    tensor_bytes = sum(r.n_bytes for r in rows)
    return SizeEstimate(bytes=total, tensor_bytes=tensor_bytes, n_weights=n_weights,
                        bits_per_weight=8 * tensor_bytes / n_weights, tensors=rows)


def layer_type_of(name: str) -> str:
    return next((layer for layer, p in LAYER_TYPES.items() if re.search(p, name)), "other")


def check_written_types(model_path, planned: dict[str, str], writer: str) -> None:
    """The precision map is a promise: every tensor of the written file has the type it planned."""
    written = {t.name: t.type for t in read_metadata(model_path).tensors}
    wrong = [n for n in planned if written.get(n) != planned[n]]
    if wrong:
        raise RuntimeError(f"{writer} wrote {written.get(wrong[0])} for {wrong[0]}, the precision map planned {planned[wrong[0]]}")


def plan_precision_map(f16_gguf, spec) -> tuple[str, dict[str, str], dict[str, str], str]:
    """(base type, tensor-type rules, planned type of every tensor, embedding type) of a precision map that a
    quantizer trains or solves for and then exports itself (QAT, GPTQ on the grid)."""
    base, rules, planned = plan_mixed_file(f16_gguf, spec.gguf_type, spec.preset, spec.layer_types, spec.gguf_tensor_types)
    return base, rules, planned, planned["token_embd.weight"]
