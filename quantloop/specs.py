"""Load and validate the YAML specifications in specs/."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from quantloop.errors import InputError
from quantloop.paths import SPECS_DIR
from quantloop.schemas import QualitySpec

DEFAULT_SPEC = SPECS_DIR / "acceptance.yaml"


def load_yaml_model(path: str | Path, model_cls):
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "spec file not found", "pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML: {str(e).splitlines()[0]}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a YAML mapping at the top level", "see specs/acceptance.yaml")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise InputError(path, f"field '{field}': {err['msg']}", "see specs/acceptance.yaml for the expected fields") from None


def load_quality_spec(path: str | Path | None = None) -> QualitySpec:
    return load_yaml_model(path or DEFAULT_SPEC, QualitySpec)
