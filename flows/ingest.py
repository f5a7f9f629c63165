"""Ingest flow: source data -> checked, split snapshot in ``data/`` -> DVC (``data.dvc``) -> remote."""

from __future__ import annotations

from prefect import flow

from distillery.config import Config
from distillery.records import SnapshotRef
from distillery.tasks.data import ingest_snapshot


@flow(name="ingest", flow_run_name="ingest", log_prints=True, validate_parameters=False)
def ingest_flow(cfg: Config) -> tuple[SnapshotRef, dict]:
    """Build the data snapshot and version it, all or nothing; re-ingesting unchanged input changes nothing."""
    snapshot, report = ingest_snapshot(cfg)
    print(f"data snapshot {snapshot.md5}: {report['rows']} rows ({'changed' if report['changed'] else 'unchanged'})")
    return snapshot, report
