"""The one shape of every quantizer: what it needs, one `quantize` call, one result, and a registry by method.

A backend is a class with a `method` name (the spec's method it serves) and three parts:

    needs(spec)   -> Needs                 a transformers checkpoint? an F16 GGUF? calibration token
                                           sequences, or the calibration text as a file (llama-imatrix)?
                                           (default: what the spec's own model says, spec.needs())
    check(job)                             refuse, before any slow work, what it cannot do (InputError)
    quantize(job) -> BackendOutput         write the model into job.work_dir, return the file a runtime loads

`quantize_model` (quantloop/tools/quantize.py) resolves the model, checks the needs, gets the calibration
once, calls the backend and records the result. Each method's settings model (quantloop/schemas/quant_spec.py)
owns its fields and names its backends; REGISTRY below is built from them. A method served by several backends
(GPTQ: GPTQModel's layouts, or quantloop's solver on llama.cpp's own grids) lists them in order; the first whose
`handles(spec)` is true runs. A new quantizer outside the package: a Backend subclass whose `settings` is its own
SpecBase subclass, and register(Backend()).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from quantloop.data.calibration import calibration_sequences, calibration_text_file
from quantloop.errors import InputError
from quantloop.gguf.export import export_hf_to_gguf
from quantloop.models.checkpoints import load_hf_tokenizer, save_tokenizer
from quantloop.schemas.quant_spec import SPEC_MODELS, Needs, SpecBase, method_of, register_spec, unregister_spec

if TYPE_CHECKING:
    from quantloop.models.checkpoints import ResolvedModel


@dataclass
class BackendJob:
    """Everything a backend gets: the model, the spec, a folder to write into, and the calibration data."""

    model: ResolvedModel
    spec: SpecBase  # one of the QuantSpec union's models
    work_dir: Path  # temporary output folder; renamed into place when quantize_model succeeds
    name: str  # the model's name, for file names
    sequences: list[list[int]] | None = None  # calibration token sequences (Needs.calibration == "sequences")
    text_file: Path | None = None  # calibration text (Needs.calibration == "text_file")

    def gguf_name(self, tag: str | None = None) -> str:
        return f"{self.name}-{tag or self.spec.tag()}.gguf"


@dataclass
class BackendOutput:
    """What every backend returns."""

    model_path: Path  # the file or folder a runtime loads
    format: str  # "gguf:<TYPE>", "gguf:mixed-<preset>", or an HF format name ("rtn", "gptq", "awq")
    planned_types: dict[str, str] = field(default_factory=dict)  # tensor -> GGUF type a precision map promised
    notes: list[str] = field(default_factory=list)  # one line each, for the person reading the result


class Backend:
    """Base class of every quantizer backend (see the module docstring)."""

    method: ClassVar[str]
    settings: ClassVar[type[SpecBase] | None] = None  # its own settings model, for a method beside the built-in ones
    writer: ClassVar[str] = "the export"  # who wrote the GGUF, for a precision-map mismatch message
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions whose versions the result records

    def handles(self, spec: SpecBase) -> bool:
        return True

    def needs(self, spec: SpecBase) -> Needs:
        return spec.needs()

    def check(self, job: BackendJob) -> None:
        """Refuse what this backend cannot do, before the slow part. Default: nothing to refuse."""

    def quantize(self, job: BackendJob) -> BackendOutput:
        raise NotImplementedError

    def library_versions(self) -> dict[str, str]:
        out = {}
        for name in self.libraries:
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                pass
        return out


# method -> backend classes ("module:Class"), tried in order, as each method's settings model names them; imported
# only when used, so that a command that does not quantize never imports torch or GPTQModel.
REGISTRY: dict[str, list[str]] = {method_of(cls): list(cls.backends) for cls in SPEC_MODELS}
_REGISTERED: dict[str, list[Backend]] = {}


def register(backend: Backend) -> Backend:
    """Add a backend instance for its method (tried before the built-in ones), and its own settings model if it has
    one. Returns it."""
    if backend.settings is not None:
        register_spec(backend.settings)
    _REGISTERED.setdefault(backend.method, []).insert(0, backend)
    return backend


def unregister(backend: Backend) -> None:
    _REGISTERED.get(backend.method, []).remove(backend)
    if backend.settings is not None and not _REGISTERED[backend.method]:
        unregister_spec(backend.settings)


def _load(ref: str) -> Backend:
    module, cls = ref.split(":")
    return getattr(importlib.import_module(module), cls)()


def methods() -> list[str]:
    return sorted(set(REGISTRY) | {m for m, b in _REGISTERED.items() if b})


def backend_for(spec: SpecBase) -> Backend:
    """The backend that runs this spec: registered ones first, then REGISTRY's, the first that handles it."""
    candidates = list(_REGISTERED.get(spec.method, []))
    for ref in REGISTRY.get(spec.method, []):
        candidates.append(_load(ref))
    for backend in candidates:
        if backend.handles(spec):
            return backend
    raise InputError(None, f"method '{spec.method}' is not available", f"use one of {', '.join(methods())}")


def calibration_for(needs: Needs, spec: SpecBase, model: ResolvedModel, work_dir: Path) -> tuple[list[list[int]] | None, Path | None, str | None]:
    """(token sequences, text file, manifest digest) of the calibration data a backend needs, loaded once."""
    if needs.calibration == "sequences":
        seqs, digest = calibration_sequences(spec.calibration, load_hf_tokenizer(model.hf_dir), model.hf_dir)
        return seqs, None, digest
    if needs.calibration == "text_file":
        path, digest = calibration_text_file(spec.calibration, model.hf_dir, work_dir)
        return None, path, digest
    return None, None, None


def check_needs(needs: Needs, model: ResolvedModel, method: str) -> None:
    """One error line when the model lacks what the backend needs."""
    if needs.hf_checkpoint and model.hf_dir is None:
        raise InputError(model.path, f"{method} needs a transformers checkpoint", "pass a prepared checkpoint folder")
    if needs.f16_gguf and model.gguf is None:
        raise InputError(model.path, f"{method} needs an F16/F32 GGUF of the model", "run `quantloop prepare` on it first")


def save_and_export(model, hf_dir: Path, out_dir: Path, result_name: str, result: dict, gguf_name: str, gguf_type: str,
                    **export_kw) -> Path:
    """The end of a torch quantizer (QAT, GPTQ on the grid): save the float checkpoint whose weights sit on the grid and
    its tokenizer into out_dir, export it with the quantizer's blocks, and write `result` plus the export's counts to
    out_dir/result_name. Returns the GGUF."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").float().save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(hf_dir, out_dir)
    exported: dict = {}
    path = export_hf_to_gguf(out_dir, out_dir / gguf_name, gguf_type, report=exported, **export_kw)
    (out_dir / result_name).write_text(json.dumps(result | {"export": exported}, indent=2) + "\n")
    return path
