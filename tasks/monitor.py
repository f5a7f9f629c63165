"""Prefect tasks of ``distillery monitor``: the champion as served, a window of its prediction log, the window measured
against the champion's training texts and its state at promotion, the report, and the drift event."""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from distillery.config import Config, ConfigError
from distillery.errors import DistilleryError
from distillery.integrations import registry
from distillery.integrations.events import emit_drift
from distillery.integrations.prediction_log import read_window, window_texts
from distillery.integrations.served_model import ServedClassifier
from distillery.models.data import read_snapshot
from distillery.models.monitoring import (DriftReport, judge_window, label_distance, label_distance_noise,
                                          length_shift, text_drift, unknown_share, write_drift_report)
from distillery.records import Lineage, SnapshotRef


class MonitorError(DistilleryError, RuntimeError):
    """The monitor cannot judge: no champion, no log configured; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Champion:
    """The champion as served: ``name/version`` (what the log records), its classifier folder, its lineage."""

    name: str
    version: str
    folder: str
    lineage: Lineage

    @property
    def model(self) -> str:
        return f"{self.name}/{self.version}"


def log_uri(cfg: Config) -> str:
    """Where the champion's prediction log is: ``monitor.log``, else ``serving.prediction_log`` (a folder resolves
    against the config; a URI stays as it is)."""
    value = cfg.monitor.log or cfg.serving.prediction_log
    if not value:
        raise ConfigError("no prediction log to monitor: set monitor.log (or serving.prediction_log) to the folder or "
                          "URI the champion is served with (DISTILLERY_PREDICTION_LOG)")
    return value if "://" in value else str(cfg.path(value))


def window_bounds(cfg: Config, end: str | None) -> tuple[dt.datetime, dt.datetime]:
    """[end - monitor.window_hours, end) in UTC; ``end`` ISO 8601 (naive: UTC) or None for now."""
    stop = dt.datetime.fromisoformat(end) if end else dt.datetime.now(dt.timezone.utc)
    stop = stop if stop.tzinfo else stop.replace(tzinfo=dt.timezone.utc)
    return stop - dt.timedelta(hours=cfg.monitor.window_hours), stop


@task(name="load-champion", cache_policy=NO_CACHE)
def load_champion(cfg: Config) -> Champion:
    """``student@champion`` downloaded as served; an unreachable registry raises (never "no champion")."""
    registry.configure_tracking(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    version = registry.Registry.from_config(cfg).champion(cfg)
    if version is None:
        raise MonitorError(f"no {name}@{alias} to monitor: nothing has been promoted yet")
    folder = registry.download_classifier(version, cfg.work.registry)
    return Champion(name, str(version.version), str(folder), Lineage.from_tags(version.tags))


@task(name="read-prediction-window", cache_policy=NO_CACHE)
def read_production_window(uri: str, start: dt.datetime, end: dt.datetime, model: str) -> pd.DataFrame:
    """The champion's rows of the log in [start, end): a PredictionLogError for a missing or empty log, a corrupt
    file, another model's rows or digests only (nothing is judged on half a window)."""
    window = read_window(uri, start, end, model)
    window_texts(window)
    return window.dropna(subset=["text"]).reset_index(drop=True)


def reference_snapshot(cfg: Config, champion: Champion, current: SnapshotRef) -> tuple[SnapshotRef, str]:
    """The champion's training snapshot (its frozen copy here), else the current one, and a note when they differ."""
    made = champion.lineage.snapshot_md5
    if made == current.md5:
        return current, ""
    frozen = cfg.work.snapshots / made.removesuffix(".dir")
    if frozen.is_dir():
        return SnapshotRef(md5=made, path=str(frozen)), ""
    return current, (f"the champion was trained on data snapshot {made}, not kept here: its training texts are "
                     f"read from the current snapshot {current.md5}")


@task(name="measure-window", cache_policy=NO_CACHE)
def measure_window(cfg: Config, champion: Champion, snapshot: SnapshotRef, window: pd.DataFrame) -> tuple[dict, dict, dict]:
    """The window against the champion's training texts and its answers on the test split (computed here by the
    served classifier): (measured, baseline, plot data). Teacher agreement is measured apart (``teacher_agreement``)."""
    m = cfg.monitor
    splits, _ = read_snapshot(Path(snapshot.path))
    texts, test_texts = window["text"].tolist(), splits["test"]["text"].tolist()
    classifier = ServedClassifier(Path(champion.folder))
    test = classifier.predict(test_texts)
    unk = classifier.tokenizer.unk_token_id
    pieces = lambda batch: classifier.tokenizer(batch, add_special_tokens=False)["input_ids"]  # noqa: E731
    drift = text_drift(splits["train"]["text"].tolist(), texts, m.seed, m.permutations, m.max_texts)
    ks, ks_p = length_shift(splits["train"]["text"].tolist(), texts)
    labels, test_labels = window["label"].astype(str).tolist(), test["label"].astype(str).tolist()
    measured = {"texts": float(len(window)), "text_auc": drift.auc, "text_p_value": drift.p_value,
                "length_ks": ks, "length_p_value": ks_p, "unknown_share": unknown_share(pieces(texts), unk),
                "label_distance": label_distance(test_labels, labels),
                "label_distance_noise": label_distance_noise(test_labels, len(labels), m.seed),
                "mean_confidence": float(window["confidence"].mean()),
                "abstention_rate": float(window["abstained"].astype(bool).mean())}
    baseline = {"unknown_share": unknown_share(pieces(test_texts), unk),
                "mean_confidence": float(test["confidence"].mean()),
                "abstention_rate": float(test["abstained"].astype(bool).mean()),
                "teacher_agreement": champion.lineage.metrics.get("agreement")}
    plots = {"window": {"labels": labels, "lengths": [len(t.split()) for t in texts],
                        "confidences": window["confidence"].astype(float).tolist()},
             "reference": {"labels": test_labels, "lengths": [len(t.split()) for t in test_texts],
                           "confidences": test["confidence"].astype(float).tolist()}}
    return measured, baseline, plots


def teacher_sample(cfg: Config, window: pd.DataFrame) -> pd.DataFrame:
    """A seeded sample of the window (``monitor.teacher_sample`` rows) for the teacher to label."""
    n = min(cfg.monitor.teacher_sample, len(window))
    return window.sample(n=n, random_state=cfg.monitor.seed) if n < len(window) else window


def top_labels(window: pd.DataFrame) -> list[str]:
    """The champion's most probable known label per row (its answer before any abstention)."""
    return [str(top[0]["label"]) if len(top) else str(label) for top, label in zip(window["top_k"], window["label"])]


@task(name="report-drift", cache_policy=NO_CACHE)
def report_drift(cfg: Config, run_id: str, champion: Champion, report: DriftReport, baseline: dict, plots: dict,
                 window: dict, note: str) -> str:
    """The report to the MLflow run (metrics, ``drift/``: JSON, plots, the HTML page) and to a Prefect artifact;
    returns the markdown."""
    title = f"{champion.model}: production window {window['start']} to {window['end']}"
    with tempfile.TemporaryDirectory() as tmp:
        write_drift_report(Path(tmp), report, baseline, cfg.monitor.thresholds, plots["window"], plots["reference"],
                           title)
        registry.log_to_run(cfg, run_id, metrics={f"monitor.{k}": float(v) for k, v in report.measured.items()}
                            | {"monitor.drifted": float(report.drifted)}, folder=Path(tmp), artifact_path="drift",
                            tags={"monitor.drifted": str(report.drifted).lower(), "monitor.model": champion.model})
    shown = {k: v for k, v in baseline.items() if v is not None}
    lines = [f"# {'DRIFT' if report.drifted else 'No drift'}: {title}", "", *(f"- {r}" for r in report.reasons),
             *([f"- {note}"] if note else []), "", "| measure | window | at promotion (test) |", "|---|---|---|",
             *(f"| {k} | {v:.4g} | {shown[k]:.4g} |" if k in shown else f"| {k} | {v:.4g} | |"
               for k, v in report.measured.items()), "",
             f"Report: MLflow run `{run_id}`, artifacts `drift/drift_report.html`"]
    markdown = "\n".join(lines)
    create_markdown_artifact(key=f"distillery-{champion.name}-drift".lower().replace("_", "-"), markdown=markdown,
                             description=("DRIFT: " + "; ".join(report.reasons)) if report.drifted else "no drift")
    return markdown


@task(name="emit-drift", cache_policy=NO_CACHE)
def emit_drift_task(champion: Champion, report: DriftReport, window: dict, run_id: str) -> str | None:
    event_id = emit_drift(champion.name, champion.version, report.reasons, window, run_id)
    get_run_logger().warning("emitted distillery.drift.detected for %s: %s", champion.model, "; ".join(report.reasons))
    return event_id


def judge(cfg: Config, measured: dict, baseline: dict) -> DriftReport:
    return judge_window(measured, baseline, cfg.monitor.thresholds)
