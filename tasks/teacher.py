"""Prefect tasks for the teacher: fine-tune a base model on the snapshot, register it, resolve the registered one."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import registry, store
from distillery.records import SnapshotRef, TeacherRef
from distillery.models.data import read_snapshot
from distillery.models.metrics import classification_metrics
from distillery.models.modeling import (
    ModelError,
    align_labels,
    count_parameters,
    load_classifier,
    load_tokenizer,
    resolve_base_model,
    save_classifier,
)
from distillery.models.randomness import seeded
from distillery.models.students import checkpoint_key, epoch_callback, model_name, settings_from
from distillery.models.training import CrossEntropyObjective, encode, predict_logits, train_model


@task(name="fine-tune-teacher", cache_policy=NO_CACHE)
def fine_tune_teacher(cfg: Config, snapshot: SnapshotRef, run_id: str) -> tuple[str, dict]:
    """Fine-tune the configured base model on train, keep the best validation epoch, save it locally.

    Checkpoints are keyed by the inputs (base model, snapshot, teacher settings), so a run killed mid-way resumes
    after its last finished epoch when started again.
    """
    logger = get_run_logger()
    splits, labels = read_snapshot(Path(snapshot.path))
    base = resolve_base_model(model_name(cfg, cfg.teacher.base_model), cfg.work.pretrained)
    settings = settings_from(cfg.teacher)
    with seeded(settings.seed):  # the new classification head is drawn from the seeded generator
        tokenizer = load_tokenizer(base)
        model = load_classifier(base, labels)
    train = encode(tokenizer, splits["train"]["text"], settings.max_length, splits["train"]["label_id"])
    val = encode(tokenizer, splits["validation"]["text"], settings.max_length, splits["validation"]["label_id"])
    key = checkpoint_key("teacher", str(base), snapshot.md5, cfg.teacher.model_dump())
    with registry.open_run(cfg, run_id):
        registry.log_params({f"teacher.{k}": v for k, v in cfg.teacher.model_dump().items()} |
                            {**snapshot.to_tags(), "teacher.base_folder": str(base),
                             "teacher.parameters": count_parameters(model), "teacher.checkpoint": key})
        start = time.perf_counter()
        result = train_model(
            model, CrossEntropyObjective(), train, val, settings, tokenizer.pad_token_id,
            checkpoint_dir=cfg.work.checkpoints / f"teacher-{key}",
            on_epoch_end=epoch_callback(registry.curve_logger()), desc="teacher",
        )
        logits = predict_logits(model, val, tokenizer.pad_token_id, batch_size=128)
        metrics = classification_metrics(logits, val.labels.numpy(), len(labels))
        summary = {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"], "val_ece": metrics["ece"],
                   "train_seconds": time.perf_counter() - start, "best_epoch": result.best_epoch,
                   "resumed_from_epoch": result.resumed_from_epoch}
        registry.log_metrics(summary)
    folder = save_classifier(model, tokenizer, cfg.work.teachers / run_id)
    logger.info("teacher fine-tuned: validation accuracy %.4f, macro-F1 %.4f (best epoch %d%s)",
                summary["val_accuracy"], summary["val_macro_f1"], result.best_epoch,
                f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else "")
    return str(folder), summary


@task(name="check-imported-teacher", cache_policy=NO_CACHE)
def check_imported_teacher(cfg: Config, snapshot: SnapshotRef, source: str) -> tuple[str, dict, dict]:
    """Fetch an existing classifier, map its labels to the data's by name, and measure it on validation and test.

    Nothing is registered here: a teacher whose labels do not match, or that scores below the validation floors
    (the same ``validation.min_teacher_accuracy`` / ``min_teacher_macro_f1`` the Great Expectations suite holds
    teacher outputs to), is refused with a ModelError. Returns (aligned folder, metrics, provenance tags).
    """
    logger = get_run_logger()
    splits, labels = read_snapshot(Path(snapshot.path))
    if not source.startswith(registry.MODEL_URI_SCHEMES):
        source = str(cfg.path(source))  # a folder in the config is relative to the config's folder
    (cfg.work.imports).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.work.imports, prefix=".fetch-") as tmp:
        fetched = registry.fetch_classifier(source, Path(tmp) / "model", cfg.teacher.max_parameters)
        source_hash = store.tree_sha256(fetched)
        model = load_classifier(fetched, max_parameters=cfg.teacher.max_parameters).eval()
        tokenizer = load_tokenizer(fetched)
    order = align_labels(model, labels, what=f"teacher {source}")
    reordered = order != list(range(len(labels)))
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        data = encode(tokenizer, splits[split]["text"], cfg.teacher.max_length, splits[split]["label_id"])
        logits = predict_logits(model, data, tokenizer.pad_token_id, batch_size=128)
        if not np.isfinite(logits).all():
            raise ModelError(f"teacher {source} gives non-finite logits on the {split} split: refused")
        m = classification_metrics(logits, data.labels.numpy(), len(labels))
        prefix = "val" if split == "validation" else "test"
        metrics.update({f"{prefix}_accuracy": m["accuracy"], f"{prefix}_macro_f1": m["macro_f1"],
                        f"{prefix}_ece": m["ece"]})
    logger.info("imported teacher %s: validation accuracy %.4f, macro-F1 %.4f; test accuracy %.4f, macro-F1 %.4f%s",
                source, metrics["val_accuracy"], metrics["val_macro_f1"], metrics["test_accuracy"],
                metrics["test_macro_f1"], " (labels reordered by name to the data's order)" if reordered else "")
    v = cfg.validation
    low = [f"validation {name} {metrics[key]:.4f} < {floor} (validation.{setting})"
           for name, key, floor, setting in (("accuracy", "val_accuracy", v.min_teacher_accuracy, "min_teacher_accuracy"),
                                             ("macro-F1", "val_macro_f1", v.min_teacher_macro_f1, "min_teacher_macro_f1"))
           if metrics[key] < floor]
    if low:
        raise ModelError(f"teacher {source} refused, nothing registered: {'; '.join(low)}")
    folder = save_classifier(model, tokenizer, cfg.work.imports / source_hash[:16])
    provenance = {"teacher.source": source, "teacher.source_sha256": source_hash, "teacher.imported": "true",
                  "teacher.labels_reordered": str(reordered).lower()}
    return str(folder), metrics, provenance


@task(name="register-teacher", cache_policy=NO_CACHE)
def register_teacher(cfg: Config, snapshot: SnapshotRef, run_id: str, folder: str, metrics: dict,
                     provenance: dict | None = None) -> TeacherRef:
    """Log the teacher as a model, register a version with lineage tags, and move the alias to it last."""
    logger = get_run_logger()
    revision = store.git_revision(Path(cfg.root))
    with registry.open_run(cfg, run_id):
        info = registry.log_classifier(Path(folder), max_length=cfg.teacher.max_length)
        registry.set_tags({**snapshot.to_tags(), "git.revision": revision, **(provenance or {})})
        if provenance:  # an imported teacher's measurements (a fine-tuned one logged them while training)
            registry.log_metrics(metrics)
    name = cfg.teacher.registered_name
    base = (provenance or {}).get("teacher.source", cfg.teacher.base_model)
    draft = TeacherRef(name=name, version="", run_id=run_id, folder=folder, base_model=base,
                       snapshot_md5=snapshot.md5)
    reg = registry.Registry.from_config(cfg)
    version = reg.register(info.model_uri, name, {**draft.version_tags(revision, cfg.digest(), metrics),
                                                  **(provenance or {})})
    reg.set_alias(name, cfg.teacher.alias, str(version.version))  # last: a failure above leaves the alias alone
    logger.info("registered %s version %s and moved @%s to it", name, version.version, cfg.teacher.alias)
    return dataclasses.replace(draft, version=str(version.version))


@task(name="resolve-teacher", cache_policy=NO_CACHE)
def resolve_teacher(cfg: Config, version: str | None = None) -> TeacherRef:
    """The registered teacher behind ``version`` (or the configured alias), downloaded to a local folder."""
    registry.configure_tracking(cfg)
    name = cfg.teacher.registered_name
    mv = registry.Registry.from_config(cfg).resolve(name, version or cfg.teacher.alias)
    folder = registry.download_classifier(mv, cfg.work.registry)
    return TeacherRef.from_version(name, str(mv.version), mv.run_id, mv.tags, str(folder))


@task(name="current-teacher", cache_policy=NO_CACHE)
def current_teacher_version(cfg: Config) -> str | None:
    """The version behind ``teacher@alias``; None only when the registry says there is none (an unreachable
    registry is an error, never "no teacher": that would bootstrap a second one)."""
    registry.configure_tracking(cfg)
    version = registry.Registry.from_config(cfg).alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    return str(version.version) if version else None


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(cfg: Config, run_name: str, tags: dict | None = None, parent_run_id: str | None = None,
              snapshot: SnapshotRef | None = None, with_config: bool = False) -> str:
    """An MLflow run for a flow; with ``snapshot`` it records the data snapshot as its dataset input, with
    ``with_config`` the whole configuration as its params (dotted keys)."""
    return registry.create_run(cfg, run_name, tags, parent_run_id, snapshot=snapshot,
                               params=cfg.flat() if with_config else None)
