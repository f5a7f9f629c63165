"""Prefect tasks for the teacher: fine-tune a base model on the snapshot, register it with lineage."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from models.data import read_snapshot
from models.metrics import classification_metrics
from models.modeling import PACKAGED_BASE_MODELS, count_parameters, load_classifier, load_tokenizer, resolve_base_model, save_classifier
from models.training import CrossEntropyObjective, TrainSettings, encode, predict_logits, train_model
from tasks import tracking, versioning


def model_name(cfg: Config, name: str) -> str:
    """A packaged base model's name as it is, a folder resolved against the config root."""
    return name if name in PACKAGED_BASE_MODELS else str(cfg.path(name))


def settings_from(section) -> TrainSettings:  # noqa: ANN001 - TeacherConfig or DistillConfig
    return TrainSettings(
        epochs=section.epochs, batch_size=section.batch_size, learning_rate=section.learning_rate,
        weight_decay=section.weight_decay, warmup_fraction=section.warmup_fraction, max_length=section.max_length,
        patience=getattr(section, "patience", section.epochs), seed=section.seed, max_steps=section.max_steps,
        group_by_length=section.group_by_length,
    )


@task(name="fine-tune-teacher", cache_policy=NO_CACHE)
def fine_tune_teacher(cfg: Config, run_id: str, snapshot_md5: str) -> dict:
    """Fine-tune the configured base model on train, keep the best validation epoch, save it locally."""
    logger = get_run_logger()
    splits, labels = read_snapshot(cfg.path(cfg.data.snapshot_dir))
    base = resolve_base_model(model_name(cfg, cfg.teacher.base_model), cfg.path(cfg.runtime.workdir) / "pretrained")
    tokenizer = load_tokenizer(base)
    model = load_classifier(base, labels)
    settings = settings_from(cfg.teacher)
    train = encode(tokenizer, splits["train"]["text"], settings.max_length, splits["train"]["label_id"])
    val = encode(tokenizer, splits["validation"]["text"], settings.max_length, splits["validation"]["label_id"])
    with tracking.open_run(cfg, run_id):
        tracking.log_params({f"teacher.{k}": v for k, v in vars(cfg.teacher).items()} |
                            {"data.snapshot_md5": snapshot_md5, "teacher.base_folder": str(base),
                             "teacher.parameters": count_parameters(model)})
        start = time.perf_counter()
        result = train_model(
            model, CrossEntropyObjective(), train, val, settings, tokenizer.pad_token_id,
            checkpoint_dir=cfg.path(cfg.runtime.workdir) / "checkpoints" / f"teacher-{run_id}",
            on_epoch_end=tracking.curve_logger(),
            desc="teacher",
        )
        logits = predict_logits(model, val, tokenizer.pad_token_id, batch_size=128)
        metrics = classification_metrics(logits, val.labels.numpy(), len(labels))
        summary = {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"], "val_ece": metrics["ece"],
                   "train_seconds": time.perf_counter() - start, "best_epoch": result.best_epoch}
        mlflow.log_metrics(summary)
    folder = save_classifier(model, tokenizer, cfg.path(cfg.runtime.workdir) / "teachers" / run_id)
    logger.info("teacher fine-tuned: validation accuracy %.4f, macro-F1 %.4f (best epoch %d)",
                summary["val_accuracy"], summary["val_macro_f1"], result.best_epoch)
    return {"folder": str(folder), "metrics": summary}


@task(name="register-teacher", cache_policy=NO_CACHE)
def register_teacher(cfg: Config, run_id: str, folder: str, metrics: dict, snapshot_md5: str) -> str:
    """Log the teacher as a model, register a version with lineage tags, and move the alias to it last."""
    logger = get_run_logger()
    revision = versioning.git_revision(Path(cfg.root))
    with tracking.open_run(cfg, run_id):
        info = tracking.log_classifier(Path(folder))
        mlflow.set_tags({"data.snapshot_md5": snapshot_md5, "git.revision": revision})
    tags = {"data.snapshot_md5": snapshot_md5, "git.revision": revision, "run_id": run_id,
            "base_model": cfg.teacher.base_model, "config.hash": cfg.digest(),
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    name = cfg.teacher.registered_name
    version = tracking.register_version(info.model_uri, name, tags)
    tracking.set_alias(name, cfg.teacher.alias, version.version)  # last: a failure above leaves the alias alone
    logger.info("registered %s version %s and moved @%s to it", name, version.version, cfg.teacher.alias)
    return str(version.version)


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(cfg: Config, run_name: str, tags: dict | None = None, parent_run_id: str | None = None) -> str:
    return tracking.create_run(cfg, run_name, tags, parent_run_id)


@task(name="teacher-exists", cache_policy=NO_CACHE)
def teacher_exists(cfg: Config) -> str | None:
    """The version behind ``teacher@alias``, or None when there is none yet."""
    tracking.configure_tracking(cfg)
    version = tracking.get_alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    return str(version.version) if version else None
