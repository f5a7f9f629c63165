"""Teacher/data watch: when teacher@alias or the data snapshot differs from the champion's, request re-distillation."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from tasks.data import current_snapshot
from tasks.events import check_for_changes, emit_redistill_task


@flow(name="teacher-watch", log_prints=True)
def watch_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Poll once (deploy it on a schedule); emits ``distillery.redistill.requested`` on a change."""
    cfg = load_config(config_path, overrides)
    md5 = current_snapshot(cfg)
    change = check_for_changes(cfg, md5)
    if change["changed"]:
        change["event_id"] = emit_redistill_task(cfg, change["teacher_version"], md5, change["reason"])
    print(("change: " if change["changed"] else "no change: ") + change["reason"])
    return change
