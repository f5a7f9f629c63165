"""Prefect tasks for re-distillation triggers: compare the registry with the champion, emit the event."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import registry
from distillery.integrations.events import REDISTILL_EVENT, emit_gate_decision, emit_redistill
from distillery.records import Decision, Evaluation, Lineage, SnapshotRef, TeacherRef
from distillery.tasks.teacher import composite_version


@task(name="check-for-changes", cache_policy=NO_CACHE)
def check_for_changes(cfg: Config, snapshot: SnapshotRef) -> dict:
    """Compare teacher@alias and the verified snapshot with what the champion was made from.

    An unreachable registry raises (RegistryUnavailable): "cannot tell" is never reported as "no champion yet".
    """
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    if cfg.teacher.kind != "registered":  # a black box or an ensemble changes when its identity does (URL, params,
        version = composite_version(cfg, snapshot)  # prompt; a member's version)
    else:
        teacher = reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
        if teacher is None:
            return {"changed": False, "reason": f"no {cfg.teacher.registered_name}@{cfg.teacher.alias} registered"}
        version = str(teacher.version)
    champion = reg.champion(cfg)
    if champion is None:
        return {"changed": True, "teacher_version": version, "reason": "no champion yet"}
    made = Lineage.from_tags(champion.tags)
    reasons = []
    if made.teacher.version != version:
        reasons.append(f"teacher v{made.teacher.version} -> v{version}")
    if made.snapshot_md5 != snapshot.md5:
        reasons.append(f"data {made.snapshot_md5} -> {snapshot.md5}")
    return {"changed": bool(reasons), "teacher_version": version,
            "reason": "; ".join(reasons) or f"champion v{champion.version} is up to date"}


@task(name="emit-redistill", cache_policy=NO_CACHE)
def emit_redistill_task(cfg: Config, teacher_version: str, snapshot: SnapshotRef, reason: str) -> str | None:
    event_id = emit_redistill(cfg.teacher.registered_name, teacher_version, reason, snapshot.md5)
    get_run_logger().info("emitted %s (teacher v%s): %s", REDISTILL_EVENT, teacher_version, reason)
    return event_id


@task(name="champion-up-to-date", cache_policy=NO_CACHE)
def champion_up_to_date(cfg: Config, teacher_version: str, snapshot: SnapshotRef) -> str | None:
    """The champion version when it was made from this teacher version, data snapshot and config; else None."""
    registry.configure_tracking(cfg)
    champion = registry.Registry.from_config(cfg).champion(cfg)
    if champion is None:
        return None
    try:
        made = Lineage.from_tags(champion.tags)
    except KeyError:
        return None
    return str(champion.version) if made.made_from(teacher_version, snapshot.md5, cfg.digest()) else None


@task(name="report-decision", cache_policy=NO_CACHE)
def report_decision(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, evaluation: Evaluation,
                    decision: Decision, run_id: str) -> str | None:
    """The results table and the gate's reasons as a Prefect artifact on the flow run, and the gate event."""
    name = cfg.tracking.student_name
    verdict = f"PROMOTED as {name} v{decision.version}" if decision.passed else f"REJECTED ({name} unchanged)"
    create_markdown_artifact(
        key=f"distillery-{name}-gate".lower().replace("_", "-"),
        description=f"{verdict}: teacher v{teacher.version}, data {snapshot.md5}",
        markdown="\n".join([f"# {verdict}", "", f"teacher {teacher.name} v{teacher.version}, data snapshot "
                            f"`{snapshot.md5}`, MLflow run `{run_id}`", "", "```", evaluation.table, "```", "",
                            "## Gate", "", *[f"- {line}" for line in decision.reasons]]),
    )
    return emit_gate_decision(name, decision.passed, {
        "version": decision.version, "champion_version": decision.champion_version, "run_id": run_id,
        "teacher_version": teacher.version, "snapshot_md5": snapshot.md5, "failed": decision.failed_names()})
