"""A data folder laid out like SLM/, the root the MCP server is confined to (shared by the MCP server tests)."""

import shutil
from pathlib import Path

from spec_helpers import tiny_spec


def make_root(root: Path, tiny_prepared: Path, dataset_dir: Path) -> Path:
    """A data folder laid out like SLM/: the tiny model, the dataset and an acceptance spec."""
    shutil.copytree(tiny_prepared, root / "models" / "checkpoints" / "tiny")
    shutil.copytree(dataset_dir, root / "datasets" / "shakespeare")
    tiny_spec(root / "acceptance.yaml")
    return root
