"""Fixed, disjoint text splits with a manifest."""

import json
import random

from quantloop.data.datasets import SPLITS, check_disjoint, prepare_text, read_split


def _write_corpus(folder, n_docs=20):
    rng = random.Random(0)
    words = "the king queen sword crown night day love death honour fool storm sea ship letter ring".split()
    folder.mkdir()
    for i in range(n_docs):
        paras = ["Document %d paragraph %d: " % (i, j) + " ".join(rng.choice(words) for _ in range(60)) for j in range(8)]
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(paras))


def test_splits_are_fixed_disjoint_and_described(tmp_path):
    _write_corpus(tmp_path / "corpus")
    a = prepare_text(tmp_path / "corpus", "a", tmp_path / "out")
    b = prepare_text(tmp_path / "corpus", "b", tmp_path / "out")
    assert {s: i.sha256 for s, i in a.splits.items()} == {s: i.sha256 for s, i in b.splits.items()}
    docs = [set(a.splits[s].documents) for s in SPLITS]
    assert sum(len(d) for d in docs) == 20 and len(set().union(*docs)) == 20
    assert a.splits["test"].documents == ["doc03.txt", "doc13.txt"]
    texts = {s: read_split(tmp_path / "out" / "a", s) for s in SPLITS}
    check_disjoint(texts, tmp_path)  # raises if any paragraph is shared
    saved = json.loads((tmp_path / "out" / "a" / "manifest.json").read_text())
    assert saved["splits"]["test"]["n_documents"] == 2


def test_jsonl_documents(tmp_path):
    lines = [json.dumps({"text": f"Record {i}. " + "word " * 400}) for i in range(30)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    m = prepare_text(tmp_path / "data.jsonl", "j", tmp_path / "out")
    assert m.splits["test"].documents[0] == "data.jsonl:4"


def test_default_splits_are_disjoint(dataset_dir):
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    docs = [set(v["documents"]) for v in manifest["splits"].values()]
    assert sum(len(d) for d in docs) == len(set().union(*docs)) == 38
    assert manifest["splits"]["test"]["n_tokens"] > 16 * 512
    check_disjoint({s: read_split(dataset_dir, s) for s in ("calibration", "validation", "test")}, dataset_dir)
