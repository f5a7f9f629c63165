"""Task runners by configuration (threads on one machine, or Dask), and the lock that serialises runs."""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.task_runners import ThreadPoolTaskRunner

from distillery.config import Config
from distillery.models.devices import spread_devices


def task_runner_for(cfg: Config):  # noqa: ANN201 - a Prefect TaskRunner
    """``runtime.task_runner: dask`` maps shards and sweep runs over Dask; otherwise a thread pool."""
    if cfg.runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.runtime.dask_address:
            return DaskTaskRunner(address=cfg.runtime.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runtime.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=max(cfg.labelling.shards, 2))


def spread_over_gpus(cfg: Config, jobs: int) -> list[Config]:
    """``cfg`` for each of ``jobs`` trainings submitted side by side: on a local Dask cluster (worker processes on
    this machine, training side by side) with several CUDA GPUs seen here (``runtime.device`` auto or cuda), one GPU
    each in turn (models.devices.spread_devices); otherwise ``cfg`` for all. Threads train one at a time (they share
    the process's random generator: models.randomness), and a remote cluster's workers resolve ``runtime.device``
    among the GPUs they see (e.g. one per worker by CUDA_VISIBLE_DEVICES)."""
    if cfg.runtime.task_runner != "dask" or cfg.runtime.dask_address:
        return [cfg] * jobs
    return [cfg if d == cfg.runtime.device else cfg.on_device(d) for d in spread_devices(cfg.runtime.device, jobs)]


def _logger():  # noqa: ANN202 - the run's logger inside a flow, else this module's
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def run_lock(cfg: Config) -> Iterator[None]:
    """One run at a time for a student model: ingest, distillation and promotion happen inside it.

    ``runtime.lock: file`` (default) holds an exclusive ``flock`` on ``<workdir>/locks/<student>.lock``: the kernel
    releases it when the holder exits, even on ``kill -9``, so a crashed run never blocks the next one.
    ``runtime.lock: prefect`` holds the one slot of the global concurrency limit ``distillery-<student>`` on the
    Prefect server, for workers spread over several machines (a crashed holder's lease expires on the server).
    """
    name = f"distillery-{cfg.tracking.student_name}"
    if cfg.runtime.lock == "prefect":
        from prefect.client.orchestration import get_client
        from prefect.concurrency.sync import concurrency

        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        with concurrency(name, occupy=1, strict=True):
            yield
        return
    folder = cfg.work.locks
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{cfg.tracking.student_name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            _logger().warning("another distillery run (%s) holds %s: waiting for it", handle.read().strip() or "?", name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
