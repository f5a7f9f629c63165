"""The main job: ingest -> teacher (bootstrapped when none is registered) -> the later stages."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from flows.ingest import ingest_flow
from flows.teacher import teacher_flow
from tasks.teacher import teacher_exists


@flow(name="distillery-pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    ingest = ingest_flow(config_path, overrides)
    teacher_version = teacher_exists(cfg)
    if teacher_version is None:
        teacher_version = teacher_flow(config_path, overrides)["version"]
    else:
        print(f"using registered teacher {cfg.teacher.registered_name} v{teacher_version} (@{cfg.teacher.alias})")
    return {"snapshot_md5": ingest["snapshot_md5"], "teacher_version": teacher_version}
