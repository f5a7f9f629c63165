"""Prefect tasks for teacher outputs: resolve the teacher, label shards, cache, validate with GX, log to MLflow."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from models.data import read_snapshot, read_transfer_set
from models.labelling import build_outputs, read_outputs, teacher_logits, validation_tables, write_outputs
from models.modeling import load_classifier, load_tokenizer
from tasks import tracking
from tasks.validation import ValidationFailed, validate_teacher_outputs

OUTPUTS_FILE = "outputs.parquet"
META_FILE = "meta.json"


@task(name="resolve-teacher", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def resolve_teacher(cfg: Config, version: str | None = None) -> dict:
    """The registered teacher behind ``version`` (or the configured alias), downloaded to a local folder."""
    tracking.configure_tracking(cfg)
    name = cfg.teacher.registered_name
    mv = tracking.resolve_version(name, version or cfg.teacher.alias)
    folder = tracking.download_classifier(mv, cfg.path(cfg.runtime.workdir) / "registry")
    return {"name": name, "version": str(mv.version), "run_id": mv.run_id, "folder": str(folder),
            "snapshot_md5": mv.tags.get("data.snapshot_md5", ""), "base_model": mv.tags.get("base_model", "")}


def labelling_inputs(cfg: Config) -> tuple[pd.DataFrame, list[str]]:
    """Rows to label: the snapshot's train and validation splits, then the optional transfer set (label -1)."""
    splits, labels = read_snapshot(cfg.path(cfg.data.snapshot_dir))
    parts = [splits[s].assign(split=s)[["id", "text", "split", "label_id"]] for s in ("train", "validation")]
    if cfg.data.transfer_set:
        extra = read_transfer_set(cfg.path(cfg.data.transfer_set))
        known = set(pd.concat(parts)["id"]) | set(splits["test"]["id"])
        extra = extra[~extra["id"].isin(known)]  # never label test texts as transfer data
        parts.append(extra.assign(split="transfer", label_id=-1)[["id", "text", "split", "label_id"]])
    return pd.concat(parts, ignore_index=True), labels


def cache_key(teacher: dict, snapshot_md5: str, inputs: pd.DataFrame, cfg: Config) -> str:
    """Keyed by teacher version (and its run), data snapshot, the exact rows, and what shapes the logits."""
    rows = hashlib.sha256("\n".join(inputs["id"] + ":" + inputs["split"]).encode()).hexdigest()
    blob = json.dumps({"teacher": [teacher["name"], teacher["version"], teacher["run_id"]], "data": snapshot_md5,
                       "rows": rows, "max_length": cfg.teacher.max_length}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@task(name="lookup-teacher-outputs", cache_policy=NO_CACHE)
def lookup_cache(cfg: Config, key: str) -> str | None:
    """Path of cached outputs for ``key`` when a complete entry exists (it survives process restarts)."""
    folder = cfg.path(cfg.labelling.cache_dir) / key
    if (folder / OUTPUTS_FILE).is_file() and (folder / META_FILE).is_file():
        return str(folder / OUTPUTS_FILE)
    return None


@task(name="label-shard", cache_policy=NO_CACHE, retries=1)
def label_shard(teacher_folder: str, texts: list[str], max_length: int, batch_size: int, shard: int) -> np.ndarray:
    """Teacher logits for one shard of texts (runs anywhere the task runner puts it, e.g. a Dask worker)."""
    import torch

    tokenizer = load_tokenizer(Path(teacher_folder))
    model = load_classifier(Path(teacher_folder)).eval()
    with torch.inference_mode():
        return teacher_logits(model, tokenizer, texts, max_length, batch_size, desc=f"label shard {shard}")


@task(name="store-teacher-outputs", cache_policy=NO_CACHE)
def store_outputs(cfg: Config, key: str, inputs: pd.DataFrame, shard_logits: list[np.ndarray], labels: list[str],
                  meta: dict, run_id: str) -> str:
    """Write the outputs parquet + meta atomically into the cache and log both to the MLflow run."""
    logits = np.concatenate(shard_logits, axis=0)
    if logits.shape != (len(inputs), len(labels)):
        raise ValueError(f"teacher produced logits of shape {logits.shape}, expected {(len(inputs), len(labels))}: "
                         f"does the teacher's label set match the snapshot's?")
    df = build_outputs(inputs["id"].tolist(), inputs["split"].tolist(), inputs["label_id"].tolist(), logits, labels)
    final = cfg.path(cfg.labelling.cache_dir) / key
    partial = final.with_name(key + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_outputs(df, partial / OUTPUTS_FILE)
    (partial / META_FILE).write_text(json.dumps({**meta, "key": key, "run_id": run_id, "rows": len(df),
                                                 "labels": labels}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)  # readers only ever see complete entries
    with tracking.open_run(cfg, run_id):
        tracking.log_folder(final, "teacher_outputs")
    return str(final / OUTPUTS_FILE)


@task(name="validate-teacher-outputs", cache_policy=NO_CACHE)
def validate_outputs(cfg: Config, outputs_path: str, expected_rows: int, run_id: str) -> dict:
    """Run the GX suites; log Data Docs and the summary to MLflow either way; raise ValidationFailed on failure."""
    logger = get_run_logger()
    df = read_outputs(outputs_path)
    labels = json.loads((Path(outputs_path).parent / META_FILE).read_text())["labels"]
    rows, classes = validation_tables(df, labels)
    docs = cfg.path(cfg.runtime.workdir) / "data-docs" / run_id
    report = validate_teacher_outputs(rows, classes, labels, expected_rows, cfg.validation, docs)
    with tracking.open_run(cfg, run_id):
        tracking.log_folder(docs, "data_docs")
        tracking.log_json(report.summary(), "validation/teacher_outputs.json")
        mlflow.log_metrics({f"gx.{k}": v for k, v in report.statistics.items()} |
                           {"gx.evaluated": report.evaluated, "gx.failed": len(report.failed)})
        mlflow.set_tags({"gx.success": str(report.success).lower(), "gx.failed": len(report.failed)})
    if not report.success:
        tracking.finish_run(run_id, "FAILED")
        raise ValidationFailed(report)
    logger.info("teacher outputs passed %d expectations (Data Docs: %s)", report.evaluated, report.docs_index)
    return report.summary()


@task(name="log-labelling", cache_policy=NO_CACHE)
def log_labelling(cfg: Config, run_id: str, teacher: dict, snapshot_md5: str, key: str, cache_hit: bool,
                  seconds: float, outputs_path: str) -> None:
    meta = json.loads((Path(outputs_path).parent / META_FILE).read_text())
    with tracking.open_run(cfg, run_id):
        tracking.log_params({"teacher.name": teacher["name"], "teacher.version": teacher["version"],
                             "teacher.run_id": teacher["run_id"], "data.snapshot_md5": snapshot_md5,
                             "labelling.cache_key": key, "labelling.shards": cfg.labelling.shards})
        mlflow.set_tags({"teacher_outputs.cache_hit": str(cache_hit).lower(),
                         "teacher_outputs.source_run": meta["run_id"], "teacher_outputs.path": outputs_path})
        mlflow.log_metric("labelling_seconds", seconds)
