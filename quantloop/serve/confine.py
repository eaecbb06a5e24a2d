"""What a served tool call may touch: every path it names lies under the server's data folder (default SLM/),
and no two running calls write the same output.

Relative paths are taken relative to the data folder; `..` and symbolic links are resolved before the check,
so neither can lead outside it. Defaults that would point elsewhere (the dataset, the quantized-model
folder) are filled in from the data folder instead.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import BaseModel

from quantloop.errors import InputError
from quantloop.tools.catalog import ToolEntry
from quantloop.tools.quantize import default_output_dir

DEFAULT_DATASET = "shakespeare"


def get_dotted(data: dict, field: str):
    for part in field.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def set_dotted(data: dict, field: str, value) -> None:
    *parents, last = field.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confined_path(value: str, field: str, root: Path) -> Path:
    """The absolute, resolved path of `value` (relative to root when not absolute); refused outside root."""
    p = Path(value).expanduser()
    resolved = (p if p.is_absolute() else root / p).resolve()
    if not inside(resolved, root):
        raise InputError(value, f"{field} lies outside the server's data folder {root}",
                         "pass a path inside it (relative paths are taken from it)")
    return resolved


def fill_defaults(entry: ToolEntry, data: dict, root: Path) -> None:
    """Defaults that would otherwise name the project's own SLM/ folder, taken from the data folder instead."""
    if "dataset_dir" in entry.path_fields and not data.get("dataset_dir"):
        data["dataset_dir"] = str(root / "datasets" / DEFAULT_DATASET)
    if ("spec.calibration.dataset_dir" in entry.path_fields and not get_dotted(data, "spec.calibration.dataset_dir")
            and entry.request.model_validate(data).spec.uses_calibration()):
        set_dotted(data, "spec.calibration.dataset_dir", str(root / "datasets" / DEFAULT_DATASET))
    if entry.name == "quantize_model" and not data.get("output_dir"):
        data["output_dir"] = str(root / "models" / "quantized" / default_output_dir(data["checkpoint"], entry.request.model_validate(data).spec).name)
    if entry.name == "sensitivity" and not data.get("cache_dir"):  # the measurements stay with the data they were made on
        data["cache_dir"] = str(root / "cache" / "sensitivity")
    if entry.name == "knowledge" and not data.get("store"):  # the data folder's own store, as `quantloop run` on it keeps
        data["store"] = str(root / "knowledge" / "atomspace.metta")
    if entry.name == "search":  # a file-backed study or tracking store is a path like any other; servers (postgresql://) are not
        if data.get("storage") and "://" not in data["storage"]:
            data["storage"] = str(confined_path(data["storage"], "storage", root))
        uri = data.get("tracking_uri") or ""
        if uri.startswith("sqlite:///") or (uri and "://" not in uri):
            path = uri.removeprefix("sqlite:///")
            data["tracking_uri"] = uri.replace(path, str(confined_path(path, "tracking_uri", root)))


def confine_request(entry: ToolEntry, request: BaseModel, root: Path) -> BaseModel:
    """The request with every path made absolute under root and the root-relative defaults filled in."""
    root = root.resolve()
    data = request.model_dump(mode="json")
    for field in entry.path_fields:
        _confine_field(data, field.split("."), field, root)
    fill_defaults(entry, data, root)
    return entry.request.model_validate(data)


def _confine_field(data, parts: list[str], field: str, root: Path) -> None:
    """Confine the path(s) at a dotted field; 'name[]' is a list: of paths when last, else of objects."""
    if not isinstance(data, dict):
        return
    key, many = parts[0].removesuffix("[]"), parts[0].endswith("[]")
    value = data.get(key)
    if not value:
        return
    if not many:
        if len(parts) == 1:
            data[key] = str(confined_path(value, field, root))
        else:
            _confine_field(value, parts[1:], field, root)
    elif len(parts) == 1:
        data[key] = [str(confined_path(v, field, root)) for v in value]
    else:
        for item in value:
            _confine_field(item, parts[1:], field, root)


class OutputLocks:
    """The outputs running calls are writing; a call whose output is, holds or lies in one of them is refused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[Path, str] = {}

    def acquire(self, path: Path, tool: str) -> None:
        path = path.resolve()
        with self._lock:
            for held, owner in self._held.items():
                if inside(path, held) or inside(held, path):
                    raise InputError(path, f"is being written by a running {owner} call",
                                     "wait for that call to finish, or choose another output")
            self._held[path] = tool

    def release(self, path: Path) -> None:
        with self._lock:
            self._held.pop(path.resolve(), None)
