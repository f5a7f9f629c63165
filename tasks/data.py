"""Prefect tasks for the in-domain data: build the checked snapshot, version it with DVC."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from models.data import check_data, read_snapshot, read_source, split_snapshot, write_snapshot
from tasks import versioning


@task(name="prepare-snapshot", cache_policy=NO_CACHE)
def prepare_snapshot(cfg: Config) -> dict:
    """Read the source, check it (drop and report, or fail), and (re)write the snapshot folder if it changed."""
    logger = get_run_logger()
    source = cfg.path(cfg.data.source)
    raw = read_source(source, cfg.data.text_column, cfg.data.label_column)
    train, test, report = check_data(raw, cfg.data.max_drop_fraction)
    splits = split_snapshot(train, test, raw.labels, cfg.data.validation_fraction, cfg.data.seed)
    folder = cfg.path(cfg.data.snapshot_dir)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staged = Path(tmp) / "snapshot"
        write_snapshot(splits, raw.labels, report, staged)
        changed = not folder.is_dir() or versioning.md5_of_tree(staged) != versioning.md5_of_tree(folder)
        if changed:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(str(staged), str(folder))
    rows = {name: len(df) for name, df in splits.items()}
    for split, reasons in report.dropped.items():
        examples = {k: v for k, v in report.examples.items() if k.startswith(f"{split}:")}
        logger.warning("dropped from %s: %s (examples: %s)", split, reasons, examples)
    logger.info("snapshot %s: %s rows, %d labels, %s", folder, rows, len(raw.labels), "rewritten" if changed else "unchanged")
    return {"folder": str(folder), "rows": rows, "labels": len(raw.labels), "dropped": report.dropped, "changed": changed}


@task(name="version-snapshot", cache_policy=NO_CACHE)
def version_snapshot(cfg: Config) -> str:
    """``dvc add`` + ``dvc push`` the snapshot to the configured remote; returns its md5 (the snapshot id)."""
    logger = get_run_logger()
    root = Path(cfg.root)
    versioning.ensure_dvc_repo(root, cfg.dvc.remote_name, cfg.dvc.remote_url)
    md5 = versioning.track_and_push(root, cfg.path(cfg.data.snapshot_dir), cfg.dvc.remote_name)
    logger.info("data snapshot %s pushed to DVC remote %r", md5, cfg.dvc.remote_name)
    return md5


@task(name="current-snapshot", cache_policy=NO_CACHE)
def current_snapshot(cfg: Config) -> str:
    """The md5 of the snapshot the working tree holds, after checking the files match ``data.dvc``."""
    folder = cfg.path(cfg.data.snapshot_dir)
    md5 = versioning.snapshot_md5(versioning.dvc_file_for(Path(cfg.root), folder))
    read_snapshot(folder)  # fails clearly when the files are missing
    return md5
