"""Teacher bootstrap flow: fine-tune the base model on the snapshot, register it as ``teacher@production``."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from tasks.data import current_snapshot
from tasks.teacher import fine_tune_teacher, register_teacher, start_run


@flow(name="teacher-bootstrap", log_prints=True)
def teacher_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Fine-tune, evaluate on validation, log to MLflow and register with lineage tags; the alias moves last."""
    cfg = load_config(config_path, overrides)
    md5 = current_snapshot(cfg)
    run_id = start_run(cfg, "teacher-bootstrap", {"stage": "teacher", "data.snapshot_md5": md5})
    trained = fine_tune_teacher(cfg, run_id, md5)
    version = register_teacher(cfg, run_id, trained["folder"], trained["metrics"], md5)
    m = trained["metrics"]
    print(f"teacher {cfg.teacher.registered_name} v{version} (@{cfg.teacher.alias}): validation accuracy "
          f"{m['val_accuracy']:.4f}, macro-F1 {m['val_macro_f1']:.4f}")
    return {"version": version, "run_id": run_id, "snapshot_md5": md5, "metrics": m}
