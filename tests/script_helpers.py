"""Loading a script of the repository (scripts/, examples/) as a module, for the tests that call its functions."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """The module of ROOT/relative_path, executed afresh (its caches empty)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
