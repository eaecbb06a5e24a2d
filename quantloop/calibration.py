"""Calibration token sequences from a prepared dataset split (real text).

Sequences are consecutive, non-overlapping windows of `seqlen` tokens taken
from the split in order (deterministic); the manifest's sha256 identifies the
text in every quantization_config.json.
"""

from __future__ import annotations

from pathlib import Path

from quantloop.datasets import manifest_digest, read_split
from quantloop.errors import InputError
from quantloop.eval.session import dataset_dir_or_default
from quantloop.schemas import CalibrationSpec


def calibration_sequences(spec: CalibrationSpec, tokenizer) -> tuple[list[list[int]], str]:
    """Return `spec.samples` token lists of `spec.seqlen` tokens, and the dataset manifest's digest."""
    if spec.source != "dataset":
        raise InputError(None, f"calibration source '{spec.source}' is not available yet", "use source: dataset")
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
