"""The one pipeline entry, used by the CLI and by every deployment in prefect.yaml.

It loads the configuration once and hands it down, picks the task runner for the flows that map work (labelling
shards, sweep candidates), and holds the run lock around everything that writes the data snapshot or the student
registry, so a scheduled ingest can never rewrite ``data/`` under a running distillation.

Commands: ``run`` (ingest -> teacher when none is registered -> distil), ``ingest``, ``teacher`` (fine-tune),
``import-teacher`` (register an existing classifier), ``label``, ``distill``; ``watch`` compares the registry with
the champion and emits the re-distill event; ``monitor`` judges the champion's production traffic and emits the
drift event.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow

from distillery.config import Config, ConfigError, load_config
from distillery.records import RunResult
from distillery.flows.distill import distill_flow
from distillery.flows.ingest import ingest_flow
from distillery.flows.label import label_flow
from distillery.flows.monitor import monitor_flow
from distillery.flows.runners import run_lock, task_runner_for
from distillery.flows.teacher import teacher_flow, teacher_import_flow
from distillery.tasks.data import add_production_texts, verify_snapshot
from distillery.tasks.events import check_for_changes, emit_redistill_task
from distillery.tasks.teacher import current_teacher_version, resolve_teacher

COMMANDS = ("run", "ingest", "teacher", "import-teacher", "label", "distill")


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    teacher = f"-teacher-v{params['teacher_version']}" if params.get("teacher_version") else ""
    return f"{params.get('command', 'run')}{teacher}"


@flow(name="distillery", log_prints=True, flow_run_name=_run_name)
def pipeline_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None, command: str = "run",
                  teacher_version: str | None = None, force: bool = False,
                  teacher_source: str | None = None, production: dict[str, Any] | None = None) -> RunResult:
    """Run one pipeline command on one configuration (``config_path`` + dotted ``overrides``). ``production`` (a
    window of the prediction log: ``log``, ``start``, ``end``, ``model``, as ``distillery.drift.detected`` carries
    it) adds that window's texts to the snapshot's production transfer set before a ``run`` or ``distill``."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown pipeline command {command!r}: one of {', '.join(COMMANDS)}")
    if production and command not in ("run", "distill"):
        raise ConfigError(f"production texts are added by `run` or `distill`, not `{command}`")
    cfg = load_config(config_path, overrides)
    return run_command(cfg, command, teacher_version, force, teacher_source, production)


def _bootstrap_teacher(cfg: Config, snapshot, source: str | None):  # noqa: ANN001, ANN202 - SnapshotRef -> TeacherRef
    """A first teacher: imported from ``source`` (or teacher.source) when given, else fine-tuned."""
    source = source or cfg.teacher.source
    return teacher_import_flow(cfg, snapshot, source) if source else teacher_flow(cfg, snapshot)


def run_command(cfg: Config, command: str, teacher_version: str | None = None, force: bool = False,
                teacher_source: str | None = None, production: dict[str, Any] | None = None) -> RunResult:
    """The pipeline's wiring for one command, on a configuration loaded once."""
    if command in ("teacher", "import-teacher") and cfg.teacher.kind != "registered":
        what = (", ".join(cfg.teacher.ensemble.members) if cfg.teacher.kind == "ensemble"
                else cfg.teacher.endpoint.url)
        raise ConfigError(f"teacher.kind is {cfg.teacher.kind} ({what}): there is no teacher to "
                          f"{'fine-tune' if command == 'teacher' else 'import'}; set teacher.kind: registered (an "
                          f"ensemble's members are registered teachers, each made with teacher.kind: registered)")
    if command == "teacher":
        snapshot = verify_snapshot(cfg)
        return RunResult(command=command, snapshot=snapshot, teacher=teacher_flow(cfg, snapshot))
    if command == "import-teacher":
        if not (teacher_source or cfg.teacher.source):
            raise ConfigError("import-teacher needs a SOURCE (a model folder or MLflow model URI) or teacher.source")
        snapshot = verify_snapshot(cfg)
        return RunResult(command=command, snapshot=snapshot, teacher=_bootstrap_teacher(cfg, snapshot, teacher_source))
    if command == "label":
        snapshot = verify_snapshot(cfg)
        teacher = resolve_teacher(cfg, teacher_version, snapshot)
        outputs = label_flow.with_options(task_runner=task_runner_for(cfg))(cfg, snapshot, teacher)
        return RunResult(command=command, snapshot=snapshot, teacher=teacher, outputs=outputs)
    with run_lock(cfg):
        report = None
        if command in ("run", "ingest"):
            snapshot, report = ingest_flow(cfg)
            if command == "ingest":
                return RunResult(command=command, snapshot=snapshot, ingest=report)
        else:
            snapshot = verify_snapshot(cfg)
        if production:
            snapshot, _ = add_production_texts(cfg, production)
        if command == "run" and teacher_version is None and current_teacher_version(cfg) is None:
            teacher_version = _bootstrap_teacher(cfg, snapshot, teacher_source).version
        teacher = resolve_teacher(cfg, teacher_version, snapshot)
        result = distill_flow.with_options(task_runner=task_runner_for(cfg))(cfg, snapshot, teacher, force)
    return dataclasses.replace(result, command=command, ingest=report)


@flow(name="teacher-watch", log_prints=True)
def watch_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Poll once (deploy it on a schedule); emits ``distillery.redistill.requested`` on a change."""
    cfg = load_config(config_path, overrides)
    snapshot = verify_snapshot(cfg)
    change = check_for_changes(cfg, snapshot)
    if change["changed"]:
        change["event_id"] = emit_redistill_task(cfg, change["teacher_version"], snapshot, change["reason"])
    print(("change: " if change["changed"] else "no change: ") + change["reason"])
    return change


@flow(name="distillery-monitor", log_prints=True)
def monitor_entry(config_path: str | None = None, overrides: dict[str, Any] | None = None,
                  end: str | None = None) -> dict:
    """Judge the champion's latest window of production traffic (deploy it on a schedule); emits
    ``distillery.drift.detected`` on drift (``flows/monitor.py``)."""
    cfg = load_config(config_path, overrides)
    return monitor_flow(cfg, end).to_dict()
