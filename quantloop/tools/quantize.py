"""quantize_model: the one entry point to every quantizer backend.

Writes SLM/models/quantized/<name>_<tag>/ (seed 003's layout): the model files,
config.json (for HF formats), quantization_config.json (the full spec, library
versions, the calibration manifest's hash) — into a temporary folder that is
renamed into place only when everything is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quantloop.errors import InputError
from quantloop.eval.size import gguf_size, hf_size
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.memory import peak_rss_bytes, reset_peak_rss
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import QuantizationResult, QuantSpec

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def _library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def calibration_text_file(calib, hf_dir: Path | None, work_dir: Path) -> tuple[Path, str]:
    """The calibration text as a file (llama-imatrix tokenizes it itself): the dataset split, checked against
    its manifest, or the synthetic sequences decoded to text (written into work_dir)."""
    from quantloop.data.datasets import load_manifest, manifest_digest, read_split
    from quantloop.data.datasets import dataset_dir_or_default

    if calib.source == "synthetic":
        from quantloop.data.calibration import synthetic_sequences
        from quantloop.models.checkpoints import load_hf_tokenizer

        seqs, digest = synthetic_sequences(calib, hf_dir)
        tok = load_hf_tokenizer(hf_dir)
        path = work_dir / "synthetic-calibration.txt"
        path.write_text("\n\n".join(tok.decode(s, skip_special_tokens=True) for s in seqs), encoding="utf-8")
        return path, digest
    d = dataset_dir_or_default(calib.dataset_dir)
    read_split(d, calib.split)  # checks sha256 and that it is not empty
    return d / load_manifest(d).splits[calib.split].file, manifest_digest(d)


def export_exact_gguf(hf_dir: Path | None, out_file: Path | None, spec: QuantSpec) -> Path | None:
    """Write the grid-aligned HF weights into the GGUF block type that holds the layout exactly."""
    from quantloop.gguf.export import export_hf_to_gguf
    from quantloop.gguf.blocks import gguf_type_for_layout

    exact = gguf_type_for_layout(spec.bits, spec.group_size, spec.symmetric)
    if exact is None or exact != spec.gguf_type.upper():
        raise InputError(None, f"{spec.method} {spec.bits}-bit group {spec.group_size} {'symmetric' if spec.symmetric else 'asymmetric'} "
                         f"has no exact GGUF {spec.gguf_type} form" + (f" (it maps to {exact})" if exact else ""),
                         "use 4/5/8 bits, group size 32 (symmetric: Q4_0/Q5_0/Q8_0, asymmetric: Q4_1/Q5_1)")
    if hf_dir is None:  # layout check only
        return None
    return export_hf_to_gguf(hf_dir, out_file, exact)


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


def check_written_types(model_path, planned: dict[str, str], writer: str) -> None:
    """The precision map is a promise: every tensor of the written file has the type it planned."""
    from quantloop.gguf.llamacpp import read_metadata

    written = {t[0]: t[1] for t in read_metadata(model_path)["tensors"]}
    wrong = [n for n in planned if written.get(n) != planned[n]]
    if wrong:
        raise RuntimeError(f"{writer} wrote {written.get(wrong[0])} for {wrong[0]}, the precision map planned {planned[wrong[0]]}")


def plan_precision_map(model, spec: QuantSpec) -> tuple[str, dict[str, str], dict[str, str], str]:
    """(base type, tensor-type rules, planned type of every tensor, embedding type) of a precision map that a
    quantizer trains or solves for and then exports itself (QAT, GPTQ on the grid)."""
    from quantloop.gguf.precision_map import plan_mixed_file

    if model.gguf is None:
        raise InputError(model.path, "no F16/F32 GGUF to plan the precision map on", "run `quantloop prepare` on it first")
    base, rules, planned = plan_mixed_file(model.gguf, spec.gguf_type, spec.preset, spec.layer_types, {})
    return base, rules, planned, planned["token_embd.weight"]


def quantize_model(checkpoint: str | Path, output_dir: str | Path, spec: QuantSpec, overwrite: bool = False) -> QuantizationResult:
    model = resolve_model(checkpoint)
    check_architecture(model)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise InputError(out, "output folder exists", "pass --overwrite or choose another output folder")
    name = model.manifest.name if model.manifest else model.path.stem
    reset_peak_rss()
    t0 = time.perf_counter()
    calib_digest = None
    mixed = spec.method in ("gguf", "qat", "gptq") and (spec.preset is not None or bool(spec.layer_types))
    on_grid_gptq = spec.gptq_on_gguf_grid()
    with atomic_output(out, is_dir=True) as tmp:
        if spec.method == "gguf":
            from quantloop.backends.gguf import quantize_gguf

            if model.gguf is None:
                raise InputError(model.path, "no F16/F32 GGUF to quantize", "run `quantloop prepare` on it first")
            gguf_type = (spec.gguf_type or "Q4_K_M").upper()
            dst = tmp / f"{name}-{spec.tag().removeprefix('gguf-')}.gguf"
            if mixed:
                from quantloop.gguf.precision_map import plan_mixed_file

                gguf_type, rules, planned = plan_mixed_file(model.gguf, spec.gguf_type, spec.preset, spec.layer_types,
                                                            spec.gguf_tensor_types)
            if spec.imatrix or spec.gguf_tensor_types or mixed:
                from quantloop.backends.gguf import compute_imatrix, quantize_gguf_tool

                imatrix = None
                if spec.imatrix:
                    text_file, calib_digest = calibration_text_file(spec.calibration, model.hf_dir, tmp)
                    imatrix = compute_imatrix(model.gguf, text_file, tmp / "imatrix.gguf", spec.calibration.samples, spec.calibration.seqlen)
                model_path = quantize_gguf_tool(model.gguf, dst, gguf_type, imatrix, rules if mixed else spec.gguf_tensor_types,
                                                pure=mixed)
                if mixed:
                    check_written_types(model_path, planned, "llama-quantize")
                if imatrix is not None:
                    imatrix.unlink()
                    (tmp / "synthetic-calibration.txt").unlink(missing_ok=True)
            else:
                model_path = quantize_gguf(model.gguf, dst, gguf_type)
            libs = _library_versions("llama_cpp_python")
        elif spec.method == "rtn":
            from quantloop.backends.rtn import quantize_rtn_checkpoint

            if model.hf_dir is None:
                raise InputError(model.path, "RTN needs a transformers checkpoint", "pass a prepared checkpoint folder")
            model_path = quantize_rtn_checkpoint(model.hf_dir, tmp, spec)
            libs = _library_versions("torch", "transformers")
            if spec.gguf_type:
                model_path = export_exact_gguf(tmp, tmp / f"{name}-{spec.tag()}.gguf", spec)
        elif on_grid_gptq:  # GPTQ's own solver on llama.cpp's grids (k-quants, precision maps)
            from quantloop.backends.gptq_gguf import gptq_gguf_checkpoint
            from quantloop.data.calibration import calibration_sequences
            from quantloop.models.checkpoints import load_hf_tokenizer

            if model.hf_dir is None or model.gguf is None:
                raise InputError(model.path, "GPTQ onto a GGUF grid needs a prepared checkpoint (transformers + F16 GGUF)",
                                 "run `quantloop prepare` on it first")
            if mixed:
                base, rules, planned, embedding_type = plan_precision_map(model, spec)
            else:  # one k-quant; embeddings as llama-quantize types them
                from quantloop.gguf.export import planned_export_types

                base, rules, embedding_type = spec.gguf_type.upper(), {}, "auto"
                planned = planned_export_types(model.gguf, base)
            seqs, calib_digest = calibration_sequences(spec.calibration, load_hf_tokenizer(model.hf_dir), model.hf_dir)
            model_path = gptq_gguf_checkpoint(model.hf_dir, tmp, base, seqs, tensor_types=rules, embedding_type=embedding_type,
                                              gguf_name=f"{name}-{spec.tag()}.gguf", act_order=spec.act_order)
            check_written_types(model_path, planned, "the GPTQ export")
            gguf_type = base
            libs = _library_versions("torch", "transformers", "gguf")
        elif spec.method in ("gptq", "awq"):
            from quantloop.backends.gptq import quantize_gptq  # noqa: F401  (GPTQModel)
            from quantloop.data.calibration import calibration_sequences
            from quantloop.models.checkpoints import load_hf_tokenizer

            if model.hf_dir is None:
                raise InputError(model.path, f"{spec.method.upper()} needs a transformers checkpoint", "pass a prepared checkpoint folder")
            if spec.gguf_type:
                export_exact_gguf(None, None, spec)  # refuse a layout no GGUF block holds before the slow part
            seqs, calib_digest = calibration_sequences(spec.calibration, load_hf_tokenizer(model.hf_dir), model.hf_dir)
            quantize_gptq(model.hf_dir, tmp, spec.bits, spec.group_size, spec.symmetric, spec.act_order, seqs,
                          method=spec.method, seed=spec.seed)
            model_path = tmp
            libs = _library_versions("gptqmodel", "torch", "transformers")
            if spec.gguf_type:
                from quantloop.backends.gptq_export import export_gptq_to_gguf

                model_path = export_gptq_to_gguf(tmp, model.hf_dir, tmp / f"{name}-{spec.tag()}.gguf", spec.gguf_type.upper())
        elif spec.method == "autoround":
            from quantloop.backends.autoround import quantize_autoround
            from quantloop.data.calibration import calibration_sequences
            from quantloop.models.checkpoints import load_hf_tokenizer

            if model.hf_dir is None:
                raise InputError(model.path, "AutoRound needs a transformers checkpoint", "pass a prepared checkpoint folder")
            if not spec.gguf_type:
                raise InputError(None, "AutoRound is offered with GGUF output only", "set a GGUF type, e.g. --type Q4_K_M")
            seqs, calib_digest = calibration_sequences(spec.calibration, load_hf_tokenizer(model.hf_dir), model.hf_dir)
            model_path = quantize_autoround(model.hf_dir, tmp, spec, seqs)
            libs = _library_versions("auto-round", "torch", "transformers")
        elif spec.method == "qat":
            from quantloop.backends.qat import check_qat_type, qat_checkpoint
            from quantloop.data.calibration import calibration_sequences
            from quantloop.models.checkpoints import load_hf_tokenizer

            if model.hf_dir is None:
                raise InputError(model.path, "QAT needs a transformers checkpoint", "pass a prepared checkpoint folder")
            rules, embedding_type = {}, "auto"
            if mixed:  # a precision map: the base type is the embeddings' (or --type)
                base, rules, planned, embedding_type = plan_precision_map(model, spec)
                gguf_type = check_qat_type(base)
            else:
                gguf_type = check_qat_type(spec.gguf_type, spec.bits, spec.symmetric)
            seqs, calib_digest = calibration_sequences(spec.calibration, load_hf_tokenizer(model.hf_dir), model.hf_dir)
            model_path = qat_checkpoint(model.hf_dir, tmp, gguf_type, seqs, steps=spec.qat_steps, seed=spec.seed,
                                        gguf_name=f"{name}-{spec.tag()}.gguf", tensor_types=rules, embedding_type=embedding_type)
            if mixed:
                check_written_types(model_path, planned, "the QAT export")
            libs = _library_versions("torch", "transformers", "gguf")
        else:
            raise InputError(None, f"method '{spec.method}' is not available yet", "use gguf, rtn, gptq, awq, autoround or qat")
        wall = time.perf_counter() - t0
        size = gguf_size(model_path) if Path(model_path).suffix == ".gguf" else hf_size(model_path)
        fmt = f"gguf:{(spec.gguf_type or 'Q4_K_M').upper()}" if Path(model_path).suffix == ".gguf" else spec.method
        if spec.method == "qat" or on_grid_gptq:
            fmt = f"gguf:{gguf_type}"
        if mixed:
            fmt = f"gguf:mixed-{spec.preset or 'custom'}"
        result = QuantizationResult(
            spec=spec, output_dir=str(out), model_path=str(out / Path(model_path).relative_to(tmp)) if model_path != tmp else str(out),
            format=fmt, wall_s=wall, peak_rss_bytes=peak_rss_bytes(), bytes_on_disk=size.bytes_on_disk,
            bits_per_weight=size.bits_per_weight, linear_bits_per_weight=size.linear_bits_per_weight,
            libraries=libs, calibration_manifest_sha256=calib_digest,
        )
        write_json_atomic(tmp / "quantization_config.json", {"quantloop": result.model_dump(), "source": str(model.path)})
    return result
