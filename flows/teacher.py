"""Teacher flows: bootstrap (fine-tune the base model on the snapshot) or import an existing classifier; either way
the result is registered as a new version of ``teacher`` and the alias (``@production``) moves to it last."""

from __future__ import annotations

from prefect import flow

from distillery.config import Config
from distillery.records import SnapshotRef, TeacherRef
from distillery.tasks.teacher import check_imported_teacher, fine_tune_teacher, register_teacher, start_run


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


@flow(name="teacher-import", flow_run_name="teacher-import-data-{snapshot.md5:.8}", log_prints=True,
      validate_parameters=False)
def teacher_import_flow(cfg: Config, snapshot: SnapshotRef, source: str) -> TeacherRef:
    """Register an existing classifier as the teacher, without training: labels mapped by name, measured on the
    validation and test splits, refused below the floors before anything is registered."""
    folder, metrics, provenance = check_imported_teacher(cfg, snapshot, source)
    run_id = start_run(cfg, "teacher-import", {"stage": "teacher", **snapshot.to_tags(), **provenance},
                       snapshot=snapshot)
    teacher = register_teacher(cfg, snapshot, run_id, folder, metrics, provenance)
    print(f"teacher {teacher.name} v{teacher.version} (@{cfg.teacher.alias}) imported from {source}: validation "
          f"accuracy {metrics['val_accuracy']:.4f}, macro-F1 {metrics['val_macro_f1']:.4f}; test accuracy "
          f"{metrics['test_accuracy']:.4f}, macro-F1 {metrics['test_macro_f1']:.4f}")
    return teacher
