"""Size on disk and exact bits per weight, from the tensor tables (no loading)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from quantloop.gguf.llamacpp import nominal_bits_of, read_metadata
from quantloop.gguf.tensor_names import GGUF_LINEAR, HF_LINEAR
from quantloop.schemas import SizeReport

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8,
              "F8_E4M3": 8, "F8_E5M2": 8}


def gguf_size(path: str | Path) -> SizeReport:
    path = Path(path)
    tensors = read_metadata(path).tensors
    n = sum(t.n_elements for t in tensors)
    b = sum(t.n_bytes for t in tensors)
    lin = [t for t in tensors if GGUF_LINEAR.match(t.name)]
    ln, lb = sum(t.n_elements for t in lin), sum(t.n_bytes for t in lin)
    types, linear_types = Counter(), Counter()
    for t in tensors:
        types[t.type] += t.n_elements
    for t in lin:
        linear_types[t.type] += t.n_elements
    return SizeReport(
        path=str(path), bytes_on_disk=path.stat().st_size, n_weights=n, bits_per_weight=8 * b / n,
        n_linear_weights=ln, linear_bits_per_weight=8 * lb / ln if ln else 0.0, tensor_types=dict(types),
        linear_tensor_types=dict(linear_types),
    )


class SafetensorsTensor(NamedTuple):
    """One entry of a .safetensors file's header."""

    name: str
    dtype: str  # safetensors' dtype name: F32, BF16, I32, ...
    n_elements: int
    n_bytes: int


def _safetensors_table(path: Path) -> list[SafetensorsTensor]:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    rows = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ne = 1
        for d in v["shape"]:
            ne *= d
        rows.append(SafetensorsTensor(name, v["dtype"], ne, v["data_offsets"][1] - v["data_offsets"][0]))
    return rows


def hf_size(hf_dir: str | Path) -> SizeReport:
    """Float checkpoints: weights = tensor elements. Files other than *.gguf count toward the bytes on disk."""
    hf_dir = Path(hf_dir)
    rows = [r for f in sorted(hf_dir.glob("*.safetensors")) for r in _safetensors_table(f)]
    n = sum(r.n_elements for r in rows)
    b = sum(r.n_bytes for r in rows)
    lin = [r for r in rows if HF_LINEAR.search(r.name)]
    ln, lb = sum(r.n_elements for r in lin), sum(r.n_bytes for r in lin)
    types = Counter()
    for r in rows:
        types[r.dtype] += r.n_elements
    on_disk = sum(p.stat().st_size for p in hf_dir.iterdir() if p.is_file() and p.suffix != ".gguf")
    return SizeReport(
        path=str(hf_dir), bytes_on_disk=on_disk, n_weights=n, bits_per_weight=8 * b / n if n else 0.0,
        n_linear_weights=ln, linear_bits_per_weight=8 * lb / ln if ln else 0.0, tensor_types=dict(types),
    )


def nominal_bits(size: SizeReport, file_type: str | None) -> int | None:
    """The bit width a GGUF is judged at. A uniform type or one of llama.cpp's named mixtures (Q4_K_M, ...) is
    named by its type; a precision map (several types on the linears, whoever wrote it) by its measured bits per
    linear weight, rounded down (scales cost under one bit per weight: Q4_0 stores 4.5, Q6_K 6.56)."""
    return judged_bits(set(size.linear_tensor_types), size.linear_bits_per_weight, file_type)


def judged_bits(linear_types: set[str], linear_bits_per_weight: float, file_type: str | None) -> int | None:
    """nominal_bits from the linear weights' types and bits per weight (known before a file is written, too)."""
    named_mixture = bool(file_type) and file_type.upper().endswith(("_S", "_M", "_L", "_XS", "_XXS"))
    if len(linear_types) > 1 and not named_mixture:
        return int(linear_bits_per_weight)
    return nominal_bits_of(file_type)
