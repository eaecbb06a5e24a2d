"""quantize_model: the one entry point to every quantizer backend.

Writes SLM/models/quantized/<name>_<tag>/ (seed 003's layout): the model files,
config.json (for HF formats), quantization_config.json (the full spec, library
versions, the calibration manifest's hash) — into a temporary folder that is
renamed into place only when everything is written. The backends live in
quantloop/backends/, one module each behind quantloop/backends/base.py's interface.
"""

from __future__ import annotations

import time
from pathlib import Path

from quantloop import faults
from quantloop.backends.base import BackendJob, backend_for, calibration_for, check_needs
from quantloop.errors import InputError
from quantloop.eval.size import gguf_size, hf_size
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.gguf.architectures import check_config, check_gguf_architecture
from quantloop.gguf.precision_map import check_written_types
from quantloop.memory import peak_rss_bytes, reset_peak_rss
from quantloop.models.checkpoints import resolve_model
from quantloop.names import check_name, under
from quantloop.paths import QUANTIZED_DIR
from quantloop.schemas import QuantizationResult, QuantSpec
from quantloop.search.budget import fit_to_budget
import quantloop.tools.quant_cache as quant_cache


def check_architecture(model, spec: QuantSpec) -> None:
    """Refuse, before any work, an architecture the method cannot handle (the table in quantloop.gguf.architectures);
    llama.cpp's own types need only a GGUF whose architecture llama.cpp loads."""
    if model.hf_dir is not None:
        check_config(model.hf_dir / "config.json", spec.method)
    if spec.quantized_by_llama_cpp and model.gguf is not None:
        check_gguf_architecture(model.gguf)


def apply_size_budget(model, spec: QuantSpec, memory=None) -> tuple[QuantSpec, list[str]]:
    """The spec with one type per tensor that meets spec.min_size_ratio, and one note saying what it cost."""
    if not spec.gguf_type:  # (a method without min_size_ratio is refused when its spec is made)
        problem, fix = spec.refusal("min_size_ratio", spec.min_size_ratio)
        raise InputError(None, f"{problem} without gguf_type", fix)
    if model.gguf is None:
        raise InputError(model.path, "a size budget needs the model's F16 GGUF", "run `quantloop prepare` on it first")
    print(f"size budget: the whole file at least {spec.min_size_ratio}x smaller than the F16 GGUF", flush=True)
    fitted, record = fit_to_budget(model, spec, memory=memory)
    moved = ", ".join(f"{d.unit} {d.to_type}{' (prior)' if d.prior else ''}" for d in record.downgrades) or "none needed"
    notes = [f"size budget {spec.min_size_ratio}x of {record.f16_bytes:,} bytes = {record.budget_bytes:,}: "
             f"planned {record.planned_bytes:,}, fitted {record.bytes:,} (estimate); below the planned types "
             f"(least measured KLD per byte): {moved}"]
    if record.prior_units:
        notes.append(f"sensitivity: {len(record.measured_units)} of {record.units} units measured on this model; "
                     f"{len(record.prior_units)} never measured, their values are priors from {', '.join(record.prior_sources)} "
                     f"(knowledge store{f', scaled by {record.prior_ratio:.2f} as the measured units were' if record.prior_ratio else ''}): "
                     f"{', '.join(record.prior_units)}")
    return fitted, notes


def time_left_for_training(spec: QuantSpec, started: float) -> QuantSpec:
    """A QAT spec's time limit counts from the start of quantize_model: the size budget's sensitivity measurement
    and the calibration text are paid from it, and the trainer gets what is left (at least a few seconds, which
    leave it its GPTQ start and no step)."""
    limit = spec.time_limit()
    if not limit:
        return spec
    spent = (time.perf_counter() - started) / 60
    return spec.with_time_limit(max(limit - spent, 0.05))


def default_output_dir(checkpoint: str | Path, spec: QuantSpec) -> Path:
    m = resolve_model(checkpoint)
    name = check_name(m.manifest.name if m.manifest else m.path.stem, "model name", "rename the model folder, or pass --out")
    return under(QUANTIZED_DIR, f"{name}_{spec.tag()}", what="output folder")


REUSED_NOTE = "reused the files of an identical earlier quantization"  # the note of a result taken from the cache


def reused_result(entry: dict, key: str) -> tuple[str, str, list[str]]:
    """(format, model file relative to the folder, notes) of a cache entry, with a note saying it was reused."""
    note = (f"{REUSED_NOTE} (same model files, spec and calibration text; "
            f"cache entry {key[:12]}, first made for {entry['first_made_for']})")
    return entry["format"], entry["model_path"], [*entry["notes"], note]


def quantize_model(checkpoint: str | Path, output_dir: str | Path, spec: QuantSpec, overwrite: bool = False,
                   cache_dir: str | Path | None = None, memory=None) -> QuantizationResult:
    """Resolve the model, check what the backend needs, get the calibration once, run the backend, record.
    `cache_dir`: reuse (and add to) the content-addressed cache there (quantloop/tools/quant_cache.py). `memory`
    (a quantloop.knowledge.KnowledgeStore): a size budget's sensitivity pass uses related models' values as priors."""
    started = time.perf_counter()
    model = resolve_model(checkpoint)
    check_architecture(model, spec)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise InputError(out, "output folder exists", "pass --overwrite or choose another output folder")
    budget_notes = []
    if spec.size_budget():  # a size budget: the least sensitive tensors go below the planned types until it fits
        spec, budget_notes = apply_size_budget(model, spec, memory)
    backend = backend_for(spec)
    needs = backend.needs(spec)
    check_needs(needs, model, spec.label or spec.method)
    reset_peak_rss()
    t0 = time.perf_counter()
    key = entry = None
    with atomic_output(out, is_dir=True) as tmp:
        job = BackendJob(model=model, spec=spec, work_dir=tmp, name=model.manifest.name if model.manifest else model.path.stem)
        backend.check(job)
        job.sequences, job.text_file, calib_digest = calibration_for(needs, spec, model, tmp)
        if cache_dir is not None:
            key = quant_cache.cache_key(model, spec, calib_digest)
            entry = quant_cache.lookup(Path(cache_dir), key)
        if entry is not None:
            quant_cache.restore(Path(cache_dir), key, tmp)
            fmt, rel, notes = reused_result(entry, key)
            model_path, libraries = tmp / rel, entry["libraries"]
        else:
            job.spec = time_left_for_training(spec, started)
            output = backend.quantize(job)
            if output.planned_types:  # a precision map is a promise: every tensor has the type it planned
                check_written_types(output.model_path, output.planned_types, backend.writer)
            model_path, fmt, notes, libraries = Path(output.model_path), output.format, output.notes, backend.library_versions()
        size = gguf_size(model_path) if model_path.suffix == ".gguf" else hf_size(model_path)
        result = QuantizationResult(
            spec=spec, output_dir=str(out), model_path=str(out / model_path.relative_to(tmp)) if model_path != tmp else str(out),
            format=fmt, wall_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
            bytes_on_disk=size.bytes_on_disk, bits_per_weight=size.bits_per_weight,
            linear_bits_per_weight=size.linear_bits_per_weight, libraries=libraries,
            calibration_manifest_sha256=calib_digest, notes=budget_notes + notes,
        )
        write_json_atomic(tmp / "quantization_config.json", {"quantloop": result.model_dump(), "source": str(model.path)})
        faults.point("write:gguf" if model_path.suffix == ".gguf" else "write:checkpoint")  # written, not yet in place
    if key is not None and entry is None:
        rel = str(Path(result.model_path).relative_to(out)) if Path(result.model_path) != out else ""
        quant_cache.store(Path(cache_dir), key, out, {"format": fmt, "model_path": rel, "notes": notes, "libraries": libraries,
                                                      "first_made_for": str(out), "calibration_manifest_sha256": calib_digest})
    return result
