"""quantize_model on the tiny Llama: outputs reload, stay within a quantization step, and are reproducible."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantloop.errors import InputError
from quantloop.models.checkpoints import load_hf_model
from quantloop.schemas import CalibrationSpec, quant_spec
from quantloop.tools.quantize import quantize_model


def test_rtn_output_reloads_within_a_step_and_is_reproducible(tiny_prepared, tmp_path):
    spec = quant_spec(method="rtn", bits=4, group_size=32, symmetric=False)
    r1 = quantize_model(tiny_prepared, tmp_path / "a", spec)
    r2 = quantize_model(tiny_prepared, tmp_path / "b", spec)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = load_hf_model(tiny_prepared).state_dict()
    q = load_hf_model(tmp_path / "a").state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    w, wq = ref[name].view(-1, 4, 32), q[name].view(-1, 4, 32)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    assert ((w - wq).abs() <= step * 0.51 + 1e-3 * step).all()
    assert not torch.equal(w, wq)
    assert torch.equal(ref["model.norm.weight"], q["model.norm.weight"])  # norms stay float
    assert all(len(torch.unique(row)) <= 16 for row in wq.reshape(-1, 32)[:50])
    cfg = json.loads((tmp_path / "a" / "quantization_config.json").read_text())
    assert cfg["quantloop"]["spec"]["method"] == "rtn" and cfg["quantloop"]["libraries"]["torch"]
    assert r1.wall_s > 0 and r1.peak_rss_bytes > 0 and r1.bytes_on_disk == r2.bytes_on_disk


def test_gguf_method_reports_exact_bits(tiny_prepared, tmp_path):
    r = quantize_model(tiny_prepared, tmp_path / "q8", quant_spec(method="gguf", gguf_type="Q8_0"))
    assert r.format == "gguf:Q8_0" and r.model_path.endswith(".gguf")
    assert r.linear_bits_per_weight == pytest.approx(8.5)
    with pytest.raises(InputError, match="output folder exists"):
        quantize_model(tiny_prepared, tmp_path / "q8", quant_spec(method="gguf", gguf_type="Q8_0"))


def test_too_small_calibration_set_is_refused(tiny_prepared, tmp_path, dataset_dir):
    from quantloop.data.calibration import calibration_sequences
    from quantloop.models.checkpoints import load_hf_tokenizer

    with pytest.raises(InputError, match="calibration set too small"):
        calibration_sequences(CalibrationSpec(dataset_dir=str(dataset_dir), samples=100000, seqlen=512), load_hf_tokenizer(tiny_prepared))
    seqs, digest = calibration_sequences(CalibrationSpec(dataset_dir=str(dataset_dir), samples=3, seqlen=64), load_hf_tokenizer(tiny_prepared))
    assert [len(s) for s in seqs] == [64, 64, 64] and len(digest) == 16


def test_rtn_bad_group_size_leaves_nothing(tiny_prepared, tmp_path):
    with pytest.raises(InputError, match="group size 48 does not divide"):
        quantize_model(tiny_prepared, tmp_path / "bad", quant_spec(method="rtn", bits=4, group_size=48))
    assert list(tmp_path.iterdir()) == []


def test_gguf_with_imatrix_and_tensor_type_overrides(tiny_prepared, tmp_path, dataset_dir):
    from quantloop.gguf.llamacpp import read_metadata, tools_dir

    if not (tools_dir() / "llama-imatrix").is_file():
        pytest.skip("llama.cpp tools not built: run `make setup`")
    spec = quant_spec(method="gguf", gguf_type="Q4_0", imatrix=True, gguf_tensor_types={"attn_v": "q8_0"},
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=256))
    r = quantize_model(tiny_prepared, tmp_path / "q", spec)
    types = {t.name: t.type for t in read_metadata(r.model_path).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert r.calibration_manifest_sha256 and not (tmp_path / "q" / "imatrix.gguf").exists()


def test_importance_matrix_is_computed_once_per_model_and_text(tiny_prepared, tmp_path, dataset_dir, monkeypatch):
    """A second quantization with the same model and calibration text reuses the cached matrix (llama-imatrix does
    not run again); other text gets its own matrix."""
    from quantloop.backends import gguf as gguf_backend
    from quantloop.gguf.llamacpp import tools_dir

    if not (tools_dir() / "llama-imatrix").is_file():
        pytest.skip("llama.cpp tools not built: run `make setup`")
    monkeypatch.setattr(gguf_backend, "CACHE_DIR", tmp_path / "cache")  # the folder cached_imatrix writes under
    runs = []
    real = gguf_backend.compute_imatrix
    monkeypatch.setattr(gguf_backend, "compute_imatrix", lambda *a, **k: runs.append(a) or real(*a, **k))
    spec = lambda n: quant_spec(method="gguf", gguf_type="Q4_0", imatrix=True,  # noqa: E731
                               calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=n, seqlen=64))
    first = quantize_model(tiny_prepared, tmp_path / "a", spec(4))
    second = quantize_model(tiny_prepared, tmp_path / "b", spec(4))
    assert len(runs) == 1 and len(list((tmp_path / "cache" / "imatrix").glob("*.gguf"))) == 1
    assert open(first.model_path, "rb").read() == open(second.model_path, "rb").read()
    quantize_model(tiny_prepared, tmp_path / "c", spec(3))
    assert len(runs) == 2 and len(list((tmp_path / "cache" / "imatrix").glob("*.gguf"))) == 2


def test_rtn_g32_exports_to_gguf_q4_0_exactly(tiny_prepared, tmp_path):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = quantize_model(tiny_prepared, tmp_path / "q", quant_spec(method="rtn", bits=4, group_size=32, symmetric=True, gguf_type="Q4_0"))
    assert r.format == "gguf:Q4_0" and r.model_path.endswith(".gguf")
    assert r.notes == ["exact export: 15 quantized tensors read back bit for bit, 14 of them the quantizer's own codes and "
                       "scales, 1 rounded by llama.cpp's rules (embeddings)"]
    hf = load_file(tmp_path / "q" / "model.safetensors")
    t = next(t for t in GGUFReader(r.model_path).tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type.name == "Q4_0"
    deq = dequantize(t.data, t.tensor_type).reshape(hf["model.layers.1.mlp.down_proj.weight"].shape)
    assert np.array_equal(deq, hf["model.layers.1.mlp.down_proj.weight"].numpy())
    # the embedding gets what llama-quantize gives it (tied, 64 wide: Q6_K falls back to Q8_0), rounded as it rounds
    from quantloop.gguf import blocks as gb

    emb = next(t for t in GGUFReader(r.model_path).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type.name == "Q8_0"
    assert np.array_equal(np.asarray(emb.data), gb.quantize_to_bytes(hf["model.embed_tokens.weight"].numpy(), "Q8_0"))
    # the size the agents predict before quantizing (planned_export_types + estimate_bytes) is the file's, within 1 %
    from quantloop.gguf.export import planned_export_types
    from quantloop.gguf.precision_map import estimate_bytes
    from quantloop.models.checkpoints import resolve_model

    f16 = resolve_model(tiny_prepared).gguf
    planned = planned_export_types(f16, "Q4_0")
    assert {t.name: t.tensor_type.name for t in GGUFReader(r.model_path).tensors} == planned
    assert estimate_bytes(f16, planned)["bytes"] == pytest.approx(Path(r.model_path).stat().st_size, rel=0.01)
    with pytest.raises(InputError, match="no exact GGUF Q4_0 form"):
        quantize_model(tiny_prepared, tmp_path / "bad", quant_spec(method="rtn", bits=4, group_size=64, gguf_type="Q4_0"))


def test_gptq_g32_exports_its_codes_to_gguf_q4_0(tiny_prepared, tmp_path, dataset_dir):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantloop.backends.gptq.checkpoint import read_quantized_linear

    spec = quant_spec(method="gptq", bits=4, group_size=32, symmetric=True, gguf_type="Q4_0",
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=8, seqlen=128))
    r = quantize_model(tiny_prepared, tmp_path / "q", spec)
    assert r.format == "gguf:Q4_0" and r.calibration_manifest_sha256
    expected = read_quantized_linear(tmp_path / "q", "model.layers.0.mlp.down_proj").dequantize().numpy()
    t = next(t for t in GGUFReader(r.model_path).tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_0"
    assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(expected.shape), expected)
    assert "14 of them the quantizer's own codes" in r.notes[0]


def test_read_back_refuses_a_file_that_differs_from_the_blocks(tiny_prepared, tmp_path):
    import numpy as np
    from gguf import GGUFReader

    from quantloop.gguf.export import read_back

    r = quantize_model(tiny_prepared, tmp_path / "q", quant_spec(method="rtn", bits=8, group_size=32, gguf_type="Q8_0"))
    raw = {t.name: np.array(t.data) for t in GGUFReader(r.model_path).tensors if t.tensor_type.name == "Q8_0"}
    assert len(read_back(Path(r.model_path), raw)) == len(raw) == 15
    raw["blk.0.ffn_up.weight"].reshape(-1)[5] ^= 1  # one bit of one code
    with pytest.raises(RuntimeError, match="blk.0.ffn_up.weight as written differs"):
        read_back(Path(r.model_path), raw)


def test_export_gguf_command_writes_the_rtn_grid_and_refuses_a_wrong_type(tiny_prepared, tmp_path, capsys):
    """`quantloop export-gguf`: an RTN g32 asymmetric checkpoint becomes Q4_1 code for code; Q4_0 (symmetric) is refused."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantloop.pipelines.cli import main

    quantize_model(tiny_prepared, tmp_path / "rtn", quant_spec(method="rtn", bits=4, group_size=32, symmetric=False))
    out = tmp_path / "rtn.gguf"
    assert main(["export-gguf", str(tmp_path / "rtn"), "--type", "Q4_1", "--out", str(out)]) == 0
    hf = load_file(tmp_path / "rtn" / "model.safetensors")
    t = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.attn_output.weight")
    assert t.tensor_type.name == "Q4_1"
    np.testing.assert_allclose(dequantize(t.data, t.tensor_type), hf["model.layers.0.self_attn.o_proj.weight"].numpy(), rtol=2**-11, atol=0)
    capsys.readouterr()
    assert main(["export-gguf", str(tmp_path / "rtn"), "--type", "Q4_0", "--out", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Q4_0" in err and not (tmp_path / "bad.gguf").exists()
    assert main(["export-gguf", str(tmp_path / "rtn"), "--type", "Q4_1", "--out", str(out)]) == 2  # exists


def test_default_group_size_fits_the_model(tiny_prepared, reference_dir):
    from quantloop.pipelines.cli import build_parser, default_group_size

    def group(*args):
        return default_group_size(build_parser().parse_args(["quantize", *map(str, args)]))

    assert group(reference_dir, "--method", "gptq") == 64  # 128 does not divide SmolLM2's 576-wide rows
    assert group(tiny_prepared, "--method", "rtn") == 64  # the tiny Llama is 64 wide
    assert group(reference_dir, "--method", "gptq", "--type", "Q4_0") == 32  # a GGUF block
    assert group(reference_dir, "--method", "gptq", "--group-size", "128") == 128  # what the user asked


def test_llama_cpp_fallbacks_are_one_note_with_the_full_log(tiny_prepared, tmp_path):
    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.models.checkpoints import resolve_model

    LlamaCppRunner(resolve_model(tiny_prepared).gguf)  # a quiet Llama earlier in the process must not silence the log
    r = quantize_model(tiny_prepared, tmp_path / "q4k", quant_spec(method="gguf", gguf_type="Q4_K_S"))
    [note] = r.notes
    assert "tensors fell back to another type" in note and "q5_0" in note
    log = (tmp_path / "q4k" / "llama-quantize.log").read_text()
    assert log.count("converting to q5_0") + log.count("converting to q5_1") == int(note.split()[0]) > 0


def test_commands_default_to_the_off_grid_twin_when_it_is_prepared(monkeypatch, tmp_path):
    import quantloop.paths as paths
    from quantloop.pipelines.cli import build_parser, fill_default_models

    twin = tmp_path / "twin"
    monkeypatch.setattr(paths, "OFFGRID_MODEL_DIR", twin)

    def defaults():
        q, v = build_parser().parse_args(["quantize"]), build_parser().parse_args(["validate", "x.gguf"])
        fill_default_models(q)
        fill_default_models(v)
        return q.model, v.base

    assert defaults() == (str(paths.DEFAULT_MODEL_DIR),) * 2  # no twin prepared: the reference
    twin.mkdir()
    (twin / "config.json").write_text("{}")
    assert defaults() == (str(twin),) * 2
