"""quantize_model: the one entry point to every quantizer backend.

Writes SLM/models/quantized/<name>_<tag>/ (seed 003's layout): the model files,
config.json (for HF formats), quantization_config.json (the full spec, library
versions, the calibration manifest's hash) — into a temporary folder that is
renamed into place only when everything is written. The backends live in
quantloop/backends/, one module each behind quantloop/backends/base.py's interface.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quantloop.backends.base import BackendJob, backend_for, calibration_for, check_needs, check_spec_fields
from quantloop.errors import InputError
from quantloop.eval.size import gguf_size, hf_size
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.gguf.precision_map import check_written_types
from quantloop.memory import peak_rss_bytes, reset_peak_rss
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import QuantizationResult, QuantSpec

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def check_architecture(model) -> None:
    if model.hf_dir is None:
        return
    arch = (json.loads((model.hf_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(model.hf_dir / "config.json", f"architecture {arch} is not supported", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def default_output_dir(checkpoint: str | Path, spec: QuantSpec) -> Path:
    from quantloop.paths import QUANTIZED_DIR

    m = resolve_model(checkpoint)
    name = m.manifest.name if m.manifest else m.path.stem
    return QUANTIZED_DIR / f"{name}_{spec.tag()}"


def quantize_model(checkpoint: str | Path, output_dir: str | Path, spec: QuantSpec, overwrite: bool = False) -> QuantizationResult:
    """Resolve the model, check what the backend needs, get the calibration once, run the backend, record."""
    model = resolve_model(checkpoint)
    check_architecture(model)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise InputError(out, "output folder exists", "pass --overwrite or choose another output folder")
    backend = backend_for(spec)
    check_spec_fields(backend, spec)
    needs = backend.needs(spec)
    check_needs(needs, model, backend.label)
    reset_peak_rss()
    t0 = time.perf_counter()
    with atomic_output(out, is_dir=True) as tmp:
        job = BackendJob(model=model, spec=spec, work_dir=tmp, name=model.manifest.name if model.manifest else model.path.stem)
        backend.check(job)
        job.sequences, job.text_file, calib_digest = calibration_for(needs, spec, model, tmp)
        output = backend.quantize(job)
        if output.planned_types:  # a precision map is a promise: every tensor has the type it planned
            check_written_types(output.model_path, output.planned_types, backend.writer)
        model_path = Path(output.model_path)
        size = gguf_size(model_path) if model_path.suffix == ".gguf" else hf_size(model_path)
        result = QuantizationResult(
            spec=spec, output_dir=str(out), model_path=str(out / model_path.relative_to(tmp)) if model_path != tmp else str(out),
            format=output.format, wall_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
            bytes_on_disk=size.bytes_on_disk, bits_per_weight=size.bits_per_weight,
            linear_bits_per_weight=size.linear_bits_per_weight, libraries=backend.library_versions(),
            calibration_manifest_sha256=calib_digest, notes=output.notes,
        )
        write_json_atomic(tmp / "quantization_config.json", {"quantloop": result.model_dump(), "source": str(model.path)})
    return result
