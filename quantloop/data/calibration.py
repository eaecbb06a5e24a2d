"""Calibration token sequences: real text from a prepared dataset split, or text the
float model writes itself (source "synthetic", the data-free path).

Real text: consecutive, non-overlapping windows of `seqlen` tokens taken from the
split in order (deterministic); the dataset manifest's sha256 identifies the text in
every quantization_config.json. Synthetic: quantloop.data.synthetic's LLM-QAT generator,
cached under ~/.cache/quantloop/synthetic; the sha256 of the token ids identifies it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from quantloop.data.datasets import (
    dataset_dir_or_default,
    load_manifest,
    manifest_digest,
    named_dataset_dir,
    read_split,
)
from quantloop.data.synthetic import _ids_sha256, cached_synthetic
from quantloop.errors import InputError
from quantloop.models.checkpoints import load_hf_tokenizer
from quantloop.paths import CACHE_DIR
from quantloop.schemas import CalibrationSpec


def synthetic_sequences(spec: CalibrationSpec, model_dir: Path | None) -> tuple[list[list[int]], str]:
    """`spec.samples` sequences the float checkpoint `model_dir` generates itself, and their sha256."""
    if model_dir is None:
        raise InputError(None, "synthetic calibration needs the float transformers checkpoint that writes it",
                         "pass a prepared checkpoint folder")
    seqs = cached_synthetic(model_dir, spec.samples, spec.seqlen, spec.seed, CACHE_DIR / "synthetic")
    return seqs, _ids_sha256(np.asarray(seqs, dtype=np.int64))


def calibration_dirs(spec: CalibrationSpec) -> list[Path]:
    """The prepared dataset folders the calibration text comes from: dataset_dir (default shakespeare), then `mix`
    (each a folder, or a dataset name under SLM/datasets)."""
    return [Path(dataset_dir_or_default(spec.dataset_dir))] + [named_dataset_dir(m) for m in spec.mix]


def shares(samples: int, parts: int) -> list[int]:
    """`samples` shared as equally as possible among `parts` (the first ones take the remainder)."""
    return [samples // parts + (1 if i < samples % parts else 0) for i in range(parts)]


def fill_shares(samples: int, available: list[int]) -> list[int]:
    """`samples` shared as equally as the datasets allow: one that holds fewer than its share gives all it has and
    the others make up the rest (the caller checks that the total suffices)."""
    taken = [0] * len(available)
    room = [i for i, a in enumerate(available) if a > 0]
    left = samples
    while left > 0 and room:
        for i, n in zip(list(room), shares(left, len(room))):
            got = min(n, available[i] - taken[i])
            taken[i] += got
            left -= got
            if taken[i] == available[i]:
                room.remove(i)
    return taken


def in_turn(lists: list[list]) -> list:
    """The items of several lists taken in turn (one from each while it lasts): a prefix holds every list."""
    return [items[i] for i in range(max(map(len, lists))) for items in lists if i < len(items)]


def mixed_digest(dirs: list[Path]) -> str:
    """One dataset's manifest digest, or for a mix the sha256 of its datasets' digests in order."""
    digests = [manifest_digest(d) for d in dirs]
    return digests[0] if len(digests) == 1 else hashlib.sha256("+".join(digests).encode()).hexdigest()[:16]


def calibration_sequences(spec: CalibrationSpec, tokenizer, model_dir: Path | None = None) -> tuple[list[list[int]], str]:
    """Return `spec.samples` token lists of `spec.seqlen` tokens, and the digest that identifies them
    (the dataset manifest's, or the synthetic ids' sha256). `model_dir` writes synthetic data. With `spec.mix`
    the samples are shared equally among the datasets and taken from each in turn (a prefix stays mixed)."""
    if spec.source == "synthetic":
        return synthetic_sequences(spec, model_dir)
    dirs = calibration_dirs(spec)
    ids = [tokenizer(read_split(d, spec.split), add_special_tokens=False)["input_ids"] for d in dirs]
    available = [len(x) // spec.seqlen for x in ids]
    if sum(available) < spec.samples:
        where = dirs[0] / f"{spec.split}.txt" if len(dirs) == 1 else dirs[0]
        raise InputError(where, f"calibration set too small: {sum(map(len, ids))} tokens hold {sum(available)} samples of "
                         f"{spec.seqlen}, {spec.samples} requested", "ask for fewer samples or shorter sequences, or prepare more text")
    per_domain = [[x[i * spec.seqlen:(i + 1) * spec.seqlen] for i in range(n)]
                  for x, n in zip(ids, fill_shares(spec.samples, available))]
    return in_turn(per_domain), mixed_digest(dirs)


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


def text_pieces(text: str, chars: int) -> list[str]:
    """`text` cut at blank lines into pieces of at least `chars` characters (the last may be shorter)."""
    pieces, current = [], []
    for para in text.split("\n\n"):
        if para.strip():
            current.append(para)
        if sum(map(len, current)) >= chars:
            pieces.append("\n\n".join(current))
            current = []
    return pieces + (["\n\n".join(current)] if current else [])


def calibration_text_file(calib, hf_dir: Path | None, work_dir: Path) -> tuple[Path, str]:
    """The calibration text as a file (llama-imatrix tokenizes it itself): the dataset split, checked against
    its manifest, or the synthetic sequences decoded to text (written into work_dir)."""
    if calib.source == "synthetic":
        seqs, digest = synthetic_sequences(calib, hf_dir)
        tok = load_hf_tokenizer(hf_dir)
        path = work_dir / "synthetic-calibration.txt"
        path.write_text("\n\n".join(tok.decode(s, skip_special_tokens=True) for s in seqs), encoding="utf-8")
        return path, digest
    dirs = calibration_dirs(calib)
    if len(dirs) == 1:
        read_split(dirs[0], calib.split)  # checks sha256 and that it is not empty
        return dirs[0] / load_manifest(dirs[0]).splits[calib.split].file, manifest_digest(dirs[0])
    # a mix: each split cut at paragraphs into pieces of about 2,000 characters (some 500 tokens), dealt in turn, so
    # the first chunks llama-imatrix reads hold every domain in equal parts
    path = work_dir / "calibration-mix.txt"
    path.write_text("\n\n".join(in_turn([text_pieces(read_split(d, calib.split), 2000) for d in dirs])), encoding="utf-8")
    return path, mixed_digest(dirs)
