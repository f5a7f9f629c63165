"""Named fault points, for the fault-injection test tier (in the spirit of etcd's and TiKV's failpoints).

A step calls ``fault_point("promote.registered")`` at a place where a crash would matter. Nothing happens unless the
environment variable ``DISTILLERY_FAULTS`` names that point, e.g.::

    DISTILLERY_FAULTS="promote.registered=kill"            # SIGKILL this process there
    DISTILLERY_FAULTS="train.epoch_end=kill@2"              # ... the second time the point is reached
    DISTILLERY_FAULTS="gate.before=pause:30"                # sleep 30 s there (a test stops a server meanwhile)
    DISTILLERY_FAULTS="label.shard=raise"                   # raise InjectedFault

With ``DISTILLERY_FAULTS_MARKS=DIR`` a file ``DIR/<point>`` is written each time a named point is reached, so a test
can wait for it. Production runs never set these variables; the points then cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

FAULTS_ENV = "DISTILLERY_FAULTS"
MARKS_ENV = "DISTILLERY_FAULTS_MARKS"

_hits: Counter[str] = Counter()
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised at a fault point configured with ``raise``."""


def _plan() -> dict[str, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    out = {}
    for item in spec.split(","):
        name, sep, action = item.strip().partition("=")
        if sep:
            out[name.strip()] = action.strip()
    return out


def fault_point(name: str) -> None:
    """Act as ``DISTILLERY_FAULTS`` says for this point (usually: do nothing)."""
    action = _plan().get(name)
    if action is None:
        return
    with _lock:
        _hits[name] += 1
        hit = _hits[name]
    action, _, nth = action.partition("@")
    if nth and hit != int(nth):
        return
    marks = os.environ.get(MARKS_ENV)
    if marks:
        Path(marks).mkdir(parents=True, exist_ok=True)
        (Path(marks) / name).write_text(str(os.getpid()))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("pause:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "raise":
        raise InjectedFault(f"fault injected at {name}")
