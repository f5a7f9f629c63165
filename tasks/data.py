"""Prefect tasks for the in-domain data: build the checked snapshot, version it with DVC, hand runs a verified copy."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import store
from distillery.records import SnapshotRef
from distillery.models.data import prepare_data


@task(name="ingest-snapshot", cache_policy=NO_CACHE)
def ingest_snapshot(cfg: Config) -> tuple[SnapshotRef, dict]:
    """Read and check the source, write the split snapshot, version it with DVC and push it, all or nothing.

    A failure at any point (bad data, DVC remote unreachable) leaves ``data/`` and ``data.dvc`` as they were.
    """
    logger = get_run_logger()
    prepared = prepare_data(cfg.path(cfg.data.source), cfg.data)
    if prepared.scope.active:
        logger.info("out of scope: %s; rows %s", prepared.scope.to_dict(), {k: len(v) for k, v in prepared.oos.items()})
    for split, reasons in prepared.report.dropped.items():
        examples = {k: v for k, v in prepared.report.examples.items() if k.startswith(f"{split}:")}
        logger.warning("dropped from %s: %s (examples: %s)", split, reasons, examples)
    md5, changed = store.version_snapshot(Path(cfg.root), cfg.path(cfg.data.snapshot_dir), prepared,
                                          cfg.dvc.remote_name, cfg.dvc.remote_url)
    snapshot = freeze(cfg)
    logger.info("data snapshot %s (%s): %s rows, %d labels, pushed to DVC remote %r", md5,
                "new" if changed else "unchanged", prepared.rows, len(prepared.labels), cfg.dvc.remote_name)
    return snapshot, {"rows": prepared.rows, "labels": len(prepared.labels), "dropped": prepared.report.dropped,
                      "changed": changed, "scope": prepared.scope.to_dict() if prepared.scope.active else None}


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
