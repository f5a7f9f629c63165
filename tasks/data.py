"""Prefect tasks for the in-domain data: build the checked snapshot, version it with DVC, hand runs a verified copy."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import store
from distillery.records import PRODUCTION_BASE_TAG, PRODUCTION_SHA_TAG, PRODUCTION_TEXTS_TAG, SnapshotRef
from distillery.models.data import (PRODUCTION_FILE, held_out_rows, merge_production, prepare_data, read_production,
                                    write_production)


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


@task(name="add-production-texts", cache_policy=NO_CACHE)
def add_production_texts(cfg: Config, production: dict) -> tuple[SnapshotRef, dict]:
    """Add the texts of a window of the prediction log (``production``: ``log``, ``start``, ``end``, ``model``, as
    the drift event carries them) to the snapshot's production transfer set, version it with DVC and push it, all
    or nothing (``store.publish_with``). Never a validation or test text; the newest ``monitor.production_max_texts``
    kept. The window must hold texts, not only digests (a PredictionLogError otherwise)."""
    import datetime as dt

    from distillery.integrations.prediction_log import read_window, window_texts

    logger = get_run_logger()
    start, end = (dt.datetime.fromisoformat(production[k]) for k in ("start", "end"))
    window = read_window(production["log"], start, end, production.get("model"))
    window_texts(window)  # a digest-only window is an error, not an empty addition
    window = window.dropna(subset=["text"])
    snapshot = freeze(cfg)
    held_out = held_out_rows(Path(snapshot.path))["text"].tolist()
    existing = read_production(Path(snapshot.path))
    kept, counts = merge_production(existing, window["text"].tolist(),
                                    [str(t) for t in window["time"]], held_out, cfg.monitor.production_max_texts)
    if counts["added"] == 0 and len(kept) == len(existing):
        logger.info("production texts: none new in the window (%s); data snapshot %s unchanged", counts, snapshot.md5)
        return snapshot, counts
    md5 = store.publish_with(Path(cfg.root), cfg.path(cfg.data.snapshot_dir), cfg.dvc.remote_name,
                             lambda staged: write_production(kept, staged))
    snapshot = freeze(cfg)
    logger.info("production texts from %s (%s to %s): %s; data snapshot %s, pushed to DVC remote %r",
                production["log"], production["start"], production["end"], counts, md5, cfg.dvc.remote_name)
    return snapshot, counts


def production_tags(snapshot: SnapshotRef) -> dict[str, str]:
    """How many production texts the snapshot holds, their file's SHA-256 and the snapshot without them (for the
    lineage; none without)."""
    import hashlib

    path = Path(snapshot.path) / PRODUCTION_FILE
    if not path.is_file():
        return {}
    return {PRODUCTION_TEXTS_TAG: str(len(read_production(Path(snapshot.path)))),
            PRODUCTION_SHA_TAG: hashlib.sha256(path.read_bytes()).hexdigest(),
            PRODUCTION_BASE_TAG: store.dir_md5(Path(snapshot.path), exclude=(PRODUCTION_FILE,))}
