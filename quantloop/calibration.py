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
