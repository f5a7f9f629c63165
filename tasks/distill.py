"""Prefect tasks that train students: distilled from cached teacher logits, or the hard-label baseline."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import registry
from distillery.records import Candidate, SnapshotRef, TeacherOutputs, TeacherRef, TrainedStudent, identity_digest
from distillery.models.data import read_snapshot
from distillery.models.labelling import read_outputs
from distillery.models.modeling import save_classifier
from distillery.models.students import KD_SPLITS, prepare_student, run_training
from distillery.tasks.labelling import teacher_features


@task(name="teacher-assistant", cache_policy=NO_CACHE)
def teacher_assistant(cfg: Config, teacher: TeacherRef, student: TrainedStudent) -> TeacherRef:
    """The run's distilled ``student`` as the teacher of the frontier shapes taught by it: a white box (its folder),
    versioned by the digest of its identity (its run, its files' hash, its shape and the teacher that taught it)."""
    from distillery.integrations.store import tree_sha256
    from distillery.models.onnx_runtime import INT8_FILE

    identity = {"kind": "assistant", "student_run_id": student.run_id, "shape": cfg.student.label,
                "model_sha256": tree_sha256(Path(student.folder), exclude=(INT8_FILE,)),  # (the harness's export)
                "taught_by": teacher.to_tags()}
    return TeacherRef(name=f"{cfg.tracking.student_name}-assistant", version=identity_digest(identity),
                      run_id=student.run_id, folder=student.folder, base_model=cfg.student.base_model,
                      snapshot_md5=teacher.snapshot_md5, kind="assistant", identity=json.dumps(identity, sort_keys=True))


def uses_pooled_features(cfg: Config) -> bool:
    """Whether a distilled candidate of this config may align pooled sentence features (and so needs the teacher's)."""
    d = cfg.distill
    searched = d.search.trials > 0 and (d.search.feature_weight or (0, 0))[1] > 0
    swept = d.search.trials == 0 and any(w > 0 for w in d.sweep.feature_weight)
    return cfg.feature_target == "pooled" and (d.feature_weight > 0 or searched or swept)


@task(name="teacher-features", cache_policy=NO_CACHE)
def cache_teacher_features(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef, outputs: TeacherOutputs) -> None:
    """Compute (or find) the teacher's sentence features for every row KD trains on, once, before trials that
    read them run side by side (their shape is logged)."""
    rows = read_outputs(outputs.path).frame
    rows = rows[rows["split"].isin(KD_SPLITS)]
    features = teacher_features(cfg, teacher, outputs, rows["id"].tolist(), rows["text"].tolist())
    get_run_logger().info("teacher sentence features: %d rows x %d (cached beside its soft labels)", *features.shape)


@task(name="train-student", task_run_name="train-{candidate.name}", cache_policy=NO_CACHE)
def train_student(cfg: Config, teacher: TeacherRef, snapshot: SnapshotRef, outputs: TeacherOutputs,
                  candidate: Candidate, parent_run_id: str, prune_below: tuple = ()) -> TrainedStudent:
    """Train one student candidate in its own nested MLflow run; checkpointed by its inputs, so a run killed
    mid-way resumes after its last finished epoch and an identical re-run reuses the result. ``prune_below``: a
    search's per-epoch bars (``models.selection.median_bars``); a trial below one stops there, marked pruned."""
    logger = get_run_logger()
    splits, labels = read_snapshot(Path(snapshot.path))
    job = prepare_student(cfg, candidate, teacher, outputs.key, labels, read_outputs(outputs.path),
                          splits["validation"], lambda ids, texts, model: teacher_features(cfg, teacher, outputs, ids,
                                                                                           texts, model))
    if candidate.kind == "baseline" and ": base model" in job.weights_from:
        logger.warning("baseline cut from the teacher's weights: %s", job.weights_from)
    run_id = registry.create_run(cfg, candidate.name, {"stage": "train-student", "candidate": candidate.kind},
                                 parent_run_id, snapshot=snapshot, params=job.params)
    with registry.open_run(cfg, run_id):
        trained, metrics = run_training(job, candidate, run_id, cfg.work.checkpoints, registry.curve_logger(),
                                        prune_below)
        registry.log_metrics(metrics)
    folder = save_classifier(job.student, job.tokenizer, cfg.work.students / run_id)
    logger.info("%s: validation macro-F1 %.4f (best epoch %d)", candidate.name, trained.val_macro_f1,
                trained.best_epoch)
    return dataclasses.replace(trained, folder=str(folder))


class StageClock:
    """Wall seconds of a run's stages, lap by lap."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> dict[str, float]:
        """Ends ``stage`` now: the laps so far."""
        now = time.monotonic()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now
        return self.laps


def log_stage_seconds(cfg: Config, run_id: str, laps: dict[str, float]) -> None:
    """Each stage's wall seconds on the run (``stage.<name>_s``) and in the log."""
    with registry.open_run(cfg, run_id):
        registry.log_metrics({f"stage.{name}_s": seconds for name, seconds in laps.items()})
    print("stages (wall seconds): " + ", ".join(f"{name} {seconds:,.0f}" for name, seconds in laps.items()))


def log_search(cfg: Config, run_id: str, trials: int, best_trial: int, best_params: dict, best_value: float,
               pruned: int = 0) -> None:
    """What the search found, on the distill run: how many trials (and pruned), the best one and its recipe."""
    with registry.open_run(cfg, run_id):
        registry.log_params({"search.trials": trials, "search.pruned": pruned, "search.best_trial": best_trial,
                             **{f"search.best.{k}": v for k, v in best_params.items()}})
        registry.log_metrics({"search.best_val_macro_f1": best_value})
