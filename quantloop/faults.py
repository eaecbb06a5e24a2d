"""The fault-injection hook the kill tests use (docs/run-safety.md): QUANTLOOP_FAULT=POINT[@N] makes the process
kill itself (SIGKILL, or the signal QUANTLOOP_FAULT_SIGNAL names, e.g. INT) the Nth time it reaches POINT
(default the first). Unset, every point is a no-op costing one dictionary lookup.

The points: node:<name> as each graph node starts (evaluate, quantize, validate, compare, review, track, finish);
write:<kind> in the middle of each kind of write, after the temporary file or folder is written and before it
is renamed into place (gguf, checkpoint, validation, generations, summary, report); write:state while a
LangGraph checkpoint is being written to the state database; mlflow while an attempt's MLflow record is
half-logged (its parameters and metrics in, its artifacts and FINISHED status not yet).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "QUANTLOOP_FAULT"
SIGNAL_ENV = "QUANTLOOP_FAULT_SIGNAL"

_reached: Counter[str] = Counter()


def armed(name: str) -> bool:
    """Whether QUANTLOOP_FAULT names this point (whatever its count)."""
    return os.environ.get(FAULT_ENV, "").partition("@")[0] == name


def point(name: str) -> None:
    """Kill this process here when QUANTLOOP_FAULT names this point and this is its Nth arrival."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    target, _, nth = want.partition("@")
    if name != target:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        sig = getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL").upper().removeprefix("SIG"))
        os.kill(os.getpid(), sig)
