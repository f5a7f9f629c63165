"""The production-safe core: registry faults are never read as "absent", promotion is two-phase and reconciled,
training repeats under any task runner, runs read verified snapshots, a failed ingest changes nothing, and `gc`
keeps what the champion and the latest runs need."""

from __future__ import annotations

import threading
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from distillery.config import load_config
from distillery.faults import InjectedFault
from distillery.integrations import registry, store
from distillery.records import DECISION_TAG, PENDING, PROMOTED
from distillery.models.gate import plan_reconcile
from tests.helpers import free_port, run_command

ROOT = Path(__file__).resolve().parent.parent



# ------------------------------------------------------------------ 1. registry faults are not "absent"


def test_unreachable_registry_is_an_error_never_an_empty_registry(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    reg = registry.Registry(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)
    with pytest.raises(registry.RegistryUnavailable, match="did not answer .* after 2 attempt"):
        reg.alias_version("student", "champion")
    with pytest.raises(registry.RegistryUnavailable):
        reg.versions("student")
    with pytest.raises(registry.RegistryUnavailable):
        reg.run("0" * 32)


def test_the_gate_never_drops_the_champion_criterion_on_a_fault(monkeypatch, tmp_path):
    """champion_metrics answers "no champion" only when the registry says so; a dead store raises."""
    from distillery.integrations.promotion import champion_metrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(ROOT / "distillery.yaml", {"tracking.retries": 1})
    dead = registry.Registry(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(registry.RegistryUnavailable):
        champion_metrics(cfg, dead)
    empty = registry.Registry(f"sqlite:///{tmp_path / 'm.db'}")
    assert champion_metrics(cfg, empty) == (None, None)


def test_missing_things_are_none_or_not_found(tmp_path):
    reg = registry.Registry(f"sqlite:///{tmp_path / 'm.db'}")
    assert reg.alias_version("student", "champion") is None  # no such model
    assert reg.versions("student") == []
    reg.client.create_registered_model("student")
    assert reg.alias_version("student", "champion") is None  # model, no alias
    with pytest.raises(registry.NotFound, match="distillery teacher"):
        reg.resolve("student", "3")
    reg.delete_version("student", "3")  # deleting what is gone is what a delete wants


def test_a_flaky_store_is_retried_with_backoff(tmp_path):
    reg = registry.Registry(f"sqlite:///{tmp_path / 'm.db'}", retries=3, backoff_s=0.01)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "answer"

    assert reg._call("reading something", flaky) == "answer" and len(calls) == 3
    calls.clear()
    with pytest.raises(registry.RegistryUnavailable, match="connection reset"):
        registry.Registry(f"sqlite:///{tmp_path / 'm.db'}", retries=2, backoff_s=0.01)._call("reading something", flaky)
    assert len(calls) == 2


# ------------------------------------------------------------------ 2. two-phase promotion


def test_reconcile_plan_finishes_what_served_and_deletes_what_never_did():
    versions = [("1", PROMOTED, False), ("2", PENDING, False), ("3", PENDING, True), ("4", "rejected", False),
                ("5", None, False)]
    assert plan_reconcile(versions, PENDING, PROMOTED) == [("2", "delete"), ("3", "finish")]


@pytest.mark.usefixtures("prefect_harness")
def test_a_crash_inside_promotion_leaves_the_alias_and_is_reconciled(teacher_project: Path, monkeypatch):
    from distillery.commands.admin import collect_garbage, status_of

    cfg_path = teacher_project / "distillery.yaml"
    overrides = {"gate.champion_tolerance": 1.0, "distill.epochs": 2}
    cfg = load_config(cfg_path, overrides)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    before = run_command(cfg_path, overrides=overrides, force=True).decision.version  # a champion to keep

    # crash between registration and the alias move: alias unchanged, the new version is only "pending"
    monkeypatch.setenv("DISTILLERY_FAULTS", "promote.registered=raise")
    with pytest.raises(InjectedFault):
        run_command(cfg_path, overrides=overrides, force=True)
    assert str(client.get_model_version_by_alias("student", "champion").version) == before
    states = {str(v.version): v.tags.get(DECISION_TAG) for v in client.search_model_versions("name='student'")}
    orphan = max(states, key=int)
    assert states[orphan] == PENDING and orphan != before
    promoted_without_alias = [v for v, s in states.items() if s == PROMOTED and v != before and int(v) > int(before)]
    assert promoted_without_alias == []  # nothing claims to have served
    assert status_of(cfg)["leftovers"] == [{"version": orphan, "state": PENDING, "next_run_will": "delete"}]

    # crash after the alias moved, before the final mark: it serves, so reconciliation finishes it
    monkeypatch.setenv("DISTILLERY_FAULTS", "promote.alias_moved=raise")
    with pytest.raises(InjectedFault):
        run_command(cfg_path, overrides=overrides, force=True)
    serving = client.get_model_version_by_alias("student", "champion")
    assert serving.tags[DECISION_TAG] == PENDING and str(serving.version) != before
    assert orphan not in {str(v.version) for v in client.search_model_versions("name='student'")}  # run 2 cleaned it

    monkeypatch.delenv("DISTILLERY_FAULTS")
    report = collect_garbage(cfg)
    assert (str(serving.version), "finish") in report["registry"]
    assert client.get_model_version("student", serving.version).tags[DECISION_TAG] == PROMOTED
    assert status_of(cfg)["leftovers"] == []


# ------------------------------------------------------------------ 3. reproducible training


def test_concurrent_trainings_match_sequential_ones(tiny_teacher_dir: Path):
    """Two candidates trained side by side in threads get exactly the weights each gets alone (dropout included)."""
    import torch

    from distillery.models.modeling import build_student, load_classifier, load_tokenizer
    from distillery.models.training import DistillationObjective, TrainSettings, encode, train_model
    from tests.helpers import make_frames

    train_df, test_df = make_frames()
    tokenizer = load_tokenizer(tiny_teacher_dir)
    labels = sorted(set(train_df["category"]))
    y = [labels.index(c) for c in train_df["category"]]
    rng = torch.Generator().manual_seed(0)
    soft = torch.randn(len(y), len(labels), generator=rng).numpy()
    train = encode(tokenizer, train_df["text"].tolist(), 16, y, soft)
    val = encode(tokenizer, test_df["text"].tolist(), 16, [labels.index(c) for c in test_df["category"]])
    settings = TrainSettings(epochs=2, batch_size=16, learning_rate=3e-3, max_length=16, seed=7,
                             group_by_length=False)

    def candidate(temperature: float) -> dict:
        teacher = load_classifier(tiny_teacher_dir)
        student = build_student(teacher, "config", [], 1, 16, 2, 32, seed=5)  # random init: seeded too
        assert student.config.hidden_dropout_prob > 0  # dropout draws from torch's generator every step
        train_model(student, DistillationObjective(temperature, 0.7, 0.3), train, val, settings, 0, progress=False)
        return {k: v.clone() for k, v in student.state_dict().items()}

    sequential = [candidate(1.0), candidate(3.0)]
    together: list = [None, None]
    threads = [threading.Thread(target=lambda i=i, t=t: together.__setitem__(i, candidate(t)))
               for i, t in enumerate((1.0, 3.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for alone, side_by_side in zip(sequential, together):
        assert alone.keys() == side_by_side.keys()
        assert all(torch.equal(alone[k], side_by_side[k]) for k in alone)


# ------------------------------------------------------------------ 4. verified snapshots


@pytest.mark.usefixtures("prefect_harness")
def test_runs_read_a_verified_snapshot(project: Path):
    import pandas as pd

    cfg_path = project / "distillery.yaml"
    ingested = run_command(cfg_path, "ingest").snapshot
    data = project / "data"
    # our hash is DVC's hash: it is what `dvc add` wrote into data.dvc
    assert store.dir_md5(data) == store.snapshot_md5(project / "data.dvc") == ingested.md5
    assert store.dir_md5(Path(ingested.path)) == ingested.md5  # the run-private copy a run reads

    # data/ rewritten but not `dvc add`-ed: a run stops before it reads anything
    train = pd.read_parquet(data / "train.parquet")
    train.iloc[:-1].to_parquet(data / "train.parquet", index=False)
    with pytest.raises(store.VersioningError, match="does not hold the snapshot data.dvc records") as caught:
        run_command(cfg_path, "teacher")
    assert "distillery ingest" in str(caught.value) and "dvc checkout" in str(caught.value)
    # the copy an earlier run froze is untouched by the rewrite
    assert store.dir_md5(Path(ingested.path)) == ingested.md5


# ------------------------------------------------------------------ 7. a failed ingest changes nothing


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_with_an_unreachable_remote_changes_nothing(project: Path):
    cfg_path = project / "distillery.yaml"
    run_command(cfg_path, "ingest")
    dvc_before = (project / "data.dvc").read_text()
    data_before = store.dir_md5(project / "data")
    with open(project / "source" / "train.csv", "a") as f:
        f.write("is there a fee to top up with a card,top_up\n")  # a real change: a new snapshot would be made
    dead = f"http://127.0.0.1:{free_port()}/remote"
    with pytest.raises(store.VersioningError) as caught:
        run_command(cfg_path, "ingest", {"dvc.remote_url": dead})
    message = str(caught.value)
    assert "dvc push" in message and "Having any troubles" not in message and "dvc.org/support" not in message
    assert "no reason given" not in message  # DVC's own reason, which its quiet flag used to hide
    assert (project / "data.dvc").read_text() == dvc_before
    assert store.dir_md5(project / "data") == data_before
    assert not (project / "data.previous").exists()
    # with the remote back, the same ingest goes through
    assert run_command(cfg_path, "ingest").snapshot.md5 != yaml.safe_load(dvc_before)["outs"][0]["md5"]


def test_a_failing_dvc_push_says_dvc_s_reason(tmp_path: Path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("a\n")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote should be\n")
    store.ensure_dvc_repo(tmp_path / "repo", "local", str(tmp_path / "remote"))
    store.run_dvc(tmp_path / "repo", "remote", "add", "--local", "--force", "--default", "local", str(blocker / "sub"))
    with pytest.raises(store.VersioningError) as caught:
        store.push_snapshot(tmp_path / "repo", data, "local")
    assert "Not a directory" in str(caught.value) and "no reason given" not in str(caught.value)


# ------------------------------------------------------------------ 5. cleanup


@pytest.mark.usefixtures("prefect_harness")
def test_gc_keeps_what_the_champion_and_latest_runs_need(teacher_project: Path):
    import os
    import time

    from distillery.commands.admin import collect_garbage, lineage_of, verify_lineage
    from distillery.paths import COLLECTED, KEPT

    cfg_path = teacher_project / "distillery.yaml"
    overrides = {"gate.champion_tolerance": 1.0}
    run_command(cfg_path, overrides=overrides, force=True)
    cfg = load_config(cfg_path, overrides)
    work = cfg.workdir
    # whatever a run leaves in the work folder is of a kind the catalog names (a new kind must be added there)
    assert {p.name for p in work.iterdir()} <= set(COLLECTED) | set(KEPT), sorted(p.name for p in work.iterdir())
    old = time.time() - 7 * 86400
    for kind in COLLECTED:
        for i in range(3):
            stale = cfg.work.kind(kind) / f"stale-{i}"
            stale.mkdir(parents=True, exist_ok=True)
            (stale / "blob").write_bytes(b"x" * 1000)
            os.utime(stale, (old - i, old - i))
    (work / "registry" / "student-v999.partial").mkdir(parents=True)
    dry = collect_garbage(cfg, keep_runs=1, dry_run=True)
    assert "registry/student-v999.partial" in dry["deleted"] and (work / "registry" / "student-v999.partial").exists()

    report = collect_garbage(cfg, keep_runs=1)
    assert {f"checkpoints/stale-{i}" for i in range(3)} <= set(report["deleted"])
    for kind in COLLECTED:  # every kind is collected: two older entries than the one kept
        assert {f"{kind}/stale-1", f"{kind}/stale-2"} <= set(report["deleted"]), kind
        assert not (cfg.work.kind(kind) / "stale-2").exists()
    assert not (work / "registry" / "student-v999.partial").exists()
    for kind in ("checkpoints", "students", "data-docs"):
        assert len(list((work / kind).iterdir())) == 1  # the latest run's
    snapshot_md5 = store.snapshot_md5(teacher_project / "data.dvc").removesuffix(".dir")
    assert (work / "snapshots" / snapshot_md5).is_dir()
    assert all(ok for _, ok, _ in verify_lineage(cfg, lineage_of(cfg, "student@champion")))
    # what the next run needs is still there: an unchanged re-run is skipped, a forced one completes
    assert run_command(cfg_path, overrides=overrides).skipped
    assert run_command(cfg_path, overrides=overrides, force=True).decision.passed


# ------------------------------------------------------------------ 6. one entry for every deployment


def test_every_deployment_enters_through_the_pipeline():
    """Deployments run what the CLI runs: one config load, the configured task runner, the run lock."""
    import inspect

    from distillery.flows import pipeline

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entries = {d["name"]: d["entrypoint"] for d in spec["deployments"]}
    assert set(entries.values()) <= {"flows/pipeline.py:pipeline_flow", "flows/pipeline.py:watch_flow",
                                     "flows/pipeline.py:monitor_entry"}
    commands = {d["name"]: d.get("parameters", {}).get("command") for d in spec["deployments"]}
    assert commands["redistill-on-change"] == "distill" and commands["scheduled-redistill"] == "run"
    assert commands["redistill-on-drift"] == "distill"
    drift = next(d for d in spec["deployments"] if d["name"] == "redistill-on-drift")["triggers"][0]
    assert drift["expect"] == ["distillery.drift.detected"] and "production" in drift["parameters"]
    gpu = next(d for d in spec["deployments"] if d["name"] == "run-on-gpu")  # a GPU worker's pool, by config
    assert gpu["parameters"]["overrides"] == {"runtime.device": "cuda"} and "env" in gpu["work_pool"]["job_variables"]
    assert "production" in inspect.signature(pipeline.pipeline_flow.fn).parameters
    assert "command" in inspect.signature(pipeline.pipeline_flow.fn).parameters
