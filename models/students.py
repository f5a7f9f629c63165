"""How a student (or the teacher) is made and trained from the config: the student's model and tokenizer, where its
weights come from, the training settings and the checkpoint key (pure: no orchestration, no tracking)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.config import (
    STATIC_LEARNING_RATE,
    STATIC_RECIPE,
    Config,
    DistillConfig,
    StudentConfig,
    TeacherConfig,
    TrainingSection,
    ValidationConfig,
    without_later_defaults,
)
from distillery.faults import fault_point
from distillery.records import DEVICE_TAG, Candidate, TeacherRef, TrainedStudent
from distillery.models.devices import CPU, Compute, compute_for
from distillery.models.labelling import Outputs
from distillery.models.losses import IGNORE_INDEX
from distillery.models.metrics import classification_metrics
from distillery.models.modeling import (
    PACKAGED_BASE_MODELS,
    ModelError,
    build_student,
    count_parameters,
    cut_student,
    load_classifier,
    load_tokenizer,
    resolve_base_model,
)
from distillery.models.randomness import seeded
from distillery.models.static import build_static_student
from distillery.models.training import (
    CrossEntropyObjective,
    DistillationObjective,
    Encoded,
    TrainResult,
    TrainSettings,
    encode,
    predict_logits,
    train_model,
)
from distillery.models.vocabulary import prune_vocabulary


def model_name(cfg: Config, name: str) -> str:
    """A packaged base model's name as it is, a folder resolved against the config root."""
    return name if name in PACKAGED_BASE_MODELS else str(cfg.path(name))


def settings_from(section: TeacherConfig | DistillConfig) -> TrainSettings:
    """The training loop's settings from the teacher's or the distillation's section (the fields they share); the
    teacher has no early stopping, so its patience is its epochs."""
    patience = section.patience if isinstance(section, DistillConfig) else section.epochs
    return TrainSettings(**section.model_dump(include=set(TrainingSection.model_fields)), patience=patience)


def epoch_callback(run_logger: Callable[[int, dict], None]) -> Callable[[int, dict], None]:
    """The MLflow curve logger, then the ``train.epoch_end`` fault point (before that epoch's checkpoint)."""

    def on_epoch_end(epoch: int, row: dict) -> None:
        run_logger(epoch, row)
        fault_point("train.epoch_end")

    return on_epoch_end


def checkpoint_key(*parts: object) -> str:
    """A checkpoint folder name from everything that shapes the training: a re-run after a crash finds it again."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_student(cfg: Config, teacher_model: PreTrainedModel | None, teacher_folder: Path | None, labels: list[str],
                 vocab_texts: list[str] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured student and the tokenizer it reads with (the teacher's, unless it is a pretrained model);
    with ``student.prune_vocab`` both keep only the word pieces of ``vocab_texts``.

    ``teacher_model`` is what a cut student is cut from (the teacher, or its base model for a baseline)."""
    s = cfg.student
    if s.init == "static":  # the encoder's tokenizer; its table from the encoder (the teacher's, or a base model's)
        if s.base_model == "teacher":
            encoder, tokenizer = teacher_model, load_tokenizer(teacher_folder)
        else:
            folder = resolve_base_model(model_name(cfg, s.base_model), cfg.work.pretrained)
            encoder, tokenizer = load_classifier(folder, labels), load_tokenizer(folder)
        student = build_static_student(encoder, tokenizer, labels, s.hidden_size, vocab_texts or [],
                                       cfg.distill.max_length, cfg.distill.seed)
    elif s.init == "pretrained":  # e.g. MiniLM under an MPNet teacher: the student keeps its own tokenizer
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
            "pretrained": f"pretrained ({s.base_model}{kept})",
            "static": f"static table from {s.base_model}'s encoder ({s.hidden_size} dims)"}[s.init]


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


def shape_learning_rate(s: StudentConfig) -> float | None:
    """The student shape's own learning rate (``student.learning_rate``; a static student's default), or None: the
    distillation's (a search's pick included)."""
    return s.learning_rate or (STATIC_LEARNING_RATE if s.init == "static" else None)


def shape_recipe(s: StudentConfig, chosen: Candidate) -> Candidate:
    """A frontier shape's recipe: its own (``student.recipe``), a static shape's (STATIC_RECIPE), else ``chosen``,
    the one chosen for the student above (a search's pick included)."""
    own = s.recipe or (STATIC_RECIPE if s.init == "static" else None)
    return dataclasses.replace(chosen, **own.model_dump()) if own and chosen.kind != "baseline" else chosen


LATER_DEFAULTS = {("pretrained_layers", None), ("select_weights", False), ("learning_rate", None),
                  ("taught_by", "teacher")}


def training_shape(student: StudentConfig) -> dict:
    """The student settings that shape its training, as its checkpoint key sees them: not the served form or the
    frontier (another form reuses the checkpoints), and keys added later only when set (checkpoints made before
    them are found again)."""
    return {k: v for k, v in student.model_dump(exclude={"deploy", "frontier", "recipe"}).items()  # the recipe:
            if (k, v) not in LATER_DEFAULTS}  # in the key through the candidate


# the baseline learns from hard labels alone; KD also from the teacher's soft labels on transfer, augmented and
# out-of-scope rows
KD_SPLITS = ("train", "transfer", "augmented", "oos", "production")


@dataclass(frozen=True)
class StudentTraining:
    """Everything one candidate's training needs, assembled from the config: the student and its tokenizer, the
    objective, the encoded train and validation rows, the settings, the checkpoint key (everything that shapes the
    training) and what to record about it."""

    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    objective: object
    train: Encoded
    val: Encoded
    settings: TrainSettings
    key: str
    weights_from: str
    params: dict
    compute: Compute = CPU  # where it trains (``runtime.device``)


def runtime_compute(cfg: Config) -> Compute:
    """Where this config trains (``runtime.device``, ``mixed_precision``, ``deterministic``)."""
    r = cfg.runtime
    return compute_for(r.device, r.mixed_precision, r.deterministic)


def prepare_student(cfg: Config, candidate: Candidate, teacher: TeacherRef, outputs_key: str, labels: list[str],
                    outputs: Outputs, validation: pd.DataFrame,
                    features_for: Callable[[list[str], list[str], PreTrainedModel], np.ndarray]) -> StudentTraining:
    """Assemble ``candidate``'s training: ``outputs`` are the teacher's, with their texts (``split``, ``id``,
    ``text``, ``label_id``, the logits beside them); a baseline trains on the train rows' hard labels, a distilled
    student on every KD split with the teacher's soft labels (and, for pooled feature KD, ``features_for(ids,
    texts, teacher model)``)."""
    baseline = candidate.kind == "baseline"
    rows = outputs.frame
    keep = rows["split"].isin(["train"] if baseline else KD_SPLITS).to_numpy() & (  # a row a black box did not
        baseline | rows["answered"].astype(bool).to_numpy())  # answer has no soft label to learn
    taught = outputs.where(keep)
    train_rows = taught.frame
    # a black-box teacher has no weights: its students are pretrained models of their own (config.validate_config)
    teacher_folder = Path(teacher.folder) if teacher.folder else None
    teacher_model = load_classifier(teacher_folder).eval() if teacher_folder else None
    source, init_note = (baseline_source(cfg, teacher_model, teacher, labels) if baseline
                         else (teacher_model, weights_from(cfg)))
    made = cfg  # what the student is made from
    if baseline and cfg.student.init == "static" and cfg.student.base_model == "teacher":  # not the teacher's encoder
        made = cfg.for_student({"base_model": teacher.base_model or cfg.teacher.base_model})
        init_note = weights_from(made)
    settings = settings_from(cfg.distill)
    if candidate.learning_rate is not None or candidate.epochs is not None:  # a search trial's own recipe
        settings = dataclasses.replace(settings, learning_rate=candidate.learning_rate or settings.learning_rate,
                                       epochs=candidate.epochs or settings.epochs)
    shape_rate = shape_learning_rate(cfg.student)
    if shape_rate is not None:  # the shape's own pace wins over the recipe's
        settings = dataclasses.replace(settings, learning_rate=shape_rate)
    with seeded(settings.seed):  # a new head (pretrained students) is drawn from the seeded generator
        # both students prune to the pieces of every row KD may see, so they compare like for like
        student, tokenizer = make_student(made, source, teacher_folder, labels,
                                          rows.loc[rows["split"] != "validation", "text"].tolist())
    hard = np.where(train_rows["label_id"] >= 0, train_rows["label_id"], IGNORE_INDEX)
    static = cfg.student.init == "static"  # one pooled vector, no hidden states to align: response KD only
    if static and candidate.feature_weight > 0:
        candidate = dataclasses.replace(candidate, feature_weight=0.0)
    feature_target = cfg.feature_target if not baseline and candidate.feature_weight > 0 else None
    features = (features_for(train_rows["id"].tolist(), train_rows["text"].tolist(), teacher_model)
                if feature_target == "pooled" else None)
    train = encode(tokenizer, train_rows["text"].tolist(), settings.max_length, hard.tolist(),
                   taught.logits, features)
    val = encode(tokenizer, validation["text"].tolist(), settings.max_length, validation["label_id"].tolist())
    objective = CrossEntropyObjective() if baseline else DistillationObjective(
        candidate.temperature, candidate.kd_weight, candidate.ce_weight, candidate.feature_weight,
        cfg.distill.feature_loss, teacher=teacher_model, student=student,
        layer_map={int(k): int(v) for k, v in (cfg.distill.layer_map or {}).items()} or None,
        feature_target=feature_target or "hidden")
    # what feature KD aligns shapes the training; keys without feature KD stay as they were
    shape = {**training_shape(cfg.student), **({"feature_target": feature_target} if feature_target else {})}
    key = checkpoint_key(outputs_key, candidate.to_dict(), shape, vars(settings), init_note)
    params = {**{f"candidate.{k}": v for k, v in candidate.to_dict().items()},
              **{f"student.{k}": v for k, v in cfg.student.model_dump(exclude={"frontier"}).items()},
              "student.shape": cfg.student.label, **{f"distill.{k}": v for k, v in vars(settings).items()},
              "student.parameters": count_parameters(student), "train_rows": len(train_rows),
              "distill.feature_target": feature_target or "none", "student.weights_from": init_note[:250],
              "student.checkpoint": key, **teacher.to_tags()}
    compute = runtime_compute(cfg)
    return StudentTraining(student, tokenizer, objective, train, val, settings, key, init_note,
                           {**params, DEVICE_TAG: compute.describe()}, compute)


def run_training(job: StudentTraining, candidate: Candidate, run_id: str, checkpoints: Path,
                 on_epoch_end: Callable[[int, dict], None], prune_below: tuple = ()) -> tuple[TrainedStudent, dict]:
    """Train ``job`` (resuming from its checkpoint folder under ``checkpoints``): the trained student's record
    (without its folder) and the metrics to log."""
    start = time.perf_counter()
    result = train_model(job.student, job.objective, job.train, job.val, job.settings, job.tokenizer.pad_token_id,
                         checkpoint_dir=checkpoints / job.key, on_epoch_end=epoch_callback(on_epoch_end),
                         desc=candidate.name, prune_below=prune_below, compute=job.compute)
    best = result.history[result.best_epoch - 1] if result.best_epoch else {}
    trained = TrainedStudent(
        run_id=run_id, folder="", candidate=candidate,
        val_accuracy=best.get("val_accuracy", float("nan")), val_macro_f1=best.get("val_macro_f1", float("nan")),
        best_epoch=result.best_epoch, train_seconds=time.perf_counter() - start,
        resumed_from_epoch=result.resumed_from_epoch, weights_from=job.weights_from,
        curve=tuple(row["val_macro_f1"] for row in result.history), pruned=result.pruned,
        device=job.compute.describe())
    metrics = {"val_accuracy": trained.val_accuracy, "val_macro_f1": trained.val_macro_f1,
               "best_epoch": trained.best_epoch, "train_seconds": trained.train_seconds,
               "stopped_early": float(result.stopped_early), "pruned": float(result.pruned),
               "resumed_from_epoch": trained.resumed_from_epoch}
    return trained, metrics


@dataclass(frozen=True)
class TeacherTraining:
    """A teacher fine-tune, assembled from the config: the model (a new head on the base model), its tokenizer, the
    encoded train and validation splits, the settings and the checkpoint key, and what to record about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train: Encoded
    val: Encoded
    settings: TrainSettings
    key: str
    params: dict
    compute: Compute = CPU


def prepare_teacher(cfg: Config, splits: dict[str, pd.DataFrame], labels: list[str], snapshot_md5: str) -> TeacherTraining:
    """The configured base model with a seeded new head for ``labels``, and the snapshot's splits encoded for it;
    checkpoints are keyed by the base model, the snapshot and the teacher settings."""
    base = resolve_base_model(model_name(cfg, cfg.teacher.base_model), cfg.work.pretrained)
    settings = settings_from(cfg.teacher)
    with seeded(settings.seed):  # the new classification head is drawn from the seeded generator
        tokenizer = load_tokenizer(base)
        model = load_classifier(base, labels)
    train = encode(tokenizer, splits["train"]["text"], settings.max_length, splits["train"]["label_id"])
    val = encode(tokenizer, splits["validation"]["text"], settings.max_length, splits["validation"]["label_id"])
    shaping = without_later_defaults(cfg.teacher.model_dump(), "teacher")  # a later key at its default: same key
    key = checkpoint_key("teacher", str(base), snapshot_md5, shaping)
    params = {**{f"teacher.{k}": v for k, v in cfg.teacher.model_dump().items()}, "teacher.base_folder": str(base),
              "teacher.parameters": count_parameters(model), "teacher.checkpoint": key}
    compute = runtime_compute(cfg)
    return TeacherTraining(model, tokenizer, train, val, settings, key, {**params, DEVICE_TAG: compute.describe()},
                           compute)


def run_teacher_training(job: TeacherTraining, checkpoints: Path, on_epoch_end: Callable[[int, dict], None],
                         num_classes: int) -> tuple[dict, TrainResult]:
    """Fine-tune ``job`` (resuming from ``checkpoints/teacher-<key>``), keep the best validation epoch: (summary
    metrics on validation, the training result)."""
    start = time.perf_counter()
    result = train_model(job.model, CrossEntropyObjective(), job.train, job.val, job.settings,
                         job.tokenizer.pad_token_id, checkpoint_dir=checkpoints / f"teacher-{job.key}",
                         on_epoch_end=epoch_callback(on_epoch_end), desc="teacher", compute=job.compute)
    logits = predict_logits(job.model, job.val, job.tokenizer.pad_token_id, batch_size=128)
    metrics = classification_metrics(logits, job.val.labels.numpy(), num_classes)
    return {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"], "val_ece": metrics["ece"],
            "train_seconds": time.perf_counter() - start, "best_epoch": result.best_epoch,
            "resumed_from_epoch": result.resumed_from_epoch}, result


def measure_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame],
                       num_classes: int, max_length: int, what: str) -> dict[str, float]:
    """An existing classifier's accuracy, macro-F1 and ECE on the validation and test splits (``val_*``,
    ``test_*``); a ModelError naming ``what`` when it gives non-finite logits."""
    metrics: dict[str, float] = {}
    for split, prefix in (("validation", "val"), ("test", "test")):
        data = encode(tokenizer, splits[split]["text"], max_length, splits[split]["label_id"])
        logits = predict_logits(model, data, tokenizer.pad_token_id, batch_size=128)
        if not np.isfinite(logits).all():
            raise ModelError(f"{what} gives non-finite logits on the {split} split: refused")
        m = classification_metrics(logits, data.labels.numpy(), num_classes)
        metrics.update({f"{prefix}_accuracy": m["accuracy"], f"{prefix}_macro_f1": m["macro_f1"],
                        f"{prefix}_ece": m["ece"]})
    return metrics


def below_floors(metrics: dict[str, float], v: ValidationConfig) -> list[str]:
    """Which of the teacher floors (``validation.min_teacher_accuracy`` / ``min_teacher_macro_f1``, the ones the
    Great Expectations suite holds teacher outputs to) a teacher's validation scores miss, in words."""
    floors = (("accuracy", "val_accuracy", v.min_teacher_accuracy, "min_teacher_accuracy"),
              ("macro-F1", "val_macro_f1", v.min_teacher_macro_f1, "min_teacher_macro_f1"))
    return [f"validation {name} {metrics[key]:.4f} < {floor} (validation.{setting})"
            for name, key, floor, setting in floors if metrics[key] < floor]
