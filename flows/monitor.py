"""The monitor flow: a window of the champion's prediction log judged against its training texts and its state at
promotion; a crossing emits ``distillery.drift.detected``, which the ``redistill-on-drift`` deployment turns into a
distillation that adds the window's texts to the transfer set."""

from __future__ import annotations

import dataclasses

from prefect import flow

from distillery.config import Config
from distillery.integrations import registry
from distillery.models.data import read_snapshot
from distillery.models.metrics import label_agreement
from distillery.tasks.data import verify_snapshot
from distillery.tasks.labelling import label_texts
from distillery.tasks.monitor import (emit_drift_task, judge, load_champion, log_uri, measure_window,
                                      read_production_window, reference_snapshot, report_drift, teacher_sample,
                                      top_labels, window_bounds)
from distillery.tasks.teacher import resolve_teacher, start_run


@dataclasses.dataclass(frozen=True)
class MonitorResult:
    """What one monitor run saw: the champion, the window, whether it was judged (enough texts) and drifted, why."""

    model: str
    window: dict
    judged: bool
    drifted: bool
    reasons: tuple[str, ...]
    measured: dict
    run_id: str
    event_id: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@flow(name="monitor", log_prints=True, validate_parameters=False)
def monitor_flow(cfg: Config, end: str | None = None) -> MonitorResult:
    """Judge the window [end - monitor.window_hours, end) of the champion's traffic; emit the event on drift. Every
    measurement (the teacher's labels included) is taken before anything is emitted: a failure emits nothing."""
    champion = load_champion(cfg)
    uri = log_uri(cfg)
    start, stop = window_bounds(cfg, end)
    window = {"log": uri, "start": start.isoformat(), "end": stop.isoformat(), "model": champion.model}
    rows = read_production_window(uri, start, stop, champion.model)
    snapshot, note = reference_snapshot(cfg, champion, verify_snapshot(cfg))
    run_id = start_run(cfg, "monitor", {"stage": "monitor", "monitor.model": champion.model,
                                        "monitor.window_start": window["start"], "monitor.window_end": window["end"]},
                       snapshot=snapshot)
    if len(rows) < cfg.monitor.min_texts:
        print(f"{champion.model}: {len(rows)} texts logged from {window['start']} to {window['end']}, fewer than "
              f"monitor.min_texts ({cfg.monitor.min_texts}): not judged")
        registry.log_to_run(cfg, run_id, metrics={"monitor.texts": float(len(rows))}, tags={"monitor.judged": "false"})
        return MonitorResult(champion.model, window, False, False, (), {"texts": float(len(rows))}, run_id)
    measured, baseline, plots = measure_window(cfg, champion, snapshot, rows)
    if cfg.monitor.teacher_sample:
        teacher = resolve_teacher(cfg, None, snapshot)
        sample = teacher_sample(cfg, rows)
        logits = label_texts(cfg, snapshot, teacher, sample["text"].tolist(), run_id)
        measured["teacher_agreement"] = label_agreement(top_labels(sample), logits, read_snapshot(snapshot.path)[1])
        measured["teacher_sample"] = float(len(sample))
    report = judge(cfg, measured, baseline)
    report_drift(cfg, run_id, champion, report, baseline, plots, window, note)
    for line in report.reasons or ["no drift: every measure within its bar"]:
        print(f"{champion.model}: {line}")
    event_id = emit_drift_task(champion, report, window, run_id) if report.drifted else None
    return MonitorResult(champion.model, window, True, report.drifted, tuple(report.reasons), report.measured, run_id,
                         event_id)
