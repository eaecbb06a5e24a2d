"""Bad input: one line on stderr naming the file and the problem, exit code 2, nothing half-written."""

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli  # noqa: E402

from quantloop.data.datasets import prepare_text
from quantloop.errors import InputError
from quantloop.pipelines.cli import main


def test_missing_path(capsys, tmp_path):
    missing = tmp_path / "nope"
    assert_one_line_error(*run_cli(capsys, "evaluate", missing), missing, "not found")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(*run_cli(capsys, "evaluate", tmp_path), tmp_path, "not a model")


def test_file_that_is_not_a_model(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    assert_one_line_error(*run_cli(capsys, "validate", f), f, "not a model")


def test_corrupt_safetensors(capsys, tiny_copy):
    (tiny_copy / "tiny-f16.gguf").unlink()
    (tiny_copy / "quantloop_model.json").unlink()
    w = tiny_copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy, "--no-speed"), w, "safetensors")


def test_garbage_safetensors_header(capsys, tiny_copy):
    (tiny_copy / "tiny-f16.gguf").unlink()
    (tiny_copy / "quantloop_model.json").unlink()
    w = tiny_copy / "model.safetensors"
    w.write_bytes(b"\xff" * 100)
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy), w, "corrupt safetensors")


def test_corrupt_gguf(capsys, tiny_copy, tmp_path):
    g = tmp_path / "broken.gguf"
    data = (tiny_copy / "tiny-f16.gguf").read_bytes()
    g.write_bytes(data[:4] + b"\x07\x00\x00\x00" + b"\xff" * 200)
    assert_one_line_error(*run_cli(capsys, "validate", g, "--base", tiny_copy), g, "GGUF")


def test_not_a_gguf(capsys, tmp_path):
    g = tmp_path / "fake.gguf"
    g.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_one_line_error(*run_cli(capsys, "validate", g), g, "not a GGUF file")


def test_architecture_transformers_cannot_load(capsys, tiny_copy):
    (tiny_copy / "tiny-f16.gguf").unlink()
    (tiny_copy / "quantloop_model.json").unlink()
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy, "--no-speed"), tiny_copy, "transformers cannot load")


def test_architecture_llama_cpp_cannot_load(capsys, tmp_path, tiny_copy):
    import numpy as np
    from gguf import GGUFWriter

    g = tmp_path / "odd.gguf"
    w = GGUFWriter(str(g), "no-such-arch")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(*run_cli(capsys, "validate", g, "--base", tiny_copy), g, "no-such-arch")


def test_invalid_spec_names_the_field(capsys, tmp_path, tiny_copy):
    spec = tmp_path / "spec.yaml"
    spec.write_text("acceptance:\n  max_ppl_increase_pct: -1\ngeneration:\n  prompts: [a]\n")
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy, "--spec", spec), spec, "acceptance.max_ppl_increase_pct")


def test_empty_and_too_short_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="no text|too little"):
        prepare_text(tmp_path / "empty.txt", "empty", tmp_path / "out")
    (tmp_path / "short.txt").write_text("Just a few words.\n\nAnd a few more.")
    with pytest.raises(InputError, match="too little text"):
        prepare_text(tmp_path / "short.txt", "short", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_prepare_with_too_short_text(capsys, tmp_path, reference_dir):
    (tmp_path / "short.txt").write_text("Just a few words.")
    code, lines = run_cli(capsys, "prepare", "--text", tmp_path / "short.txt", "--dataset", "pytest-short")
    assert_one_line_error(code, lines, "short.txt", "too little text")
    from quantloop.paths import DATASETS_DIR

    assert not (DATASETS_DIR / "pytest-short").exists()
    assert not list(DATASETS_DIR.glob(".pytest-short*"))


def test_test_split_overlapping_calibration(capsys, tmp_path, dataset_dir, tiny_copy):
    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    cal = (ds / "calibration.txt").read_text()
    paragraph = next(p for p in cal.split("\n\n") if len(p) > 300)
    test = ds / "test.txt"
    test.write_text(test.read_text() + "\n\n" + paragraph + "\n")
    manifest = json.loads((ds / "manifest.json").read_text())
    from quantloop.fileio import sha256_file

    manifest["splits"]["test"]["sha256"] = sha256_file(test)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy, "--dataset", ds, "--no-speed"), "test.txt", "shares")


def test_changed_split_is_refused(capsys, tmp_path, dataset_dir, tiny_copy):
    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    (ds / "test.txt").write_text("edited\n" + (ds / "test.txt").read_text())
    assert_one_line_error(*run_cli(capsys, "evaluate", tiny_copy, "--dataset", ds), "test.txt", "sha256")


def test_failed_quantize_leaves_nothing(capsys, tmp_path, tiny_copy):
    out = tmp_path / "q"
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_copy, "--type", "Q9_X", "--out", out), "Q9_X")
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
    assert main(["quantize", str(tiny_copy), "--type", "Q8_0", "--out", str(out)]) == 0
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_copy, "--type", "Q8_0", "--out", out), out, "exists")
