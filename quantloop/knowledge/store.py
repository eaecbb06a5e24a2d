"""The knowledge store: what quantloop measured and decided, across runs and models, as atoms in a hyperon
AtomSpace, kept in one MeTTa text file under the runtime folder (SLM/knowledge/atomspace.metta).

The interface is small so the store behind it can be swapped: put(fact), query(MeTTa pattern), facts(kind, **fields),
prior(model, unit, ...) and measured(model, unit, ...). The file is written atomically, under a lock, merged with
what other runs wrote meanwhile, so two runs writing at once lose neither's atoms. A file that cannot be read
(corrupted, truncated, written by another format version) is renamed aside with one warning line, and the run goes
on without memory; it is never overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from hyperon.atoms import Atom, E, S, V, ValueAtom
from pydantic import BaseModel, Field

from quantloop.fileio import write_text_atomic
from quantloop.knowledge.atoms import KINDS, AnyFact, MeasurementFact, ModelFact, from_atom, kind_of, to_atom
from quantloop.knowledge.space import ShardedSpace
from quantloop.paths import SLM_DIR

FORMAT_VERSION = 1
STORE_NAME = "atomspace.metta"
RELATED_SPREAD = 0.25  # a related checkpoint's KLD may differ from this one's by about this fraction (one sigma)
FIELDS = {  # the fields of each kind, in their atom's order (for patterns)
    "Model": ("digest", "name", "architecture", "family", "n_params"),
    "Tensor": ("digest", "unit", "role", "layer", "n_weights", "shape"),
    "Measurement": ("digest", "unit", "role", "layer", "type", "text", "tv", "kld"),
    "Attempt": ("digest", "run_id", "step", "tag", "method", "status", "verdict", "passed", "reason", "metrics", "acceptance"),
    "Front": ("digest", "study", "trial", "kld_mean", "bytes", "bits_per_weight", "tg_tokens_per_s", "genome"),
}


def default_path() -> Path:
    return Path(os.environ.get("QUANTLOOP_KNOWLEDGE", SLM_DIR / "knowledge" / STORE_NAME))


class StoreUnreadable(Exception):
    """The file is not a store this version can read; .why says what is wrong."""

    def __init__(self, why: str, aside: str = "corrupt"):
        super().__init__(why)
        self.why, self.aside = why, aside


class Prior(BaseModel):
    """What related models (same family, same unit and role, other weights) measured: a prior, never a measurement."""

    kld: float
    sigma: float = Field(description="one standard deviation: the stored errors and how much related checkpoints differ")
    sources: list[str] = Field(description="names of the related models it comes from")
    role: str = ""


def render(atom_texts: list[str]) -> str:
    body = "\n".join(atom_texts)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return (f"; quantloop knowledge store: OpenCog Hyperon MeTTa atoms, one per line\n(KnowledgeVersion {FORMAT_VERSION})\n"
            + (body + "\n" if body else "") + f'(KnowledgeEnd {len(atom_texts)} "{digest}")\n')


def parse_store(text: str, space: ShardedSpace) -> list[Atom]:
    """The atoms of a store file's text, or StoreUnreadable naming what is wrong."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(";")]
    if not lines or not lines[0].startswith("(KnowledgeVersion "):
        raise StoreUnreadable("no (KnowledgeVersion N) line: not a quantloop knowledge store")
    version = lines[0][len("(KnowledgeVersion "):].rstrip(")").strip()
    if version != str(FORMAT_VERSION):
        raise StoreUnreadable(f"written by format version {version}, this quantloop reads version {FORMAT_VERSION}", "incompatible")
    if not lines[-1].startswith("(KnowledgeEnd "):
        raise StoreUnreadable("truncated: no (KnowledgeEnd ...) line at the end")
    body = lines[1:-1]
    try:
        end = space.parse(lines[-1])[0].get_children()
        count, digest = int(str(end[1])), str(end[2]).strip('"')
    except Exception:  # noqa: BLE001 — any parse failure of the end line is a damaged file
        raise StoreUnreadable("damaged (KnowledgeEnd ...) line") from None
    if count != len(body) or hashlib.sha256("\n".join(body).encode()).hexdigest() != digest:
        raise StoreUnreadable(f"damaged: {len(body)} atom lines where the end line promises {count}, or their checksum differs")
    try:
        atoms = space.parse("\n".join(body))
    except Exception as e:  # noqa: BLE001 — hyperon's parser raises SyntaxError and others
        raise StoreUnreadable(f"not valid MeTTa ({str(e)[:80]})") from None
    if len(atoms) != count or any(kind_of(a) is None for a in atoms):
        raise StoreUnreadable("holds atoms that are not one of " + ", ".join(KINDS))
    return atoms


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the store (fcntl: released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warn(line: str) -> None:
    print(f"quantloop: warning: {line}", file=sys.stderr, flush=True)


class KnowledgeStore:
    """Atoms in memory (hyperon GroundingSpaces) and the file they are loaded from and saved to."""

    def __init__(self, path: Path | None = None, enabled: bool = True, note: str = ""):
        self.path = path
        self.enabled = enabled
        self.note = note  # why the store is off, when it is
        self.space = ShardedSpace()
        self.load_s = 0.0

    # ------------------------------------------------------------------ opening and saving

    @classmethod
    def open(cls, path: str | Path | None = None, on_warning: Callable[[str], None] = warn) -> "KnowledgeStore":
        """Load the store at `path` (default SLM/knowledge/atomspace.metta; a missing file is an empty store). An
        unreadable one is renamed aside with one warning line, and the store returned is off."""
        path = Path(path) if path else default_path()
        store = cls(path)
        t0 = time.perf_counter()
        try:
            with locked(path):
                try:
                    atoms = store._read_disk()
                except StoreUnreadable as e:
                    aside = store._set_aside(e)
                    on_warning(f"{path}: {e.why}; kept aside as {aside.name}; this run goes on without memory")
                    return cls(path, enabled=False, note=f"store unreadable ({e.why}), kept aside as {aside}")
        except OSError as e:  # a read-only or full file system, missing permissions: no memory, the run goes on
            on_warning(f"{path}: {e.strerror or e}; this run goes on without memory")
            return cls(path, enabled=False, note=f"store not accessible ({e.strerror or e})")
        for a in atoms:
            store.space.add(a, parsed=True)
        store.load_s = time.perf_counter() - t0
        return store

    @classmethod
    def off(cls, note: str = "memory turned off") -> "KnowledgeStore":
        return cls(None, enabled=False, note=note)

    def _read_disk(self) -> list[Atom]:
        if self.path is None or not self.path.is_file():
            return []
        try:
            text = self.path.read_text()
        except UnicodeDecodeError:
            raise StoreUnreadable("not text") from None
        return parse_store(text, self.space)

    def _set_aside(self, e: StoreUnreadable) -> Path:
        aside = self.path.with_name(f"{self.path.name}.{e.aside}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        os.replace(self.path, aside)
        return aside

    def save(self) -> None:
        """Merge with the file as it is now (other runs' atoms kept), then write it atomically, under the lock. When
        the file system refuses, one warning line and the store is off for the rest of the run."""
        if not self.enabled or self.path is None:
            return
        try:
            self._save()
        except OSError as e:
            warn(f"{self.path}: cannot write the knowledge store ({e.strerror or e}); this run goes on without memory")
            self.enabled, self.note = False, f"store not writable ({e.strerror or e})"

    def _save(self) -> None:
        with locked(self.path):
            try:
                disk = self._read_disk()
            except StoreUnreadable as e:  # damaged since it was loaded: keep it aside, never overwrite it
                aside = self._set_aside(e)
                warn(f"{self.path}: {e.why}; kept aside as {aside.name}; writing this run's atoms to a new store")
                disk = []
            merged = ShardedSpace(disk, parsed=True)
            for a in self.space.atoms():
                merged.add(a, parsed=True)
            write_text_atomic(self.path, render(list(merged.texts())))
            self.space = merged

    def forget(self, model: str) -> int:
        """Remove every atom of the models whose name or digest is `model`, from memory and from the file. The count removed."""
        digests = {m.digest for m in self.models() if model in (m.name, m.digest)}
        if not digests or self.path is None:
            return 0
        with locked(self.path):
            try:
                disk = ShardedSpace(self._read_disk(), parsed=True)
            except StoreUnreadable:
                disk = ShardedSpace()
            for a in self.space.atoms():
                disk.add(a, parsed=True)
            removed = disk.remove_where(lambda a: str(a.get_children()[1]).strip('"') not in digests)
            write_text_atomic(self.path, render(list(disk.texts())))
            self.space = disk
        return removed

    # ------------------------------------------------------------------ the interface

    def put(self, fact: AnyFact) -> bool:
        """Add one fact; False when the store is off or holds it already."""
        return self.enabled and self.space.add(to_atom(fact))

    def query(self, pattern: Atom | str) -> list[Atom]:
        """The atoms matching a MeTTa pattern, e.g. '(Measurement $d $u "ffn_down" $l "Q2_K" $t $tv $k)'."""
        return self.space.query(pattern) if self.enabled else []

    def facts(self, kind: str, **fields) -> list[AnyFact]:
        """The records of one kind whose fields equal the given values (a pattern with the rest as variables)."""
        if kind not in FIELDS:
            raise ValueError(f"no atom kind {kind}: one of {', '.join(KINDS)}")
        unknown = set(fields) - set(FIELDS[kind])
        if unknown:
            raise ValueError(f"{kind} has no field {sorted(unknown)[0]}")
        pattern = E(S(kind), *[ValueAtom(fields[f]) if f in fields else V(f) for f in FIELDS[kind]])
        return [from_atom(a) for a in self.query(pattern)]

    def models(self, family: str | None = None) -> list[ModelFact]:
        return self.facts("Model", **({"family": family} if family else {}))

    def related(self, model: ModelFact) -> list[ModelFact]:
        """The other checkpoints of the model's family (other weights): where priors come from."""
        return [m for m in self.models(model.family) if m.digest != model.digest]

    def measured(self, model: ModelFact, text: str) -> dict[tuple[str, str], MeasurementFact]:
        """This model's own stored measurements on this text: (unit, type) -> measurement."""
        return {(f.unit, f.type): f for f in self.facts("Measurement", digest=model.digest, text=text)}

    def priors(self, model: ModelFact, text: str | None = None) -> dict[tuple[str, str], Prior]:
        """(unit, type) -> prior from the related models of the family, the same unit and tensor role, preferring
        measurements on the same text. A measurement of another digest is only ever a prior."""
        found: dict[tuple[str, str, str], list[tuple[str, MeasurementFact]]] = {}
        for m in self.related(model):
            for f in self.facts("Measurement", digest=m.digest):
                found.setdefault((f.unit, f.role, f.type), []).append((m.name, f))
        out = {}
        for (unit, role, typ), got in found.items():
            same_text = [g for g in got if g[1].text == text]
            out[(unit, typ)] = combine(same_text or got, role)
        return out

    def prior(self, model: ModelFact, unit: str, role: str, typ: str, text: str | None = None) -> Prior | None:
        """The prior for one unit at one type: only from the same family and the same tensor role."""
        p = self.priors(model, text).get((unit, typ))
        return p if p is not None and p.role == role else None

    def stats(self) -> dict:
        counts = Counter(kind_of(a) for a in self.space.atoms())
        return {"path": str(self.path) if self.path else None, "enabled": self.enabled, "note": self.note,
                "atoms": len(self.space), "by_kind": {k: counts.get(k, 0) for k in KINDS}, "shards": self.space.shards,
                "file_bytes": self.path.stat().st_size if self.path and self.path.is_file() else 0, "load_s": self.load_s}


def combine(got: list[tuple[str, MeasurementFact]], role: str) -> Prior:
    """One prior from the related models' measurements: their mean, with a sigma from their stored errors, their
    spread, and at least RELATED_SPREAD of the value (one related checkpoint says nothing of how checkpoints differ)."""
    klds = [f.kld for _, f in got]
    mean = sum(klds) / len(klds)
    err2 = sum((f.stderr or 0.0) ** 2 for _, f in got) / len(got) ** 2
    spread = math.sqrt(sum((k - mean) ** 2 for k in klds) / (len(klds) - 1)) if len(klds) > 1 else 0.0
    sigma = math.sqrt(err2 + max(spread, RELATED_SPREAD * abs(mean)) ** 2)
    return Prior(kld=mean, sigma=sigma, sources=sorted({n for n, _ in got}), role=role)
