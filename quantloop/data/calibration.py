"""Calibration token sequences: real text from a prepared dataset split, or text the
float model writes itself (source "synthetic", the data-free path).

Real text: consecutive, non-overlapping windows of `seqlen` tokens taken from the
split in order (deterministic); the dataset manifest's sha256 identifies the text in
every quantization_config.json. Synthetic: quantloop.data.synthetic's LLM-QAT generator,
cached under ~/.cache/quantloop/synthetic; the sha256 of the token ids identifies it.
"""

from __future__ import annotations

from pathlib import Path

from quantloop.data.datasets import dataset_dir_or_default, manifest_digest, read_split
from quantloop.errors import InputError
from quantloop.schemas import CalibrationSpec


def synthetic_sequences(spec: CalibrationSpec, model_dir: Path | None) -> tuple[list[list[int]], str]:
    """`spec.samples` sequences the float checkpoint `model_dir` generates itself, and their sha256."""
    import numpy as np

    from quantloop.data.synthetic import _ids_sha256, cached_synthetic
    from quantloop.paths import CACHE_DIR

    if model_dir is None:
        raise InputError(None, "synthetic calibration needs the float transformers checkpoint that writes it",
                         "pass a prepared checkpoint folder")
    seqs = cached_synthetic(model_dir, spec.samples, spec.seqlen, spec.seed, CACHE_DIR / "synthetic")
    return seqs, _ids_sha256(np.asarray(seqs, dtype=np.int64))


def calibration_sequences(spec: CalibrationSpec, tokenizer, model_dir: Path | None = None) -> tuple[list[list[int]], str]:
    """Return `spec.samples` token lists of `spec.seqlen` tokens, and the digest that identifies them
    (the dataset manifest's, or the synthetic ids' sha256). `model_dir` writes synthetic data."""
    if spec.source == "synthetic":
        return synthetic_sequences(spec, model_dir)
    dataset_dir = dataset_dir_or_default(spec.dataset_dir)
    text = read_split(Path(dataset_dir), spec.split)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // spec.seqlen
    if available < spec.samples:
        raise InputError(
            Path(dataset_dir) / f"{spec.split}.txt",
            f"calibration set too small: {len(ids)} tokens hold {available} samples of {spec.seqlen}, {spec.samples} requested",
            "ask for fewer samples or shorter sequences, or prepare more text",
        )
    seqs = [ids[i * spec.seqlen:(i + 1) * spec.seqlen] for i in range(spec.samples)]
    return seqs, manifest_digest(dataset_dir)


def check_calibration(calibration, vocab_size: int | None, same_length: bool = False) -> list[list[int]]:
    """Token-id sequences a quantizer can use: non-empty, inside the vocabulary (and of one length if asked)."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise InputError(None, "calibration is empty", "give at least one token-id sequence from the calibration split")
    out = []
    for i, seq in enumerate(calibration):
        ids = [int(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
        if not ids:
            raise InputError(None, f"calibration sequence {i} is empty", "drop empty sequences")
        if min(ids) < 0 or (vocab_size and max(ids) >= vocab_size):
            raise InputError(None, f"calibration sequence {i} has token ids outside [0, {vocab_size})",
                             "tokenize the calibration text with this model's tokenizer")
        out.append(ids)
    if same_length and len({len(s) for s in out}) != 1:
        raise InputError(None, "calibration sequences differ in length",
                         "give sequences of one length (calibration_sequences() does)")
    return out


def calibration_text_file(calib, hf_dir: Path | None, work_dir: Path) -> tuple[Path, str]:
    """The calibration text as a file (llama-imatrix tokenizes it itself): the dataset split, checked against
    its manifest, or the synthetic sequences decoded to text (written into work_dir)."""
    from quantloop.data.datasets import (
        dataset_dir_or_default,
        load_manifest,
        manifest_digest,
        read_split,
    )

    if calib.source == "synthetic":
        from quantloop.models.checkpoints import load_hf_tokenizer

        seqs, digest = synthetic_sequences(calib, hf_dir)
        tok = load_hf_tokenizer(hf_dir)
        path = work_dir / "synthetic-calibration.txt"
        path.write_text("\n\n".join(tok.decode(s, skip_special_tokens=True) for s in seqs), encoding="utf-8")
        return path, digest
    d = dataset_dir_or_default(calib.dataset_dir)
    read_split(d, calib.split)  # checks sha256 and that it is not empty
    return d / load_manifest(d).splits[calib.split].file, manifest_digest(d)
