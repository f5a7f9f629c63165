"""Prefect tasks that train students: distilled from cached teacher logits, or the hard-label baseline."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.config import Config, StudentConfig
from distillery.integrations import registry
from distillery.records import Candidate, SnapshotRef, TeacherOutputs, TeacherRef, TrainedStudent
from distillery.models.data import read_snapshot
from distillery.models.labelling import read_outputs
from distillery.models.losses import IGNORE_INDEX
from distillery.models.modeling import (
    ModelError,
    build_student,
    count_parameters,
    cut_student,
    load_classifier,
    load_tokenizer,
    resolve_base_model,
    save_classifier,
)
from distillery.models.randomness import seeded
from distillery.models.training import CrossEntropyObjective, DistillationObjective, encode, train_model
from distillery.models.vocabulary import prune_vocabulary
from distillery.tasks.labelling import rows_to_label, teacher_features
from distillery.tasks.teacher import checkpoint_key, epoch_callback, model_name, settings_from


def make_student(cfg: Config, teacher_model: PreTrainedModel, teacher_folder: Path, labels: list[str],
                 vocab_texts: list[str] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured student and the tokenizer it reads with (the teacher's, unless it is a pretrained model);
    with ``student.prune_vocab`` both keep only the word pieces of ``vocab_texts``.

    ``teacher_model`` is what a cut student is cut from (the teacher, or its base model for a baseline)."""
    s = cfg.student
    if s.init == "pretrained":  # e.g. MiniLM under an MPNet teacher: the student keeps its own tokenizer
        folder = resolve_base_model(model_name(cfg, s.base_model), cfg.work.pretrained)
        student, tokenizer = load_classifier(folder, labels), load_tokenizer(folder)
        if s.pretrained_layers:  # a cut of the pretrained model (its embeddings, head and the chosen layers)
            student = cut_student(student, list(s.pretrained_layers))
    else:
        student = build_student(teacher_model, s.init, list(s.layers), s.num_layers, s.hidden_size,
                                s.num_attention_heads, s.intermediate_size, cfg.distill.seed, s.select_weights)
        tokenizer = load_tokenizer(teacher_folder)
    if s.prune_vocab:
        student, tokenizer = prune_vocabulary(student, tokenizer, vocab_texts or [], s.vocab_reserve,
                                              cfg.distill.max_length)
    return student, tokenizer


_SAME_SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def weights_from(cfg: Config) -> str:
    """Where a student's initial weights come from, in words (recorded on its run)."""
    s = cfg.student
    kept = f", layers {list(s.pretrained_layers)}" if s.pretrained_layers else ""
    return {"cut": f"teacher (layers {list(s.layers)})",
            "config": "teacher's weights by selection" if s.select_weights else "random init",
            "pretrained": f"pretrained ({s.base_model}{kept})"}[s.init]


def baseline_source(cfg: Config, teacher_model: PreTrainedModel, teacher: TeacherRef,
                    labels: list[str]) -> tuple[PreTrainedModel, str]:
    """What a cut baseline is cut from, and why: with ``distill.baseline_init: base`` the teacher's pretrained base
    model (the same layers before fine-tuning, so the baseline holds no knowledge of the teacher), else the teacher.

    A base model that cannot be found or does not have the teacher's shape (a teacher registered from elsewhere)
    falls back to the teacher's weights, and the reason is recorded on the baseline's run.
    """
    if cfg.student.init != "cut" or cfg.distill.baseline_init == "teacher":
        return teacher_model, weights_from(cfg)
    base = teacher.base_model or cfg.teacher.base_model
    try:
        folder = resolve_base_model(model_name(cfg, base), cfg.work.pretrained)
        model = load_classifier(folder, labels)
    except ModelError as exc:
        return teacher_model, f"{weights_from(cfg)}: base model {base!r} unavailable: {exc}"
    differs = [k for k in _SAME_SHAPE if getattr(model.config, k, None) != getattr(teacher_model.config, k, None)]
    if differs:
        return teacher_model, f"{weights_from(cfg)}: base model {base!r} differs from the teacher in {', '.join(differs)}"
    return model, f"base model {base} (layers {list(cfg.student.layers)}, before fine-tuning)"


LATER_DEFAULTS = {("pretrained_layers", None), ("select_weights", False)}


def training_shape(student: StudentConfig) -> dict:
    """The student settings that shape its training, as its checkpoint key sees them: not the served form or the
    frontier (another form reuses the checkpoints), and keys added later only when set (checkpoints made before
    them are found again)."""
    return {k: v for k, v in student.model_dump(exclude={"deploy", "frontier"}).items()
            if (k, v) not in LATER_DEFAULTS}


# the baseline learns from hard labels alone; KD also from the teacher's soft labels on transfer, augmented and
# out-of-scope rows
KD_SPLITS = ("train", "transfer", "augmented", "oos")


def labelled_rows(cfg: Config, snapshot: SnapshotRef, outputs: TeacherOutputs) -> pd.DataFrame:
    """The teacher's outputs with the text of each row (one row per labelled text)."""
    inputs, _ = rows_to_label(cfg, snapshot)
    return read_outputs(outputs.path).merge(inputs[["id", "text"]], on="id", how="inner", validate="one_to_one")


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
    rows = labelled_rows(cfg, snapshot, outputs)
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
    table = labelled_rows(cfg, snapshot, outputs)
    baseline = candidate.kind == "baseline"
    train_rows = table[table["split"].isin(["train"] if baseline else KD_SPLITS)]
    teacher_folder = Path(teacher.folder)
    teacher_model = load_classifier(teacher_folder).eval()
    source, init_note = teacher_model, weights_from(cfg)
    if baseline:
        source, init_note = baseline_source(cfg, teacher_model, teacher, labels)
        if ": base model" in init_note:
            logger.warning("baseline cut from the teacher's weights: %s", init_note)
    settings = settings_from(cfg.distill)
    if candidate.learning_rate is not None or candidate.epochs is not None:  # a search trial's own recipe
        settings = dataclasses.replace(settings, learning_rate=candidate.learning_rate or settings.learning_rate,
                                       epochs=candidate.epochs or settings.epochs)
    with seeded(settings.seed):  # a new head (pretrained students) is drawn from the seeded generator
        # both students prune to the pieces of every row KD may see, so they compare like for like
        student, tokenizer = make_student(cfg, source, teacher_folder, labels,
                                          table.loc[table["split"] != "validation", "text"].tolist())
    hard = np.where(train_rows["label_id"] >= 0, train_rows["label_id"], IGNORE_INDEX)
    feature_target = cfg.feature_target if not baseline and candidate.feature_weight > 0 else None
    features = None
    if feature_target == "pooled":  # the teacher's sentence features, cached beside its soft labels
        features = teacher_features(cfg, teacher, outputs, train_rows["id"].tolist(), train_rows["text"].tolist(),
                                    teacher_model)
    train = encode(tokenizer, train_rows["text"].tolist(), settings.max_length, hard.tolist(),
                   np.stack(train_rows["logits"].to_list()), features)
    val = encode(tokenizer, splits["validation"]["text"].tolist(), settings.max_length,
                 splits["validation"]["label_id"].tolist())
    if baseline:
        objective = CrossEntropyObjective()
    else:
        objective = DistillationObjective(
            candidate.temperature, candidate.kd_weight, candidate.ce_weight, candidate.feature_weight,
            cfg.distill.feature_loss, teacher=teacher_model, student=student,
            layer_map={int(k): int(v) for k, v in (cfg.distill.layer_map or {}).items()} or None,
            feature_target=feature_target or "hidden")
    # what feature KD aligns shapes the training; keys without feature KD stay as they were
    shape = {**training_shape(cfg.student), **({"feature_target": feature_target} if feature_target else {})}
    key = checkpoint_key(outputs.key, candidate.to_dict(), shape, vars(settings), init_note)
    name = candidate.name
    run_id = registry.create_run(cfg, name, {"stage": "train-student", "candidate": candidate.kind}, parent_run_id,
                                 snapshot=snapshot)
    with registry.open_run(cfg, run_id):
        registry.log_params({**{f"candidate.{k}": v for k, v in candidate.to_dict().items()},
                             **{f"student.{k}": v for k, v in cfg.student.model_dump(exclude={"frontier"}).items()},
                             "student.shape": cfg.student.label,
                             **{f"distill.{k}": v for k, v in vars(settings).items()},
                             "student.parameters": count_parameters(student), "train_rows": len(train_rows),
                             "distill.feature_target": feature_target or "none",
                             "student.weights_from": init_note[:250], "student.checkpoint": key,
                             **teacher.to_tags()})
        start = time.perf_counter()
        result = train_model(student, objective, train, val, settings, tokenizer.pad_token_id,
                             checkpoint_dir=cfg.work.checkpoints / key,
                             on_epoch_end=epoch_callback(registry.curve_logger()), desc=name,
                             prune_below=prune_below)
        best = result.history[result.best_epoch - 1] if result.best_epoch else {}
        trained = TrainedStudent(
            run_id=run_id, folder="", candidate=candidate,
            val_accuracy=best.get("val_accuracy", float("nan")), val_macro_f1=best.get("val_macro_f1", float("nan")),
            best_epoch=result.best_epoch, train_seconds=time.perf_counter() - start,
            resumed_from_epoch=result.resumed_from_epoch, weights_from=init_note,
            curve=tuple(row["val_macro_f1"] for row in result.history), pruned=result.pruned)
        mlflow.log_metrics({"val_accuracy": trained.val_accuracy, "val_macro_f1": trained.val_macro_f1,
                            "best_epoch": trained.best_epoch, "train_seconds": trained.train_seconds,
                            "stopped_early": float(result.stopped_early), "pruned": float(result.pruned),
                            "resumed_from_epoch": trained.resumed_from_epoch})
    folder = save_classifier(student, tokenizer, cfg.work.students / run_id)
    logger.info("%s: validation macro-F1 %.4f (best epoch %d)", name, trained.val_macro_f1, result.best_epoch)
    return dataclasses.replace(trained, folder=str(folder))


def log_search(cfg: Config, run_id: str, trials: int, best_trial: int, best_params: dict, best_value: float,
               pruned: int = 0) -> None:
    """What the search found, on the distill run: how many trials (and pruned), the best one and its recipe."""
    with registry.open_run(cfg, run_id):
        registry.log_params({"search.trials": trials, "search.pruned": pruned, "search.best_trial": best_trial,
                             **{f"search.best.{k}": v for k, v in best_params.items()}})
        mlflow.log_metric("search.best_val_macro_f1", best_value)
