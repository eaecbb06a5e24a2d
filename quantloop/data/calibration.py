"""Calibration token sequences: real text from a prepared dataset split, or text the
float model writes itself (source "synthetic", the data-free path).

Real text: consecutive, non-overlapping windows of `seqlen` tokens taken from the
split in order (deterministic); the dataset manifest's sha256 identifies the text in
every quantization_config.json. Synthetic: quantloop.data.synthetic's LLM-QAT generator,
cached under ~/.cache/quantloop/synthetic; the sha256 of the token ids identifies it.
"""

from __future__ import annotations

from pathlib import Path

from quantloop.data.datasets import manifest_digest, read_split
from quantloop.errors import InputError
from quantloop.data.datasets import dataset_dir_or_default
from quantloop.schemas import CalibrationSpec


def synthetic_sequences(spec: CalibrationSpec, model_dir: Path | None) -> tuple[list[list[int]], str]:
    """`spec.samples` sequences the float checkpoint `model_dir` generates itself, and their sha256."""
    import numpy as np

    from quantloop.paths import CACHE_DIR
    from quantloop.data.synthetic import _ids_sha256, cached_synthetic

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
