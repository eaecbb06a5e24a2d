"""The code's shape: packages import only downwards, and a quantizer is one class behind one interface."""

import json
import shutil
from pathlib import Path

import pytest
from script_helpers import load_script

from quantloop.backends.base import Backend, BackendOutput, Needs, backend_for, register, unregister
from quantloop.errors import InputError
from quantloop.schemas import CalibrationSpec, quant_spec
from quantloop.tools.quantize import quantize_model


def _import_graph():
    return load_script("scripts/import_graph.py")


def test_packages_import_only_downwards_and_form_no_cycle():
    ig = _import_graph()
    graph = ig.package_graph()
    assert {"gguf", "data", "models", "backends", "tools", "agents", "pipelines"} <= set(graph)
    assert ig.cycles(graph) == []
    assert ig.cycles(ig.package_graph(modules=True)) == []
    assert ig.upward_edges(graph) == []


def test_the_checker_finds_a_cycle_and_an_upward_import():
    ig = _import_graph()
    planted = {"gguf": {"models"}, "models": {"gguf"}, "tools": {"backends"}, "backends": set()}
    assert ig.cycles(planted) == [["gguf", "models"]]
    assert ("gguf", "models") in ig.upward_edges(planted)


class CopyF16Backend(Backend):
    """A toy quantizer: it needs calibration token sequences and the F16 GGUF, and 'quantizes' by copying it."""

    method = "rtn"  # served first while registered
    libraries = ("numpy",)
    calls: list = []

    def handles(self, spec) -> bool:
        return spec.seed == 4242

    def needs(self, spec) -> Needs:
        return Needs(f16_gguf=True, calibration="sequences", hf_checkpoint=True)

    def check(self, job) -> None:
        if job.spec.bits == 3:
            raise InputError(None, "the toy refuses 3 bits", "use 4")

    def quantize(self, job) -> BackendOutput:
        self.calls.append([len(s) for s in job.sequences])
        dst = job.work_dir / job.gguf_name()
        shutil.copyfile(job.model.gguf, dst)
        promised = {"token_embd.weight": "Q4_0"} if job.spec.bits == 5 else {}
        return BackendOutput(dst, "gguf:F16", promised)


@pytest.fixture
def toy():
    backend = register(CopyF16Backend())
    yield backend
    unregister(backend)


def test_a_registered_backend_runs_behind_quantize_model(toy, tiny_prepared, tmp_path, dataset_dir):
    spec = quant_spec(method="rtn", seed=4242, calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=3, seqlen=32))
    assert backend_for(spec) is toy
    assert type(backend_for(spec.model_copy(update={"seed": 0}))).__name__ == "RTNBackend"  # others still reach RTN
    result = quantize_model(tiny_prepared, tmp_path / "toy", spec)
    assert toy.calls[-1] == [32, 32, 32]  # calibration loaded once, as the backend asked
    assert result.format == "gguf:F16" and Path(result.model_path).parent == tmp_path / "toy"
    assert Path(result.model_path).read_bytes() == (tiny_prepared / next(p.name for p in tiny_prepared.glob("*.gguf"))).read_bytes()
    assert set(result.libraries) == {"numpy"} and result.calibration_manifest_sha256
    recorded = json.loads((tmp_path / "toy" / "quantization_config.json").read_text())
    assert recorded["quantloop"]["format"] == "gguf:F16"


def test_a_backend_refusal_or_broken_promise_leaves_nothing(toy, tiny_prepared, tmp_path, dataset_dir):
    calib = CalibrationSpec(dataset_dir=str(dataset_dir), samples=2, seqlen=32)
    with pytest.raises(InputError, match="toy refuses 3 bits"):
        quantize_model(tiny_prepared, tmp_path / "three", quant_spec(method="rtn", seed=4242, bits=3, calibration=calib))
    with pytest.raises(RuntimeError, match="planned Q4_0"):  # the file holds F16 where the toy promised Q4_0
        quantize_model(tiny_prepared, tmp_path / "five", quant_spec(method="rtn", seed=4242, bits=5, calibration=calib))
    assert list(tmp_path.iterdir()) == []


def _import_placement():
    return load_script("scripts/import_placement.py")


def test_a_function_level_import_only_defers_a_heavy_library_and_says_which():
    assert _import_placement().misplaced() == []


def test_the_placement_checker_finds_light_and_unexplained_function_imports(tmp_path):
    pkg = tmp_path / "quantloop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "light.py").write_text("import json\n")
    (pkg / "trainer.py").write_text("import torch\n")
    (pkg / "user.py").write_text(
        "def f():\n"
        "    import json\n"
        "    from quantloop.light import json as j\n"
        "    from quantloop.trainer import torch  # deferred: torch\n"
        "    from quantloop.trainer import torch as t\n"
        "    return __import__('os')\n")
    ip = _import_placement()
    ip.ROOT = pkg
    found = ip.misplaced()
    assert len(found) == 4, found
    assert "user.py:2: `import json` defers no heavy library" in found[0]
    assert "user.py:3:" in found[1] and "defers no heavy library" in found[1]
    assert "user.py:5:" in found[2] and "defers torch: say so" in found[2]
    assert "__import__()" in found[3]
