"""The content-addressed cache of quantizer outputs: identical work (the same model files, the same spec, the
same calibration text) is done once and its files reused by every later attempt that asks for it, whatever the
attempt's own output folder is called.

An entry is CACHE/<key>/: hard links to the files the quantizer wrote (a copy where the file system cannot link)
and entry.json (the format, the model file, the notes, where it was first made). Files are only ever replaced by
renaming a new file over them, never rewritten in place, so a link shares content that never changes: an earlier
run's files stay exactly what its report and MLflow records describe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from quantloop.fileio import sha256_file, tmp_prefix, write_json_atomic
from quantloop.models.checkpoints import ResolvedModel
from quantloop.schemas import QuantSpec

ENTRY = "entry.json"
SKIP = {"quantization_config.json"}  # written by quantize_model for each output folder (it names the folder)
_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered in this process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def model_digest(model: ResolvedModel) -> str:
    """One digest of every file the model is made of (its checkpoint folder's files and its GGUF)."""
    files = set()
    if model.hf_dir is not None:
        files |= {p for p in Path(model.hf_dir).iterdir() if p.is_file()}
    if model.gguf is not None:
        files.add(Path(model.gguf))
    if not files and Path(model.path).is_file():
        files.add(Path(model.path))
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def cache_key(model: ResolvedModel, spec: QuantSpec, calibration_digest: str | None) -> str:
    payload = json.dumps({"model": model_digest(model), "spec": spec.model_dump(mode="json"), "calibration": calibration_digest},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def lookup(cache_dir: Path, key: str) -> dict | None:
    """The entry of `key`, or None (an entry is complete once its folder has its final name)."""
    entry = cache_dir / key / ENTRY
    if not entry.is_file():
        return None
    try:
        return json.loads(entry.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def restore(cache_dir: Path, key: str, into: Path) -> None:
    """Link the entry's files into the (empty, temporary) output folder `into`."""
    src = cache_dir / key
    for f in src.rglob("*"):
        if f.is_file() and f.name != ENTRY:
            link_or_copy(f, into / f.relative_to(src))


def store(cache_dir: Path, key: str, out: Path, record: dict) -> None:
    """Add the output folder `out` as entry `key` (a temporary folder renamed into place; an entry another run
    added first is kept and this one dropped)."""
    if (cache_dir / key).exists():
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=tmp_prefix(key)))
    try:
        for f in out.rglob("*"):
            if f.is_file() and f.name not in SKIP:
                link_or_copy(f, tmp / f.relative_to(out))
        write_json_atomic(tmp / ENTRY, record)
        with contextlib.suppress(OSError):  # another run stored the same key first: theirs stays
            os.rename(tmp, cache_dir / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
