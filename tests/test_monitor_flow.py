"""`distillery monitor` end to end on a real champion: its own loader logs the traffic, the monitor judges windows
(in-distribution: no alarm; another domain: drift, the event, the report), and a re-distil on the drifted window
adds its texts to the DVC-versioned snapshot and records them in the new champion's lineage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import run_command
from tests.test_monitoring import shifted

MONITOR = {"monitor.min_texts": 20, "monitor.teacher_sample": 30}


@pytest.fixture(scope="module")
def champion_project(teacher_project: Path) -> Path:
    result = run_command(teacher_project / "distillery.yaml", "distill")
    assert result.decision.passed, result.decision.reasons
    return teacher_project


def serve(project: Path, texts: list[str], log: Path) -> str:
    """The champion's own loader with the log on (model config), asked ``texts`` in requests of 8; its name/version."""
    import mlflow

    from distillery.config import load_config
    from distillery.integrations import registry

    cfg = load_config(project / "distillery.yaml")
    registry.configure_tracking(cfg)
    version = registry.Registry.from_config(cfg).alias_version("student", "champion").version
    model = mlflow.pyfunc.load_model("models:/student@champion", model_config={
        "prediction_log": str(log), "prediction_log_model": f"student/{version}", "prediction_log_flush_s": 0.2})
    for start in range(0, len(texts), 8):
        model.predict(texts[start:start + 8])
    model.unwrap_python_model().log.close()
    return f"student/{version}"


def monitor(project: Path, log: Path, **overrides):  # noqa: ANN003, ANN201 - MonitorResult
    from distillery.config import load_config
    from distillery.flows.monitor import monitor_flow

    cfg = load_config(project / "distillery.yaml", {**MONITOR, "monitor.log": str(log), **overrides})
    return monitor_flow(cfg)


def test_in_distribution_traffic_raises_no_alarm_and_another_domain_leads_to_a_redistilled_champion(
        champion_project, tmp_path):
    import mlflow

    from distillery.commands.admin import lineage_of, verify_lineage
    from distillery.config import load_config
    from distillery.flows.pipeline import pipeline_flow
    from distillery.models.data import read_snapshot

    project = champion_project
    cfg_path = project / "distillery.yaml"
    cfg = load_config(cfg_path)
    splits, _ = read_snapshot(cfg.path("data"))
    calm_log, storm_log = tmp_path / "calm", tmp_path / "storm"

    # held-out texts of the training distribution (the validation split, carved from train at random; the fixture's
    # test split is made from other templates), as production would send them: judged, no alarm, no event
    model = serve(project, splits["validation"]["text"].tolist(), calm_log)
    calm = monitor(project, calm_log)
    assert calm.judged and not calm.drifted, calm.reasons
    assert calm.event_id is None and calm.measured["teacher_agreement"] >= 0.8
    assert calm.measured["text_auc"] < 0.7 and calm.measured["label_distance"] < 0.1

    # texts of another domain: input drift, unknown word pieces, the event with the window to re-distil on
    texts = shifted(60)
    assert serve(project, texts, storm_log) == model
    storm = monitor(project, storm_log)
    assert storm.judged and storm.drifted and storm.event_id is not None
    assert any(r.startswith("input drift") for r in storm.reasons)
    assert storm.measured["unknown_share"] > calm.measured["unknown_share"], (storm.measured, calm.measured)
    assert storm.window["model"] == model and storm.window["log"] == str(storm_log)
    run = mlflow.MlflowClient().get_run(storm.run_id)
    assert run.data.tags["monitor.drifted"] == "true" and run.data.metrics["monitor.text_auc"] > 0.9
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(storm.run_id, "drift")}
    assert {"drift/drift_report.html", "drift/drift.json", "drift/labels.png"} <= files
    report = Path(mlflow.artifacts.download_artifacts(run_id=storm.run_id, artifact_path="drift/drift_report.html"))
    page = report.read_text()
    assert "DRIFT" in page and "data:image/png;base64," in page and "input drift" in page

    # what the trigger runs: a distillation with the drifted window's texts in the snapshot's production transfer set
    before = lineage_of(cfg, "student@champion")
    gate = {"gate.production_min_texts": 5}  # a hold-out of 60 texts' fifth is judged
    result = pipeline_flow(str(cfg_path), gate, command="distill", production=storm.window)
    assert result.snapshot.md5 != before["data"]["snapshot_md5"]
    production = pd.read_parquet(Path(result.snapshot.path) / "production.parquet")
    assert sorted(production["text"]) == sorted(set(texts))
    outputs = pd.read_parquet(result.outputs.path)
    trained, held = (set(outputs.loc[outputs["split"] == s, "text"]) for s in ("production", "production_holdout"))
    assert trained | held == set(texts) and not trained & held and 5 <= len(held) <= 25  # labelled by the teacher
    assert result.decision.passed, result.decision.reasons
    # the gate judged the student against the champion on the hold-out, as the evaluation measured both there
    criterion = next(c for c in result.decision.criteria if c["name"] == "production_agreement_vs_champion")
    evaluation = mlflow.MlflowClient().get_run(result.evaluation.run_id).data
    assert evaluation.tags["production.champion_version"] == before["version"]
    assert evaluation.metrics["production.holdout_texts"] == len(held)
    assert criterion["threshold"] == evaluation.metrics["production.champion_agreement"]
    assert f"{len(held)} held-out production texts" in criterion["rule"]
    lineage = lineage_of(cfg, "student@champion")
    assert lineage["data"]["snapshot_md5"] == result.snapshot.md5
    assert lineage["data"]["production_texts"] == len(set(texts))
    assert lineage["data"]["production_base_md5"] == before["data"]["snapshot_md5"]
    checks = verify_lineage(cfg, lineage)
    assert all(ok for _, ok, _ in checks), checks

    # the same window again adds nothing: the snapshot stays as it is
    again = pipeline_flow(str(cfg_path), gate, command="distill", production=storm.window)
    assert again.snapshot.md5 == result.snapshot.md5 and again.skipped


def test_a_monitor_that_cannot_finish_emits_nothing(champion_project, tmp_path):
    from distillery.integrations.prediction_log import PredictionLogError

    with pytest.raises(PredictionLogError, match="no prediction log"):
        monitor(champion_project, tmp_path / "missing")
    log = tmp_path / "few"
    from tests.helpers import make_texts

    serve(champion_project, make_texts("card_arrival")[:5], log)
    few = monitor(champion_project, log)
    assert not few.judged and not few.drifted and few.event_id is None
    # a teacher that cannot be had during the check: a clear error, and no event from the half-measured window
    serve(champion_project, shifted(40), tmp_path / "later")
    with pytest.raises(Exception, match="teacher@gone"):
        monitor(champion_project, tmp_path / "later", **{"teacher.alias": "gone"})
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    with pytest.raises(PredictionLogError, match="no rows"):
        from distillery.config import load_config
        from distillery.flows.monitor import monitor_flow

        monitor_flow(load_config(champion_project / "distillery.yaml", {**MONITOR, "monitor.log": str(log)}),
                     end=old.isoformat())
