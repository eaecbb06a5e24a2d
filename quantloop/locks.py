"""What lets two runs share one SLM folder: a lock per live run id, a lock around each shared file that is
read, changed and written back, and the LangGraph state database in WAL mode with a busy timeout.

A lock is an flock on a file beside what it guards: the kernel releases it when its process ends, however it
ends (SIGKILL included), so a killed run never leaves a stale lock behind and resumes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from quantloop.errors import InputError
from quantloop.names import check_run_id

SHARED_FILE_TIMEOUT_S = 120.0  # a summary is written in well under a second; a wait this long means a hung writer
STATE_DB_BUSY_MS = 30_000  # how long a write to the state database retries while another run holds it


class RunLock:
    """The lock of one live run id: held from before any work until the command ends. A second run with the same
    id is refused with the holder's process id; the kernel drops the lock when the holder dies."""

    def __init__(self, folder: Path, run_id: str):
        self.path = Path(folder) / f"{check_run_id(run_id)}.lock"
        self.run_id = run_id
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(None, f"run id '{self.run_id}' is in use by a live run (process {holder}; lock {self.path})",
                             "wait for it to end, or pass another --run-id") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def shared_file_lock(path: str | Path, timeout_s: float = SHARED_FILE_TIMEOUT_S) -> Iterator[None]:
    """Exclusive access to a file several runs read, change and write back (PATH.lock beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout_s):
        yield


def connect_state_db(path: str | Path) -> sqlite3.Connection:
    """The LangGraph state database, shared by every run of an SLM folder: WAL mode (readers never wait for the
    writer) and a busy timeout, so a write that meets another run's transaction retries instead of failing."""
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=STATE_DB_BUSY_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {STATE_DB_BUSY_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn
