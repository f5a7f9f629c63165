"""Flow tier: real ingest and teacher bootstrap flows on a tiny model, a temporary DVC repo and MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from distillery.config import load_config
from distillery.models.data import DataError
from tests.helpers import run_command

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_ingest_versions_the_snapshot_and_is_idempotent(project: Path):
    cfg_path = str(project / "distillery.yaml")
    first = run_command(cfg_path, "ingest")
    dvc_text = (project / "data.dvc").read_text()
    md5 = yaml.safe_load(dvc_text)["outs"][0]["md5"]
    assert first.snapshot.md5 == md5 and md5.endswith(".dir")
    assert first.ingest["rows"] == {"train": 128, "validation": 32, "test": 40}
    # pushed: the remote folder holds the .dir manifest of this snapshot
    remote = project / ".distillery" / "dvc-remote"
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    second = run_command(cfg_path, "ingest")
    assert second.ingest["changed"] is False
    assert (project / "data.dvc").read_text() == dvc_text


def test_changed_source_gives_a_new_snapshot(project: Path):
    cfg_path = str(project / "distillery.yaml")
    first = run_command(cfg_path, "ingest").snapshot.md5
    with open(project / "source" / "train.csv", "a") as f:
        f.write("where is my new card in the post,card_arrival\n")
    second = run_command(cfg_path, "ingest")
    assert second.ingest["changed"] is True and second.snapshot.md5 != first


def test_bad_source_fails_before_touching_the_snapshot(project: Path):
    cfg_path = str(project / "distillery.yaml")
    good = run_command(cfg_path, "ingest").snapshot.md5
    (project / "source" / "train.csv").write_text("text,intent\nhello,card_arrival\n")
    with pytest.raises(DataError, match="missing column"):
        run_command(cfg_path, "ingest")
    assert yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"] == good


def test_teacher_bootstrap_registers_an_aliased_version_with_lineage(project: Path):
    cfg_path = str(project / "distillery.yaml")
    md5 = run_command(cfg_path, "ingest").snapshot.md5
    out = run_command(cfg_path, "teacher").teacher
    cfg = load_config(cfg_path)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    version = client.get_model_version_by_alias("teacher", "production")
    assert str(version.version) == out.version == "1"
    assert version.tags["data.snapshot_md5"] == md5
    assert version.tags["git.revision"] == "unknown"  # the temporary project is not a git repository
    assert version.tags["config.hash"] == cfg.digest()
    run = client.get_run(version.run_id)
    assert float(version.tags["metric.val_accuracy"]) == pytest.approx(run.data.metrics["val_accuracy"], abs=1e-5)
    assert run.data.params["data.snapshot_md5"] == md5
    assert "val_macro_f1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "curve.val_accuracy")] == [1, 2, 3, 4, 5, 6, 7, 8]
    # the registered model serves predictions through MLflow's generic interface
    predictions = mlflow.pyfunc.load_model("models:/teacher@production").predict(["hello pin blocked now"])
    assert predictions["label"][0] in {"card_arrival", "exchange_rate", "pin_blocked", "top_up"}

    again = run_command(cfg_path, "teacher", {"teacher.epochs": 1}).teacher
    assert again.version == "2"
    assert str(client.get_model_version_by_alias("teacher", "production").version) == "2"
