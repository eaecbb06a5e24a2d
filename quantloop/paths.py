"""Where quantloop keeps things. Everything is relative to the project root or overridable."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SLM_DIR = Path(os.environ.get("QUANTLOOP_SLM_DIR", PROJECT_ROOT / "SLM"))
DATASETS_DIR = SLM_DIR / "datasets"
CHECKPOINTS_DIR = SLM_DIR / "models" / "checkpoints"
QUANTIZED_DIR = SLM_DIR / "models" / "quantized"
BENCHMARKS_DIR = SLM_DIR / "benchmarks"  # installed benchmark tasks (quantloop prepare --benchmarks)
SPECS_DIR = PROJECT_ROOT / "specs" if (PROJECT_ROOT / "specs").is_dir() else Path(__file__).resolve().parent / "default_specs"  # a wheel install: its copy of specs/
CACHE_DIR = Path(os.environ.get("QUANTLOOP_CACHE", Path.home() / ".cache" / "quantloop"))

DEFAULT_MODEL_NAME = "smollm2-135m"
DEFAULT_MODEL_DIR = CHECKPOINTS_DIR / DEFAULT_MODEL_NAME
OFFGRID_MODEL_NAME = "smollm2-135m-offgrid"
OFFGRID_MODEL_DIR = CHECKPOINTS_DIR / OFFGRID_MODEL_NAME


def default_model_dir() -> Path:
    """The model every command works on by default: the off-grid twin when it is prepared (quality on the
    grid-aligned reference is flattered, see the README's honesty rule), else the reference."""
    return OFFGRID_MODEL_DIR if (OFFGRID_MODEL_DIR / "config.json").is_file() else DEFAULT_MODEL_DIR
