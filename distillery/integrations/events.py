"""Prefect events: the one home of the re-distillation trigger (emitted by the watch flow and the webhook)."""

from __future__ import annotations

from prefect.events import emit_event

REDISTILL_EVENT = "distillery.redistill.requested"
GATE_PASSED_EVENT = "distillery.gate.passed"
GATE_REJECTED_EVENT = "distillery.gate.rejected"


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
