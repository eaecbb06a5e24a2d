"""Export an HF checkpoint whose linear weights are already on a GGUF grid, losing nothing.

RTN, GPTQ, AWQ or QAT with a GGUF-compatible layout leave float weights that are
exactly dequantized blocks of some GGUF type. This writes those blocks: llama.cpp's
own convert_hf_to_gguf.py makes an F32 GGUF (names, metadata, tokenizer, its q/k row
permutation for llama, which keeps every input-dimension block intact), then every
linear weight is matched to codes and scales of the target type
(`gguf_blocks.fit_blocks`) and written as raw blocks with gguf-py's GGUFWriter. A
weight that is not on the grid is refused, never requantized.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from quantloop.errors import InputError
from quantloop.fileio import atomic_output, check_hf_dir
from quantloop.gguf import blocks as gguf_blocks
from quantloop.gguf.block_types import FLOAT_TYPES, check_type, stored_type
from quantloop.gguf.llamacpp import convert_hf_to_gguf, read_metadata
from quantloop.gguf.tensor_names import EMBEDDINGS, GGUF_LINEAR

# general.file_type for a file of mostly one block type (k-quants: llama.cpp's "S" mixes are the closest)
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K",
              "IQ4_NL": "MOSTLY_IQ4_NL", "Q3_K": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K", "F16": "MOSTLY_F16", "F32": "ALL_F32"}


def export_hf_to_gguf(
    hf_dir: str | Path,
    out_file: str | Path,
    type_name: str,
    tensor_types: dict[str, str] | None = None,
    embedding_type: str = "auto",
    overwrite: bool = False,
    blocks: dict | None = None,
    report: dict | None = None,
) -> Path:
    """Write `hf_dir` as a GGUF whose linear weights are raw `type_name` blocks; returns the path.

    tensor_types maps regular expressions over GGUF tensor names (searched, first match
    wins, as llama-quantize --tensor-type) to a type for the linear weights they match,
    e.g. {"ffn_": "Q6_K", "attn_": "Q4_K"}; F16/F32 keep a weight in float.
    embedding_type is the type of token_embd/output: "auto" (default) gives them the type
    llama-quantize would (llama_embedding_type), so the file has llama.cpp's layout and
    size; F16/F32 keep them in float. Embeddings already on that grid (QAT) are written
    exactly; others are rounded as llama-quantize rounds them (no optimizer touched them). Norms and other 1-D tensors stay F32. Rows a
    type's block does not divide get llama-quantize's fallback type (Q4_K -> Q5_0, ...,
    see gguf_blocks.fallback_type), and must be on that type's grid.
    Raises InputError when a weight is not on its type's grid (to fp16 rounding);
    nothing is written then. `blocks` (GGUF tensor name -> (type, gguf_blocks.QuantBlocks) in the
    checkpoint's row order) are a quantizer's own codes and scales: they are written as they are, once
    checked to dequantize to the tensor's weights exactly (the converter may reorder rows; they are
    matched row for row), instead of fitted.
    The written file is read back and every quantized tensor compared with the bytes packed for it, bit for
    bit; a difference refuses the file. `report`, when given, receives the counts: quantized tensors read back,
    how many carried the quantizer's own blocks, how many were fitted or rounded here.
    """
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    type_name = check_type(type_name, "export type", floats=False)
    if embedding_type != "auto":
        embedding_type = check_type(embedding_type, "embedding type")
    rules = []
    for pattern, t in (tensor_types or {}).items():
        try:
            rules.append((re.compile(pattern), check_type(t, f"tensor type for '{pattern}'")))
        except re.error as e:
            raise InputError(None, f"tensor type pattern '{pattern}' is not a regular expression ({e})", "use e.g. 'ffn_down'") from None
    if out_file.exists() and not overwrite:
        raise InputError(out_file, "output file exists", "choose another path or pass overwrite")

    if not hf_dir.is_dir():
        raise InputError(hf_dir, "not a folder", "pass an HF checkpoint folder")
    check_hf_dir(hf_dir)

    with atomic_output(out_file) as tmp:
        src = convert_hf_to_gguf(hf_dir, tmp.parent / "source-f32.gguf", "f32")
        reader = gguf.GGUFReader(src)
        tensors = []
        for t in reader.tensors:
            emb = llama_embedding_type(type_name, t.data.shape[-1]) if embedding_type == "auto" else embedding_type
            target = _target_type(t.name, t.data.ndim, type_name, emb, rules)
            if blocks and t.name in blocks:
                tensors.append((t.name, *_encode_known(hf_dir, t, target, *blocks[t.name])))
            else:
                tensors.append((t.name, *_encode(hf_dir, t, target)))
        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        writer = gguf.GGUFWriter(tmp, arch)
        if (align := reader.get_field(gguf.Keys.General.ALIGNMENT)) is not None:
            writer.data_alignment = int(align.contents())
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
                                                                gguf.Keys.General.QUANTIZATION_VERSION):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type_name]].value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, raw_dtype in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        del reader
        checked = read_back(tmp, {name: data for name, data, raw_dtype in tensors if raw_dtype is not None})
        if report is not None:
            carried = sum(1 for name in checked if blocks and name in blocks)
            report.update(quantized_tensors_read_back=len(checked), from_quantizer=carried, fitted_or_rounded=len(checked) - carried)
    return out_file


def read_back(path: Path, expected: dict[str, np.ndarray]) -> list[str]:
    """Read the written GGUF with gguf-py and compare each quantized tensor's bytes with what was packed for it;
    RuntimeError naming the first that differs. Returns the names checked."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    for name, data in expected.items():
        t = found.get(name)
        if t is None or np.asarray(t.data).tobytes() != np.ascontiguousarray(data).tobytes():
            raise RuntimeError(f"{path.name}: tensor {name} as written differs from the quantizer's blocks; the file is refused")
    del reader
    return list(expected)


def llama_embedding_type(type_name: str, width: int) -> str:
    """The type llama-quantize gives a tied token embedding / output matrix in a file of `type_name`: Q8_0 for
    Q8_0 files, else Q6_K, or its fallback Q8_0 where 256 does not divide the rows (llama-quant.cpp, OUTPUT)."""
    return "Q8_0" if type_name == "Q8_0" else gguf_blocks.fallback_type("Q6_K", width)


def planned_export_types(f16_gguf: str | Path, type_name: str, embedding_type: str = "auto",
                         tensor_types: dict[str, str] | None = None) -> dict[str, str]:
    """The type export_hf_to_gguf gives every tensor of the model whose F16/F32 GGUF is `f16_gguf`
    (for mixed_precision.estimate_bytes: the exact size of an export before anything is quantized)."""
    meta = read_metadata(f16_gguf)
    rules = [(re.compile(p), t.upper()) for p, t in (tensor_types or {}).items()]
    out = {}
    for name, dims in meta.shapes.items():
        emb = llama_embedding_type(type_name, dims[0]) if embedding_type == "auto" else embedding_type
        target = _target_type(name, len(dims), type_name, emb, rules)
        out[name] = "F32" if target is None else stored_type(target, dims[0])
    return out


def _target_type(name: str, ndim: int, type_name: str, embedding_type: str, rules) -> str | None:
    """The type a tensor is written as; None keeps the source's (F32) data."""
    if ndim < 2:
        return None
    if name in EMBEDDINGS:
        return embedding_type
    if GGUF_LINEAR.match(name):
        return next((t for rx, t in rules if rx.search(name)), type_name)
    return None


def _encode(hf_dir: Path, t, target: str | None):
    """(array, raw_dtype) for GGUFWriter.add_tensor: raw blocks for block types, floats otherwise."""
    data = np.asarray(t.data)
    if target is None:
        return data, None
    if target not in FLOAT_TYPES:  # rows the block does not divide: llama-quantize's fallback type
        target = gguf_blocks.fallback_type(target, data.shape[-1])
    if target in FLOAT_TYPES:
        return data.astype(np.float16 if target == "F16" else np.float32), None
    if data.dtype not in (np.float32, np.float16):
        raise InputError(hf_dir, f"tensor {t.name} is {t.tensor_type.name} in the converted GGUF, not F32")
    data = data.astype(np.float32)
    try:
        qb = gguf_blocks.fit_blocks(data.reshape(-1, data.shape[-1]), target)
    except gguf_blocks.OffGridError as e:
        if t.name in EMBEDDINGS:  # not optimized by any quantizer: rounded as llama-quantize rounds it
            raw = gguf_blocks.quantize_to_bytes(data.reshape(-1, data.shape[-1]), target)
            return raw.reshape(*data.shape[:-1], raw.shape[-1]), gguf_blocks.qtype(target)
        raise InputError(hf_dir, f"tensor {t.name} is not on the {target} grid: {e.n_bad} of {e.n_blocks} blocks are off "
                         f"(max deviation {e.max_deviation:.3g}, {e.relative:.1%} of a block's largest magnitude)",
                         "quantize it with a matching layout first: blocks of 32, fp16 scales; or export it as F16") from None
    raw = gguf_blocks.pack(qb.codes, qb.scales, qb.mins, target, qb.d, qb.dmin)
    return raw.reshape(*data.shape[:-1], raw.shape[-1]), gguf_blocks.qtype(target)


def _encode_known(hf_dir: Path, t, target: str | None, type_name: str, qb: gguf_blocks.QuantBlocks):
    """A quantizer's own blocks, in the converted tensor's row order, after checking that they dequantize to it."""
    data = np.asarray(t.data, dtype=np.float32)
    data = data.reshape(-1, data.shape[-1])
    if target is None or gguf_blocks.fallback_type(target, data.shape[-1]) != type_name:
        raise InputError(hf_dir, f"tensor {t.name}: the quantizer wrote {type_name} blocks, the export plans {target}",
                         "quantize and export with the same precision map")
    raw = gguf_blocks.pack(qb.codes, qb.scales, qb.mins, type_name, qb.d, qb.dmin)
    deq = gguf_blocks.dequantize(raw, type_name) + np.float32(0)  # + 0 turns -0.0 into 0.0
    row_of = {r.tobytes(): i for i, r in enumerate(deq)}
    order = [row_of.get((r + np.float32(0)).tobytes()) for r in data]
    if None in order:
        bad = order.index(None)
        raise InputError(hf_dir, f"tensor {t.name}: row {bad} is not one the quantizer's {type_name} blocks hold "
                         f"(max deviation from the nearest {float(np.abs(deq - data[bad]).max(axis=1).min()):.3g})",
                         "re-run the quantization; the checkpoint and its blocks disagree")
    raw = raw[np.asarray(order)]
    return raw.reshape(*np.asarray(t.data).shape[:-1], raw.shape[-1]), gguf_blocks.qtype(type_name)


def export_note(report: dict) -> str:
    """One line on how exact an export is, from export_hf_to_gguf's report."""
    n, carried = report.get("quantized_tensors_read_back", 0), report.get("from_quantizer", 0)
    return (f"exact export: {n} quantized tensors read back bit for bit, {carried} of them the quantizer's own codes and "
            f"scales, {n - carried} rounded by llama.cpp's rules (embeddings)")


def export_exact_gguf(hf_dir: Path | None, out_file: Path | None, spec, blocks: dict | None = None,
                      report: dict | None = None) -> Path | None:
    """Write the grid-aligned HF weights into the GGUF block type that holds the layout exactly."""
    exact = gguf_blocks.gguf_type_for_layout(spec.bits, spec.group_size, spec.symmetric)
    if exact is None or exact != spec.gguf_type.upper():
        raise InputError(None, f"{spec.method} {spec.bits}-bit group {spec.group_size} {'symmetric' if spec.symmetric else 'asymmetric'} "
                         f"has no exact GGUF {spec.gguf_type} form" + (f" (it maps to {exact})" if exact else ""),
                         "use 4/5/8 bits, group size 32 (symmetric: Q4_0/Q5_0/Q8_0, asymmetric: Q4_1/Q5_1)")
    if hf_dir is None:  # layout check only
        return None
    return export_hf_to_gguf(hf_dir, out_file, exact, blocks=blocks, report=report)
