"""The one error type for bad input: names the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input. The CLI prints it as one line and exits with code 2."""

    def __init__(self, path: str | Path | None, problem: str, fix: str = ""):
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        fix = f" ({self.fix})" if self.fix else ""
        return f"{where}{self.problem}{fix}"
