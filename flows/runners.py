"""Task runners by configuration: threads on one machine, or Dask (a local cluster or a running scheduler)."""

from __future__ import annotations

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
