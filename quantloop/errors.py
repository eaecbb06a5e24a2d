"""The one error type for bad input: names the file, the problem and the fix."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import shutil
import sys
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


def crash_line(e: Exception, limit: int = 300) -> str:
    """One line for an unexpected exception: its type and the first line of its message (at most `limit` characters)."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


OS_FIXES = {
    errno.EROFS: "write to a writable file system (--out, or QUANTLOOP_SLM_DIR for the run's outputs)",
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.EACCES: "check the permissions of the folder",
    errno.EPERM: "check the permissions of the folder",
    errno.ENOENT: "create the parent folder or fix the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder: give a file name",
}


def os_error_line(e: OSError) -> str:
    """One line for a failure of the machine rather than of the model: the path, the OS error and what to do."""
    where = e.filename or "(unknown path)"
    reason = e.strerror or str(e)
    fix = OS_FIXES.get(e.errno, "check the path and the disk")
    if e.errno == errno.EEXIST and e.filename and Path(e.filename).is_file():  # mkdir of a folder where a file is
        reason, fix = "is a file, not a folder", "a part of the output path is a file: fix the path"
    return f"{where}: {reason} (OS error {e.errno}; {fix})"


def disk_full(folder: str | Path, needed_bytes: int) -> OSError | None:
    """An ENOSPC OSError naming `folder` when it has less than `needed_bytes` free, else None (for tools that fail
    without saying why, such as llama.cpp writing a GGUF)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= needed_bytes:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free, about {needed_bytes:,} needed)", str(folder))


# The optional parts of quantloop, each a pip extra (pyproject.toml): the import packages it brings -> its name.
# A base `pip install quantloop` leaves them out; a command that needs one says which extra to install.
OPTIONAL_IMPORTS = {
    "gptqmodel": "gptq",
    "auto_round": "autoround",
    "optuna": "search",
    "pulp": "search",
    "psycopg2": "postgres",
    "mcp": "mcp",
    "mcp_types": "mcp",
    "anyio": "mcp",
    "uvicorn": "mcp",
    "langchain_core": "langchain",
}


def missing_extra(e: BaseException) -> InputError | None:
    """The InputError naming the pip extra to install when `e` is the failed import of an optional part that is
    not installed (or an ImportError a library raised from it, as optuna does for a database driver), else None:
    any other error, or a module missing inside an installed library."""
    while isinstance(e, ImportError):
        package = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
        if package in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[package]
            return InputError(package, f"not installed; it comes with quantloop's optional part '{extra}'",
                              f"pip install 'quantloop[{extra}]'")
        e = e.__cause__ or e.__context__
    return None


def require_optional(module: str) -> None:
    """Raise missing_extra's InputError when the optional `module` is not installed: for code that imports it only
    in a child process, whose failure would otherwise come back as that process's last line."""
    if importlib.util.find_spec(module) is None:
        err = ModuleNotFoundError(f"No module named '{module}'", name=module)
        raise missing_extra(err) or err


def run_command(args) -> int:
    """Run a parsed command (args.func): bad input or a failure of the machine is one line on stderr and exit
    code 2, and so is an optional part that is not installed (the line names its pip extra); Ctrl-C exit code 130.
    Every entry point (quantloop, python -m quantloop.serve, ...) goes through it."""
    try:
        return args.func(args)
    except InputError as e:
        print(f"quantloop: error: {e.line()}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional part that a base install leaves out: the extra to install
        if (missing := missing_extra(e)) is None:
            raise
        print(f"quantloop: error: {missing.line()}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the model: read-only, full disk, permissions, missing folders
        print(f"quantloop: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantloop: interrupted", file=sys.stderr)
        return 130


def single_command_main(add_command, name: str, argv: list[str] | None = None) -> int:
    """`python -m <package> ...` for one subcommand: the same parser and errors as `quantloop <name> ...`."""
    parser = argparse.ArgumentParser(prog="quantloop")
    add_command(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)]))
