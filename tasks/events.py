"""Prefect events: the one home of the re-distillation trigger (emitted by the watch flow and the webhook)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from distillery.config import Config
from tasks import tracking
from tasks.lineage import champion_matches

REDISTILL_EVENT = "distillery.redistill.requested"


def emit_redistill(teacher_name: str, teacher_version: str, reason: str, snapshot_md5: str = "") -> str | None:
    """Emit the event that the ``redistill-on-change`` deployment trigger turns into a distillation run."""
    event = emit_event(
        event=REDISTILL_EVENT,
        resource={"prefect.resource.id": f"distillery.teacher.{teacher_name}", "prefect.resource.name": teacher_name},
        payload={"teacher_version": str(teacher_version), "snapshot_md5": snapshot_md5, "reason": reason},
    )
    return str(event.id) if event is not None else None


@task(name="check-for-changes", cache_policy=NO_CACHE)
def check_for_changes(cfg: Config, snapshot_md5: str) -> dict:
    """Compare teacher@alias and the working snapshot with what the champion was made from."""
    tracking.configure_tracking(cfg)
    teacher = tracking.get_alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    if teacher is None:
        return {"changed": False, "reason": f"no {cfg.teacher.registered_name}@{cfg.teacher.alias} registered"}
    champion = tracking.get_alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    version = str(teacher.version)
    if champion is None:
        return {"changed": True, "teacher_version": version, "reason": "no champion yet"}
    reasons = []
    if champion.tags.get("teacher.version") != version:
        reasons.append(f"teacher v{champion.tags.get('teacher.version')} -> v{version}")
    if champion.tags.get("data.snapshot_md5") != snapshot_md5:
        reasons.append(f"data {champion.tags.get('data.snapshot_md5')} -> {snapshot_md5}")
    return {"changed": bool(reasons), "teacher_version": version,
            "reason": "; ".join(reasons) or f"champion v{champion.version} is up to date"}


@task(name="emit-redistill", cache_policy=NO_CACHE)
def emit_redistill_task(cfg: Config, teacher_version: str, snapshot_md5: str, reason: str) -> str | None:
    event_id = emit_redistill(cfg.teacher.registered_name, teacher_version, reason, snapshot_md5)
    get_run_logger().info("emitted %s (teacher v%s): %s", REDISTILL_EVENT, teacher_version, reason)
    return event_id


@task(name="champion-up-to-date", cache_policy=NO_CACHE)
def champion_up_to_date(cfg: Config, teacher_version: str, snapshot_md5: str) -> str | None:
    return champion_matches(cfg, teacher_version, snapshot_md5)
