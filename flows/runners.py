"""Task runners by configuration: threads on one machine, or Dask (a local cluster or a running scheduler)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from distillery.config import Config


def task_runner_for(cfg: Config):  # noqa: ANN201 - a Prefect TaskRunner
    """``runtime.task_runner: dask`` maps shards and sweep runs over Dask; otherwise a thread pool."""
    if cfg.runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.runtime.dask_address:
            return DaskTaskRunner(address=cfg.runtime.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runtime.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=max(cfg.labelling.shards, 2))


@contextmanager
def serialised(cfg: Config) -> Iterator[None]:
    """Hold the one slot of ``distillery-<student>``: overlapping runs for the same model wait, never promote twice."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = f"distillery-{cfg.tracking.student_name}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with concurrency(name, occupy=1, strict=True):
        yield
