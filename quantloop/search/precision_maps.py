"""Precision-map files: a genome (exact tensor name -> GGUF type) as the QuantSpec fields quantize_model takes
(method gguf, one anchored --tensor-type rule per tensor, norms F32), written as JSON and YAML; and reading
such a file back, checked against the model's tensors.

    quantloop quantize MODEL --spec-file map.yaml   (or quant_spec(**yaml.safe_load(open("map.yaml"))))
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from quantloop.errors import InputError
from quantloop.fileio import write_text_atomic
from quantloop.search.tensors import ModelTensors, check_genome

EXACT = re.compile(r"^\^(.+)\$$")


def spec_fields(genome: dict[str, str], imatrix=None) -> dict:
    """The QuantSpec fields of a genome: every tensor named by an anchored pattern; the base type is the embedding's,
    or, when that is F16, a quantized type of the map (llama-quantize with an F16 base type ignores the per-tensor
    quantized types). With `imatrix` (a CalibrationSpec or its dict), llama-quantize uses an importance matrix from
    that calibration text."""
    quantized = [t for t in genome.values() if t != "F16"]
    base = genome.get("token_embd.weight", "F16")
    if base == "F16":
        base = max(set(quantized), key=quantized.count) if quantized else "Q8_0"
    fields = {"method": "gguf", "gguf_type": base, "layer_types": {"norms": "F32"},
              "gguf_tensor_types": {f"^{re.escape(n)}$": t for n, t in genome.items()}}
    if imatrix is not None:
        calib = imatrix if isinstance(imatrix, dict) else imatrix.model_dump(mode="json")
        fields |= {"imatrix": True, "calibration": calib}
    return fields


def write_map(genome: dict[str, str], stem: Path, info: dict | None = None, imatrix=None) -> tuple[Path, Path]:
    """stem.json and stem.yaml (both atomic): the QuantSpec fields, plus a 'measured' block that QuantSpec ignores
    when read through read_map."""
    doc = spec_fields(genome, imatrix)
    if info:
        doc = {**doc, "quantloop_search": info}
    j = write_text_atomic(stem.with_suffix(".json"), json.dumps(doc, indent=2) + "\n")
    y = write_text_atomic(stem.with_suffix(".yaml"), yaml.safe_dump(doc, sort_keys=False))
    return j, y


def genome_of_fields(fields: dict, where: Path | str | None) -> dict[str, str]:
    genome = {}
    for pattern, t in (fields.get("gguf_tensor_types") or {}).items():
        m = EXACT.match(pattern)
        name = re.sub(r"\\(.)", r"\1", m.group(1)) if m else pattern
        genome[name] = str(t).upper()
    if not genome:
        raise InputError(where, "the precision map names no tensors (gguf_tensor_types is empty)", "write one with `quantloop search`")
    return genome


def read_map(path: str | Path, mt: ModelTensors) -> tuple[dict, dict[str, str]]:
    """(QuantSpec fields, genome) of a JSON/YAML precision map, every tensor checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such precision-map file", "give a .json or .yaml written by `quantloop search`")
    try:
        doc = yaml.safe_load(path.read_text())  # YAML reads JSON too
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML/JSON ({str(e).splitlines()[0][:80]})", "fix the file") from None
    if not isinstance(doc, dict) or doc.get("method") != "gguf":
        raise InputError(path, "not a precision map (method: gguf with gguf_tensor_types)", "give a map written by `quantloop search`")
    fields = {k: v for k, v in doc.items() if k != "quantloop_search"}
    genome = check_genome(mt, genome_of_fields(fields, path), path)
    return fields, genome
