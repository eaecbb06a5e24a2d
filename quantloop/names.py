"""Names a user gives that become parts of paths: run ids, model names, dataset names, `prepare --name`.

One rule for all of them (docs/run-safety.md): 1 to 64 characters, ASCII letters, digits, '-', '_' and '.',
starting with a letter or a digit (so never '.', '..', a hidden name or an option). A name is checked once, where
an entry point first receives it (`quantloop run`/`report`, run_pipeline, write_run_report, prepare_model,
prepare_text, the plan's output folders), before any work; and every path built from one is checked to stay under
its root after resolving '..' and symbolic links.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantloop.errors import InputError

NAME_MAX = 64
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RULE = f"1 to {NAME_MAX} ASCII letters, digits, '-', '_' or '.', starting with a letter or digit"


def check_name(name: str, what: str = "name", fix: str = "") -> str:
    """`name` when it follows the safe-name rule, else one InputError line saying what is wrong."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        shown = repr(name) if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:40]!r}... ({len(str(name))} characters)"
        raise InputError(None, f"{what} {shown} is not a safe name: use {RULE}", fix or f"pass another {what}")
    return name


def check_run_id(run_id: str) -> str:
    """A run id names the run's folders, its LangGraph thread and its MLflow runs: the safe-name rule."""
    return check_name(run_id, "run id", "pass a run id such as 20250101-120000-ab12cd or my-run.2")


def under(root: str | Path, *parts: str, what: str = "path") -> Path:
    """root/part/... resolved ('..' and symbolic links followed), refused unless it stays under root."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise InputError(path, f"{what} lies outside its folder {base}", "pass a name without '/' or '..'")
    return path


def named_under(root: str | Path, name: str, what: str) -> Path:
    """root/name for a user-given name: the name checked, and the path checked to stay under root."""
    return under(root, check_name(name, what), what=what)
