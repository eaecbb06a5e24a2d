"""Failures of the machine, not of the model: a read-only file system, a full disk, a path through a file.
Each is one line naming the path and the OS error, exit code 2, and nothing half-written.

The read-only and full file systems are real: a small tmpfs mounted inside a private mount namespace
(`unshare --user --map-root-user --mount`), so the tests need no privileges and touch no system mount."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parent.parent


def in_private_tmpfs(mount: Path, size: str, command: list[str], read_only: bool = False) -> subprocess.CompletedProcess:
    """Run `command` with a fresh tmpfs of `size` mounted at `mount` (remounted read-only if asked)."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the file-system tests")
    mount.mkdir()
    script = f'mount -t tmpfs -o size={size} none "{mount}" && mkdir "{mount}/out"'
    if read_only:
        script += f' && mount -o remount,ro "{mount}"'
    script += ' && exec "$@"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def quantloop(*args) -> list[str]:
    return [sys.executable, "-m", "quantloop.pipelines.cli", *map(str, args)]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("quantloop: error:")]


def test_read_only_output_folder(tiny_prepared, tmp_path):
    mount = tmp_path / "ro"
    proc = in_private_tmpfs(mount, "4m", quantloop("quantize", tiny_prepared, "--method", "gguf", "--type", "Q8_0",
                                                    "--out", mount / "out" / "q8"), read_only=True)
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert str(mount / "out") in line and "Read-only file system" in line and "OS error 30" in line
    assert "Traceback" not in proc.stderr


def test_full_disk_while_llama_cpp_writes(tiny_prepared, tmp_path):
    """The tiny model's Q8_0 file is about 3.5 MB; the disk has 1 MB: llama.cpp fails, the line says why."""
    mount = tmp_path / "full"
    out = mount / "out" / "q8"
    script_check = f'; ls -A "{mount}/out"'  # what is left on the tmpfs, read before the namespace goes away
    proc = in_private_tmpfs(mount, "1m", ["sh", "-c", " ".join(f"'{c}'" for c in quantloop(
        "quantize", tiny_prepared, "--method", "gguf", "--type", "Q8_0", "--out", out)) + "; echo rc=$?" + script_check])
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    [line] = error_lines(proc)
    assert str(mount / "out") in line and "No space left on device" in line and "free some space" in line
    assert "could not quantize this model" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "rc=2"  # `ls -A` printed nothing: no half-written file or folder


def test_output_path_through_a_file(capsys, tiny_prepared, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, lines = run_cli(capsys, "quantize", tiny_prepared, "--method", "gguf", "--type", "Q8_0", "--out", blocker / "q8")
    assert_one_line_error(code, lines, blocker, "is a file, not a folder")
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
