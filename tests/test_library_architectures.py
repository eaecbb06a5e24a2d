"""The library quantizers on every architecture in the table: GPTQ and AWQ through GPTQModel (exported code for code
to Q4_0 / Q4_1) and AutoRound (which writes its GGUF itself), on tiny random Llama, Qwen2, Qwen3, Gemma 3 and Phi-3
models 128 wide (k/v get 64 outputs, the multiple GPTQModel's AWQ needs), built by model_arch_helpers.
A step the table refuses on an architecture (AWQ on Gemma 3 and Phi-3) is refused in one line before any work."""

import importlib.util

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from cli_helpers import assert_one_line_error, run_cli
from model_arch_helpers import ARCHS, check_quantized_run, hf_logits, llama_logits, text_ids, tiny_models
from quantloop.gguf.architectures import ARCHITECTURES, of_config
from quantloop.schemas import CalibrationSpec, quant_spec

needs = {lib: pytest.mark.skipif(importlib.util.find_spec(lib) is None, reason=f"{lib} is not installed")
         for lib in ("gptqmodel", "auto_round")}
ARCH_OF = dict(zip(ARCHS, ARCHITECTURES))


def runs(step: str) -> list:
    """The architectures `step` runs on, as test parameters (a refused one is tested by test_a_refused_step_...)."""
    return [a for a in ARCHS if ARCH_OF[a].refusal(step) is None]


@pytest.fixture(scope="module")
def wide(tmp_path_factory, reference_dir):
    return tiny_models(tmp_path_factory.mktemp("wide-archs"), reference_dir, hidden=128)


def calibration(dataset_dir) -> CalibrationSpec:
    return CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=64)


def on_grid_logits(ckpt, gguf_type):
    """Logits on transformers of the float model a GPTQModel checkpoint stands for (its blocks, AWQ's norms)."""
    import torch

    from quantloop.backends.gptq.checkpoint import on_grid_model

    def logits(folder, ids):
        model, _ = on_grid_model(folder, ckpt, gguf_type)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    return logits


def check_blocks_read_back(arch, ckpt, folder, gguf_path, gguf_type):
    """Every quantized linear of the checkpoint (Phi-3's defused gate and up joined back) is one tensor of the GGUF,
    of `gguf_type`; the unpermuted ones (up, down) dequantize to exactly the checkpoint's weights."""
    from quantloop.backends.gptq.checkpoint import table_linears
    from quantloop.gguf.tensor_names import gguf_tensor_name

    entry = ARCH_OF[arch]
    linears = {gguf_tensor_name(q.name): q for q in table_linears(folder, of_config({"architectures": [entry.hf_class]}))}
    layers = len({name.split(".")[1] for name in linears})
    assert len(linears) == layers * len(entry.linears), sorted(linears)
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    assert {tensors[n].tensor_type.name for n in linears} == {gguf_type}
    for module in (entry.gate_up[-1], entry.down):
        name = f"blk.0.{entry.gguf_name(module)}.weight"
        t, expected = tensors[name], linears[name].dequantize().numpy()
        got = dequantize(t.data, t.tensor_type).reshape(expected.shape)
        # Q4_1 stores the offset -scale * zero in fp16: the one rounding on the way, at most a few fp16 steps
        assert np.allclose(got, expected, rtol=0, atol=0 if gguf_type == "Q4_0" else 2e-3 * np.abs(expected).max()), name


def quantize_with_gptqmodel(arch, wide, tmp_path, dataset_dir, method):
    from quantloop.tools.quantize import quantize_model

    ckpt = wide(arch)
    gguf_type = {"gptq": "Q4_0", "awq": "Q4_1"}[method]
    spec = quant_spec(method=method, bits=4, group_size=32, symmetric=method == "gptq", gguf_type=gguf_type,
                     calibration=calibration(dataset_dir))
    result = quantize_model(ckpt, tmp_path / method, spec)
    assert result.format == f"gguf:{gguf_type}" and "gptqmodel" in result.libraries
    check_blocks_read_back(arch, ckpt, tmp_path / method, result.model_path, gguf_type)
    check_quantized_run(arch, ckpt, result, on_grid_logits(ckpt, gguf_type))


@needs["gptqmodel"]
@pytest.mark.slow  # 53-97 s per architecture on a loaded 2-core machine, the model's preparation included
@pytest.mark.parametrize("arch", runs("gptq"))
def test_gptqmodel_gptq_exports_exactly_and_runs_on_llama_cpp(arch, wide, tmp_path, dataset_dir):
    quantize_with_gptqmodel(arch, wide, tmp_path, dataset_dir, "gptq")


@needs["gptqmodel"]
@pytest.mark.slow  # about a minute per architecture on a loaded 2-core machine (AWQ computes in float16)
@pytest.mark.parametrize("arch", runs("awq"))
def test_awq_exports_exactly_and_runs_on_llama_cpp(arch, wide, tmp_path, dataset_dir):
    quantize_with_gptqmodel(arch, wide, tmp_path, dataset_dir, "awq")


def relative_error(ref, logits) -> float:
    return float(np.sqrt(((logits - ref) ** 2).mean() / ((ref - ref.mean()) ** 2).mean()))


@needs["auto_round"]
@pytest.mark.parametrize("arch", runs("autoround"))
def test_autoround_gguf_runs_on_llama_cpp_close_to_transformers(arch, wide, tmp_path, dataset_dir):
    """AutoRound writes its GGUF itself (no on-grid checkpoint to compare with): every decoder linear is Q4_0, and
    llama.cpp's logits stay as close to the float model's as llama.cpp's own Q4_0 rounding of the same model."""
    from quantloop.tools.quantize import quantize_model

    ckpt = wide(arch)
    result = quantize_model(ckpt, tmp_path / "ar", quant_spec(method="autoround", gguf_type="Q4_0", calibration=calibration(dataset_dir)))
    types = {t.name: t.tensor_type.name for t in GGUFReader(result.model_path).tensors}
    linears = {n: t for n, t in types.items() if n.startswith("blk.") and t != "F32"}
    assert set(linears.values()) == {"Q4_0"} and len(linears) % len(ARCH_OF[arch].linears) == 0, linears
    plain = quantize_model(ckpt, tmp_path / "q4", quant_spec(method="gguf", gguf_type="Q4_0"))
    ids = text_ids(ckpt)
    ref = hf_logits(ckpt, ids)
    ar, rtn = (relative_error(ref, llama_logits(r.model_path, ids)) for r in (result, plain))
    assert 0.005 < ar < 1.25 * rtn, (arch, ar, rtn)  # moved by the grid, and no further than plain rounding


REFUSED = [(a, s) for a in ARCHS for s in ("gptq", "awq", "autoround") if ARCH_OF[a].refusal(s)]


@pytest.mark.parametrize("arch,step", REFUSED)
def test_a_refused_step_is_one_line_before_any_work(arch, step, prepared_tiny, tmp_path, capsys):
    reason = ARCH_OF[arch].refusal(step)
    assert f"{step} refused: {reason}" in ARCH_OF[arch].steps_line()
    code, lines = run_cli(capsys, "quantize", prepared_tiny(arch), "--method", step, "--type", "Q4_1", "--out", tmp_path / "q")
    assert_one_line_error(code, lines, f"{step} cannot quantize {ARCH_OF[arch].name}: {reason}")
    assert not (tmp_path / "q").exists()


def test_the_table_refuses_what_the_libraries_cannot_run():
    assert REFUSED == [("gemma3", "awq"), ("phi3", "awq")]


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory, reference_dir):
    return tiny_models(tmp_path_factory.mktemp("tiny-archs"), reference_dir)
