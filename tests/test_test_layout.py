"""The tests' own shape: no test module imports another test module (what two of them share lives in conftest.py
or a *_helpers.py module), and no helper module holds a test, which pytest would never collect there."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """What `source` imports, anywhere in it, from a test module (test_*, tests.test_*, .test_*) or that is one
    (from tests import test_x; a test function imported by name is collected a second time), in order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module] + [f"{module.rstrip('.')}.{a.name}".lstrip(".") for a in node.names]
        else:
            continue
        found += [n.lstrip(".") for n in names if n.split(".")[-1].startswith("test_")]
    return list(dict.fromkeys(found))


def test_no_test_module_imports_another_test_module():
    offenders = {p.name: imported_test_modules(p.read_text()) for p in sorted(TESTS.glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_helper_modules_hold_no_tests():
    helpers = [p for p in sorted(TESTS.glob("*.py")) if not p.name.startswith("test_")]
    assert {p.name for p in helpers} >= {"conftest.py", "cli_helpers.py"}
    tests = {p.name: [n.name for n in ast.parse(p.read_text()).body
                      if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name.lower().startswith("test")]
             for p in helpers}
    assert {name: found for name, found in tests.items() if found} == {}


def test_the_checker_finds_every_form_of_a_test_module_import():
    planted = ("import test_a\nimport numpy as np\nfrom test_b import f\nfrom tests.test_c import g\nfrom . import test_d\n"
               "from .test_e import h\nfrom tests import test_g\nfrom cli_helpers import run_cli\n"
               "def f():\n    import tests.test_f as t\n")
    assert imported_test_modules(planted) == ["test_a", "test_b", "tests.test_c", "test_d", "test_e", "tests.test_g",
                                              "tests.test_f"]
    assert imported_test_modules("from testing_helpers import x\nfrom tests.cli_helpers import run_cli\nimport pytest\n") == []
