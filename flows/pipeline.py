"""The main job: ingest -> teacher (bootstrapped when none is registered) -> label -> validate -> distill ->
evaluate -> gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from flows.distill import distill_flow
from flows.ingest import ingest_flow
from flows.runners import task_runner_for
from flows.teacher import teacher_flow
from tasks.teacher import teacher_exists


@flow(name="distillery-pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None,
                  teacher_version: str | None = None, force: bool = False) -> dict:
    cfg = load_config(config_path, overrides)
    ingest = ingest_flow(config_path, overrides)
    if teacher_version is None and teacher_exists(cfg) is None:
        teacher_flow(config_path, overrides)
    result = distill_flow.with_options(task_runner=task_runner_for(cfg))(config_path, overrides, teacher_version, force)
    return {**result, "snapshot_md5": ingest["snapshot_md5"]}
