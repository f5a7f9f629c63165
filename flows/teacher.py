"""Teacher bootstrap flow: fine-tune the base model on the snapshot, register it as ``teacher@production``."""

from __future__ import annotations

from prefect import flow

from distillery.config import Config
from distillery.records import SnapshotRef, TeacherRef
from tasks.teacher import fine_tune_teacher, register_teacher, start_run


@flow(name="teacher-bootstrap", flow_run_name="teacher-bootstrap-data-{snapshot.md5:.8}", log_prints=True,
      validate_parameters=False)
def teacher_flow(cfg: Config, snapshot: SnapshotRef) -> TeacherRef:
    """Fine-tune, evaluate on validation, log to MLflow and register with lineage tags; the alias moves last."""
    run_id = start_run(cfg, "teacher-bootstrap", {"stage": "teacher", **snapshot.to_tags()}, snapshot=snapshot)
    folder, metrics = fine_tune_teacher(cfg, snapshot, run_id)
    teacher = register_teacher(cfg, snapshot, run_id, folder, metrics)
    print(f"teacher {teacher.name} v{teacher.version} (@{cfg.teacher.alias}): validation accuracy "
          f"{metrics['val_accuracy']:.4f}, macro-F1 {metrics['val_macro_f1']:.4f}")
    return teacher
