"""Prefect events: the one home of the re-distillation triggers (a changed teacher or data, emitted by the watch flow
and the webhook; drift in production, emitted by the monitor) and of the gate's decisions."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from prefect.events import emit_event
from distillery.errors import DistilleryError

REDISTILL_EVENT = "distillery.redistill.requested"
GATE_PASSED_EVENT = "distillery.gate.passed"
GATE_REJECTED_EVENT = "distillery.gate.rejected"
DRIFT_EVENT = "distillery.drift.detected"


class PrefectUnavailable(DistilleryError, RuntimeError):
    """The Prefect API (a configured server, or the temporary one) cannot be reached; the message says what to do."""


def check_prefect_server(timeout: float = 5.0) -> None:
    """With PREFECT_API_URL set, fail fast and clearly when that server does not answer."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        reason = exc
    else:
        reason = f"HTTP {resp.status}"
    raise PrefectUnavailable(f"Prefect server at {url} is not reachable ({reason}). Start it (`scripts/stack.sh up` "
                             f"starts one), fix PREFECT_API_URL, or unset it to use a temporary local server.")


@contextmanager
def prefect_errors() -> Iterator[None]:
    """Turn Prefect's failure to start or reach its temporary server into one actionable message."""
    try:
        yield
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise PrefectUnavailable(
            f"the temporary Prefect server did not start in time ({exc}). On a loaded machine give it longer "
            f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 120 s by default here), or run one "
            f"(`prefect server start`) and set PREFECT_API_URL."
        ) from None


def emit_redistill(teacher_name: str, teacher_version: str, reason: str, snapshot_md5: str = "") -> str | None:
    """Emit the event that the ``redistill-on-change`` deployment trigger turns into a distillation run."""
    event = emit_event(
        event=REDISTILL_EVENT,
        resource={"prefect.resource.id": f"distillery.teacher.{teacher_name}", "prefect.resource.name": teacher_name},
        payload={"teacher_version": str(teacher_version), "snapshot_md5": snapshot_md5, "reason": reason},
    )
    return str(event.id) if event is not None else None


def emit_gate_decision(student_name: str, passed: bool, payload: dict) -> str | None:
    """``distillery.gate.passed`` / ``distillery.gate.rejected`` on the student model: an automation can act on a
    rejection (notify, open a ticket) although the run itself completed as it should."""
    event = emit_event(
        event=GATE_PASSED_EVENT if passed else GATE_REJECTED_EVENT,
        resource={"prefect.resource.id": f"distillery.student.{student_name}", "prefect.resource.name": student_name},
        payload=payload,
    )
    return str(event.id) if event is not None else None


def emit_drift(student_name: str, version: str, reasons: list[str], window: dict, run_id: str) -> str | None:
    """``distillery.drift.detected`` on the student model; its payload's ``production`` (the window: ``log``,
    ``start``, ``end``, ``model``) is what the ``redistill-on-drift`` deployment adds to the transfer set."""
    event = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"distillery.student.{student_name}", "prefect.resource.name": student_name},
        payload={"version": str(version), "reasons": list(reasons), "monitor_run_id": run_id,
                 "production": {k: window[k] for k in ("log", "start", "end", "model")}},
    )
    return str(event.id) if event is not None else None
