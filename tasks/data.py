"""Prefect tasks for the in-domain data: build the checked snapshot, version it with DVC, hand runs a verified copy."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import store
from distillery.records import SnapshotRef
from distillery.models.data import (
    check_data,
    choose_scope,
    read_source,
    scoped,
    split_out_of_scope,
    split_snapshot,
    write_snapshot,
)


@task(name="ingest-snapshot", cache_policy=NO_CACHE)
def ingest_snapshot(cfg: Config) -> tuple[SnapshotRef, dict]:
    """Read and check the source, write the split snapshot, version it with DVC and push it, all or nothing.

    A failure at any point (bad data, DVC remote unreachable) leaves ``data/`` and ``data.dvc`` as they were.
    """
    logger = get_run_logger()
    root, folder = Path(cfg.root), cfg.path(cfg.data.snapshot_dir)
    d = cfg.data
    raw = read_source(cfg.path(d.source), d.text_column, d.label_column, d.split_column, d.test_fraction, d.seed)
    scope = choose_scope(raw.labels, d.oos_label, d.holdout_intents, d.seed)
    raw = scoped(raw, scope)
    cleaned, report = check_data(raw, d.max_drop_fraction, scope.names)
    labels = [name for name in raw.labels if name not in scope.names]
    oos: dict = {}
    if scope.active:
        cleaned, oos = split_out_of_scope(cleaned, scope, d.validation_fraction, d.seed)
        logger.info("out of scope: %s; rows %s", scope.to_dict(), {k: len(v) for k, v in oos.items()})
    splits = split_snapshot(cleaned, labels, d.validation_fraction, d.seed)
    for split, reasons in report.dropped.items():
        examples = {k: v for k, v in report.examples.items() if k.startswith(f"{split}:")}
        logger.warning("dropped from %s: %s (examples: %s)", split, reasons, examples)
    store.ensure_dvc_repo(root, cfg.dvc.remote_name, cfg.dvc.remote_url)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".staging-") as tmp:
        staged = Path(tmp) / "snapshot"
        write_snapshot({**splits, **oos}, labels, report, staged, scope)
        dvc_file = store.dvc_file_for(root, folder)
        staged_md5 = store.dir_md5(staged)
        recorded = store.snapshot_md5(dvc_file) if dvc_file.is_file() else None
        changed = recorded != staged_md5  # a new snapshot, not merely a missing data/ (a fresh clone) put back
        if not changed and folder.is_dir() and store.dir_md5(folder) == staged_md5:
            md5 = store.push_snapshot(root, folder, cfg.dvc.remote_name)  # make sure the remote holds it
        else:
            md5 = store.publish_snapshot(root, staged, folder, cfg.dvc.remote_name)
    snapshot = freeze(cfg)
    rows = {name: len(df) for name, df in {**splits, **oos}.items()}
    logger.info("data snapshot %s (%s): %s rows, %d labels, pushed to DVC remote %r", md5,
                "new" if changed else "unchanged", rows, len(labels), cfg.dvc.remote_name)
    return snapshot, {"rows": rows, "labels": len(labels), "dropped": report.dropped, "changed": changed,
                      "scope": scope.to_dict() if scope.active else None}


def freeze(cfg: Config) -> SnapshotRef:
    """A verified, run-private copy of the tracked snapshot (see ``store.freeze_snapshot``)."""
    root, folder = Path(cfg.root), cfg.path(cfg.data.snapshot_dir)
    md5, path = store.freeze_snapshot(folder, store.dvc_file_for(root, folder), cfg.work.snapshots)
    return SnapshotRef(md5=md5, path=str(path))


@task(name="verify-snapshot", cache_policy=NO_CACHE)
def verify_snapshot(cfg: Config) -> SnapshotRef:
    """The snapshot ``data.dvc`` records, checked byte for byte: what every later step of the run reads."""
    snapshot = freeze(cfg)
    get_run_logger().info("data snapshot %s verified (%s)", snapshot.md5, snapshot.path)
    return snapshot
