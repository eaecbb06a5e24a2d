"""Each method's settings model: every shipped spec and every spec an earlier run wrote loads with the same tag, a field
of another method is refused with one line, and the list of methods is the same everywhere it is used."""

import re
from pathlib import Path

import pytest
import yaml

from quantloop.errors import InputError
from quantloop.schemas import METHODS, parse_spec, quant_spec

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = {"source": "dataset", "dataset_dir": None, "mix": [], "split": "calibration", "samples": 128, "seqlen": 512, "seed": 0}
# Every field of the one flat spec all methods shared, at its default: what every quantization_config.json of an
# earlier run holds under "spec", whatever its method.
FLAT = {"method": None, "bits": 4, "group_size": 128, "symmetric": True, "act_order": False, "gguf_type": None,
        "gguf_tensor_types": {}, "imatrix": False, "preset": None, "layer_types": {}, "calibration": CALIBRATION,
        "skip_modules": ["lm_head"], "overrides": {}, "min_size_ratio": None, "qat_steps": 200, "qat_init": "teacher",
        "qat_max_minutes": None, "seed": 0}
# (the fields that differ from FLAT, the tag the flat spec gave)
EARLIER_RUNS = [
    ({"method": "gguf", "group_size": 32, "gguf_type": "Q4_K_M"}, "gguf-q4_k_m"),
    ({"method": "gguf", "gguf_type": "IQ4_NL", "imatrix": True,
      "calibration": CALIBRATION | {"source": "synthetic", "samples": 64, "seqlen": 256}}, "gguf-iq4_nl-imat-synth"),
    ({"method": "gguf", "preset": "arch-default", "layer_types": {"feed_forward": "Q5_1"}}, "gguf-arch-default-mix"),
    ({"method": "rtn", "group_size": 32, "symmetric": False, "gguf_type": "Q4_1"}, "rtn-w4g32-asym"),
    ({"method": "gptq", "group_size": 64, "act_order": True}, "gptq-w4g64"),
    ({"method": "gptq", "act_order": True, "gguf_type": "IQ4_NL", "min_size_ratio": 3.5,
      "calibration": CALIBRATION | {"samples": 256}}, "gptq-iq4_nl-act-x3.5"),
    ({"method": "awq", "group_size": 32, "gguf_type": "Q4_0"}, "awq-w4g32"),
    ({"method": "autoround", "group_size": 32, "gguf_type": "Q4_K_M", "skip_modules": ["lm_head", "model.layers.0.mlp"]},
     "autoround-w4g32"),
    ({"method": "qat", "gguf_type": "Q4_0", "min_size_ratio": 3.5, "qat_steps": 44, "qat_init": "gptq", "qat_max_minutes": 20.0},
     "qat-q4_0-s44-m20-from-gptq-x3.5"),
    ({"method": "qat", "preset": "arch-default", "qat_steps": 2, "calibration": CALIBRATION | {"source": "synthetic"}},
     "qat-arch-default-s2-synth"),
]
# the tag of every spec in the shipped policies, as the flat spec gave them
SHIPPED_TAGS = {
    "specs/policy.yaml": {"cpu.int4-qat-iq4nl": "qat-mix-s200-from-gptq-x3.5", "cpu.int4-awq": "awq-w4g32-asym",
                          "cpu.int8-gguf-q8_0": "gguf-q8_0", "cpu.int4-gptq-4x-calib": "gptq-mix-act-x3.5",
                          "cuda.int4-gptq-g128": "gptq-w4g128", "cuda.int4-awq": "awq-w4g128", "cuda.int8-gptq": "gptq-w8g128",
                          "cuda.int4-gptq-4x-calib": "gptq-w4g128", "cuda.qat-int4": "qat-q4_0-s200"},
    "examples/policy-search.yaml": {"cpu.int8-gguf-q8_0": "gguf-q8_0"},
}


@pytest.mark.parametrize("fields, tag", EARLIER_RUNS, ids=[t for _, t in EARLIER_RUNS])
def test_a_spec_an_earlier_run_wrote_loads_with_the_same_tag(fields, tag):
    spec = parse_spec(FLAT | fields)
    assert spec.method == fields["method"] and spec.tag() == tag
    assert parse_spec(spec.model_dump(mode="json")) == spec  # and its own dump loads back to the same spec


def test_every_shipped_policy_spec_keeps_its_tag():
    from quantloop.agents.policy import load_policy
    from quantloop.specs import load_quality_spec

    shipped = sorted(p.relative_to(ROOT).as_posix() for d in ("specs", "examples") for p in (ROOT / d).glob("*.yaml")
                     if "steps" in (yaml.safe_load(p.read_text()) or {}))
    assert shipped == sorted(SHIPPED_TAGS)
    for path in {p for d in ("specs", "examples") for p in (ROOT / d).glob("*.yaml")} - {ROOT / p for p in shipped}:
        load_quality_spec(path)  # the others are acceptance specs, and load
    for path, tags in SHIPPED_TAGS.items():
        policy, _ = load_policy(ROOT / path)
        got = {f"{t}.{s.name}": s.spec.tag() for t, steps in policy.steps.items() for s in steps if s.spec is not None}
        assert got == tags, path


@pytest.mark.parametrize("fields, problem", [
    ({"method": "awq", "act_order": True}, "act-order is a GPTQ option; AWQ has none"),
    ({"method": "gguf", "min_size_ratio": 3.5}, "min_size_ratio applies to methods gptq and qat writing a GGUF type, not gguf"),
    ({"method": "rtn", "overrides": {"q_proj": {"bits": 8}}}, "RTN does not apply per-module 'overrides'"),
    ({"method": "gguf", "skip_modules": ["model.layers.0"]}, "llama.cpp quantization does not apply 'skip_modules'"),
    ({"method": "awq", "gguf_tensor_types": {"attn_v": "Q8_0"}}, "AWQ does not apply per-tensor GGUF types"),
    ({"method": "gguf", "qat_steps": 50}, "'qat_steps' is a setting of method qat, not of gguf"),
    ({"method": "rtn", "preset": "arch-default"}, "'preset' is a setting of method gguf, gptq or qat, not of rtn"),
])
def test_a_field_of_another_method_with_a_value_is_one_error_line(fields, problem):
    with pytest.raises(InputError, match=re.escape(problem)) as e:
        parse_spec(FLAT | fields)
    assert "\n" not in str(e.value) and "(" in str(e.value)  # what, and what to do
    with pytest.raises(InputError, match=re.escape(problem)):
        quant_spec(**fields)


def test_an_unknown_field_is_still_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        quant_spec(method="gguf", gguf_typ="Q8_0")


def test_the_methods_are_listed_once():
    from quantloop.backends.base import REGISTRY, methods
    from quantloop.gguf.architectures import STEPS
    from quantloop.pipelines.cli import build_parser
    from quantloop.schemas import QuantMethod, QuantSpec
    from quantloop.tools.catalog import TOOLS

    union = [m.model_fields["method"].default for m in QuantSpec.__origin__.__args__]
    assert list(METHODS) == union == list(QuantMethod.__args__) == list(REGISTRY) == [s for s in STEPS if s != "offgrid"]
    assert methods() == sorted(METHODS)
    quantize = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions if a.dest == "method")
    assert list(quantize.choices) == list(METHODS)
    entry = next(t for t in TOOLS if t.name == "quantize_model")
    assert f"({', '.join(METHODS)})" in entry.description


def test_uses_calibration_is_what_the_backends_need():
    """One answer to 'does this method calibrate', from what its backend needs: QAT and GGUF with an importance
    matrix calibrate; RTN and plain GGUF do not."""
    from quantloop.backends.base import Backend

    calibrated = {"gptq", "awq", "autoround", "qat"}
    for method in METHODS:
        spec = quant_spec(method=method, gguf_type="Q4_0")
        assert spec.uses_calibration() == (method in calibrated) == (Backend().needs(spec).calibration is not None)
    assert quant_spec(method="gguf", gguf_type="Q4_0", imatrix=True).uses_calibration()


def test_a_backend_with_its_own_settings_is_one_class_and_one_registry_line(tiny_prepared, tmp_path):
    """A quantizer beside the built-in ones: its settings model and its backend, registered with one call; quantize_model,
    the result record and the tool request accept its spec, and nothing else changes."""
    import shutil
    from typing import ClassVar, Literal

    from pydantic import ValidationError

    from quantloop.backends.base import Backend, BackendOutput, register, unregister
    from quantloop.schemas import Needs, QuantizationResult, SpecBase
    from quantloop.tools.catalog import QuantizeRequest
    from quantloop.tools.quantize import quantize_model

    class CopySpec(SpecBase):
        label: ClassVar[str] = "copy"
        method: Literal["copy"] = "copy"
        suffix: str = "plain"

        def needs(self) -> Needs:
            return Needs(f16_gguf=True)

        def tag(self) -> str:
            return f"copy-{self.suffix}"

    class CopyBackend(Backend):
        method, settings = "copy", CopySpec

        def quantize(self, job) -> BackendOutput:
            dst = job.work_dir / job.gguf_name()
            shutil.copyfile(job.model.gguf, dst)
            return BackendOutput(dst, "gguf:F16")

    backend = register(CopyBackend())
    try:
        spec = quant_spec(method="copy", suffix="x")
        assert isinstance(spec, CopySpec) and not spec.uses_calibration()
        result = quantize_model(tiny_prepared, tmp_path / "copy", spec)
        assert result.spec == spec and Path(result.model_path).name.endswith("-copy-x.gguf")
        assert QuantizationResult.model_validate(result.model_dump(mode="json")).spec == spec
        assert QuantizeRequest(checkpoint="m", spec={"method": "copy", "suffix": "y"}).spec.tag() == "copy-y"
        with pytest.raises(InputError, match="'imatrix' is a setting of method gguf, not of copy"):
            quant_spec(method="copy", imatrix=True)
    finally:
        unregister(backend)
    with pytest.raises(ValidationError, match="Input should be 'gguf', 'rtn', 'gptq', 'awq', 'autoround' or 'qat'"):
        quant_spec(method="copy")  # gone with its backend


def test_every_registry_entry_loads_a_backend():
    from quantloop.backends.base import REGISTRY, Backend, _load

    for method, refs in REGISTRY.items():
        assert refs and all(isinstance(_load(ref), Backend) for ref in refs), method
