"""Ingest flow: source data -> checked, split snapshot in ``data/`` -> DVC (``data.dvc``) -> remote."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from tasks.data import prepare_snapshot, version_snapshot


@flow(name="ingest", log_prints=True)
def ingest_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Build the data snapshot and version it; re-ingesting unchanged input changes nothing."""
    cfg = load_config(config_path, overrides)
    prepared = prepare_snapshot(cfg)
    md5 = version_snapshot(cfg)
    print(f"data snapshot {md5}: {prepared['rows']} rows ({'changed' if prepared['changed'] else 'unchanged'})")
    return {**prepared, "snapshot_md5": md5}
