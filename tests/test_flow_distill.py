"""Flow tier: the whole distil -> evaluate -> gate path on tiny models, promoting and refusing for real."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from distillery.config import load_config
from tests.helpers import run_command

pytestmark = pytest.mark.usefixtures("prefect_harness")

CRIPPLED = {"student.init": "config", "student.num_layers": 1, "student.hidden_size": 8,
            "student.num_attention_heads": 2, "student.intermediate_size": 8, "distill.max_steps": 1,
            "distill.learning_rate": 1e-6}


def _client(project: Path) -> MlflowClient:
    mlflow.set_tracking_uri(load_config(project / "distillery.yaml").tracking.uri)
    return MlflowClient()


def test_good_student_is_promoted_then_a_crippled_one_is_refused(teacher_project: Path):
    cfg_path = str(teacher_project / "distillery.yaml")
    client = _client(teacher_project)
    good = run_command(cfg_path)
    assert good.decision.passed is True and good.decision.version == "1"
    version = client.get_model_version_by_alias("student", "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["teacher.version"] == "1" and tags["teacher.name"] == "teacher"
    assert tags["data.snapshot_md5"] == good.snapshot.md5
    assert tags["config.hash"] == load_config(cfg_path).digest()
    assert tags["gx.success"] == "true" and tags["gate.decision"] == "promoted" and tags["deploy.form"] == "int8"
    assert float(tags["metric.accuracy"]) == pytest.approx(good.evaluation.metrics["student_int8"]["accuracy"],
                                                          abs=1e-5)
    assert "model_card.md" in {a.path for a in client.list_artifacts(good.run_id)}
    card = mlflow.artifacts.load_text(f"runs:/{good.run_id}/model_card.md")
    assert "PROMOTED" in card and good.snapshot.md5 in card and "student v1" in card

    # one parent evaluation run with a nested run per candidate, and the plots
    eval_run = good.evaluation.run_id
    nested = client.search_runs([client.get_run(eval_run).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{eval_run}'")
    # every form of teacher and student (FP32, torch INT8, ONNX Runtime INT8); the baseline also in the served form
    # (gate.baseline: the gate judges it too)
    assert {r.data.tags["candidate"] for r in nested} == {"teacher_fp32", "teacher_int8", "teacher_int8_onnx",
                                                          "student_fp32", "student_int8", "student_int8_onnx",
                                                          "baseline_fp32", "baseline_int8"}
    plots = {a.path for a in client.list_artifacts(eval_run, "evaluation")}
    assert {"evaluation/confusion_student.png", "evaluation/reliability.png", "evaluation/frontier.png",
            "evaluation/frontier.txt", "evaluation/per_class_f1_student_minus_teacher.png"} <= plots
    # the gate's reference: the teacher's quantised form with the best validation accuracy, recorded
    val = {k: good.evaluation.metrics[k]["val_accuracy"] for k in ("teacher_int8", "teacher_int8_onnx")}
    assert good.evaluation.reference in val and val[good.evaluation.reference] == max(val.values())
    assert tags["gate.reference"] == good.evaluation.reference and tags["evaluation.candidate"] == "student_int8"
    # the promoted model serves through MLflow
    served = mlflow.pyfunc.load_model("models:/student@champion")
    assert served.predict(["my pin is blocked"])["label"][0] in {"card_arrival", "exchange_rate", "pin_blocked", "top_up"}
    assert "DynamicQuantizedLinear" in repr(served.unwrap_python_model().classifier.model)  # served as gated: INT8
    # calibrated as measured: the served form's temperature, fitted on validation, travels with the model
    int8_run = next(r for r in nested if r.data.tags["candidate"] == "student_int8")
    assert served.unwrap_python_model().classifier.settings["calibration_temperature"] == pytest.approx(
        int8_run.data.metrics["calibration_temperature"], rel=1e-6)
    assert "ece_calibrated" in int8_run.data.metrics

    # the baseline holds no teacher knowledge: its layers came from the teacher's base model before fine-tuning
    weights = {r.data.tags["candidate"]: r.data.params["student.weights_from"] for r in client.search_runs(
        [client.get_run(good.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{good.run_id}' and tags.stage = 'train-student'")}
    assert weights == {"distilled": "teacher (layers [0])", "baseline": "base model tiny-teacher (layers [0], before fine-tuning)"}

    bad = run_command(cfg_path, overrides=CRIPPLED)
    assert bad.decision.passed is False and bad.decision.version is None
    assert any(r.startswith("FAIL accuracy_vs_int8_teacher") for r in bad.decision.reasons)
    assert any(r.startswith("FAIL accuracy_vs_champion") for r in bad.decision.reasons)
    assert str(client.get_model_version_by_alias("student", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='student'")] == ["1"]
    run = client.get_run(bad.run_id)
    assert run.data.tags["gate.decision"] == "rejected" and "accuracy_vs_int8_teacher" in run.data.tags["gate.failed"]

    # what users see in MLflow: the snapshot as a dataset input, source tags, the card as the version's description,
    # lean version tags (the full config is the run's config.json)
    made = client.get_run(good.run_id)
    inputs = made.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == good.snapshot.md5[:10]
    assert good.snapshot.md5.removesuffix(".dir")[2:] in inputs[0].dataset.source
    assert made.data.tags["mlflow.source.name"] == "distillery" and made.data.tags["prefect.flow_run_id"]
    assert made.data.params["distill.temperature"] == "2.0" and made.data.params["student.layers"] == "[0]"
    assert client.get_run(good.evaluation.run_id).inputs.dataset_inputs[0].dataset.name.endswith("-test")
    assert "config" not in tags and "# student v1" in version.description
    assert mlflow.artifacts.load_dict(f"runs:/{good.run_id}/config.json")["distill"]["temperature"] == 2.0

    # what users see in Prefect: named runs, the gate's artifact, and a rejection event an automation can act on
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as prefect:
        names = {r.name for r in prefect.read_flow_runs(limit=200)}
        assert f"distill-teacher-v1-data-{good.snapshot.md5[:8]}" in names
        assert any(a.key == "distillery-student-gate" for a in prefect.read_artifacts(limit=50))
        deadline = time.monotonic() + 30
        while True:
            page = prefect.read_events(EventFilter(event=EventNameFilter(name=["distillery.gate.rejected"])), limit=50)
            rejected = [e for e in page.events if e.payload.get("run_id") == bad.run_id]
            if rejected or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert rejected and "accuracy_vs_int8_teacher" in rejected[0].payload["failed"]


def test_sweep_runs_on_dask_and_picks_the_best(teacher_project: Path):
    cfg_path = str(teacher_project / "distillery.yaml")
    overrides = {"distill.sweep.temperature": "[1.0, 3.0]", "runtime.task_runner": "dask", "distill.epochs": 2,
                 "gate.champion_tolerance": 1.0}
    out = run_command(cfg_path, overrides=overrides)
    client = _client(teacher_project)
    children = client.search_runs([client.get_run(out.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{out.run_id}' and tags.stage = 'train-student'")
    names = sorted(r.info.run_name for r in children)
    assert names == ["baseline", "distill-T1.0-kd0.8", "distill-T3.0-kd0.8"]
    best_score = max(r.data.metrics["val_macro_f1"] for r in children if r.info.run_name != "baseline")
    assert out.best.val_macro_f1 == pytest.approx(best_score)


def test_lineage_skip_watch_and_rollback(teacher_project: Path):
    from distillery.integrations.store import snapshot_md5
    from distillery.commands.admin import lineage_of, rollback_champion, verify_lineage
    from distillery.flows.pipeline import watch_flow

    cfg_path = str(teacher_project / "distillery.yaml")
    cfg = load_config(cfg_path)
    client = _client(teacher_project)
    # whatever the earlier tests left, promote one more time from the plain config
    forced = run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}, force=True)
    assert forced.decision.passed
    cfg_tol = load_config(cfg_path, {"gate.champion_tolerance": 1.0})

    # unchanged teacher, data and config: nothing to do, and it says so
    again = run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0})
    assert again.skipped is True and again.up_to_date == forced.decision.version and again.decision is None

    info = lineage_of(cfg_tol, "student@champion")
    md5 = snapshot_md5(teacher_project / "data.dvc")
    assert info["version"] == forced.decision.version and "champion" in info["aliases"]
    assert info["data"]["snapshot_md5"] == md5 and info["teacher"]["version"] == "1"
    assert info["data"]["git_commit_with_data_dvc"] is not None
    assert info["validation"]["gx_success"] == "true" and info["gate"]["decision"] == "promoted"
    assert info["metrics"]["accuracy"] > 0 and info["config"]["distill"]["temperature"] == 2.0
    checks = verify_lineage(cfg_tol, info)
    assert all(ok for _, ok, _ in checks), checks

    # a lost snapshot fails verification
    broken = {**info, "data": {**info["data"], "snapshot_md5": "0" * 32 + ".dir"}}
    assert not dict((n, ok) for n, ok, _ in verify_lineage(cfg_tol, broken))[
        "data snapshot fetchable from DVC remote and hashes to the recorded md5"]

    # watch: up to date -> nothing; a new teacher alias -> a re-distill event
    assert watch_flow(cfg_path)["changed"] is False
    new_teacher = run_command(cfg_path, "teacher").teacher.version
    change = watch_flow(cfg_path)
    assert change["changed"] is True and change["teacher_version"] == new_teacher
    assert f"-> v{new_teacher}" in change["reason"] and change["event_id"]

    # the re-distillation that event requests promotes a student of the new teacher
    redistilled = run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}, teacher_version=new_teacher)
    assert redistilled.decision.passed and redistilled.teacher.version == new_teacher
    assert watch_flow(cfg_path)["changed"] is False

    # new data counts too: a changed source gives a new snapshot that the watch reports
    with open(teacher_project / "source" / "train.csv", "a") as f:
        f.write("my new card still has not come in the post,card_arrival\n")
    new_md5 = run_command(cfg_path, "ingest").snapshot.md5
    data_change = watch_flow(cfg_path)
    assert data_change["changed"] is True and new_md5 in data_change["reason"]

    # rollback moves the champion to the previous promoted version and records why
    current = str(client.get_model_version_by_alias("student", "champion").version)
    assert current == redistilled.decision.version
    retired, restored = rollback_champion(cfg, "bad canary")
    assert retired == current and restored == forced.decision.version
    assert str(client.get_model_version_by_alias("student", "champion").version) == restored
    assert client.get_model_version("student", retired).tags["rollback.reason"] == "bad canary"

    # promoting a version by hand makes the gate's checks again: a failing criterion moves nothing
    from distillery.commands.admin import promote_version
    from distillery.models.gate import GateError

    strict = load_config(cfg_path, {"gate.max_latency_ratio": 1e-6})
    with pytest.raises(GateError, match="FAIL latency_vs_int8_teacher"):
        promote_version(strict, retired, "canary fixed")
    assert str(client.get_model_version_by_alias("student", "champion").version) == restored
    previous, decision = promote_version(cfg_tol, retired, "canary fixed")
    assert previous == restored and decision.passed
    assert str(client.get_model_version_by_alias("student", "champion").version) == retired
    assert client.get_model_version("student", retired).tags["promotion.manual_reason"] == "canary fixed"


def test_pretrained_student_reads_with_its_own_tokenizer(teacher_project: Path, tmp_path: Path):
    from distillery.models.modeling import load_tokenizer
    from tests.helpers import build_tiny_model
    from tests.helpers import LABELS, make_frames

    train, _ = make_frames()
    other = build_tiny_model(tmp_path / "other", train["text"], LABELS, vocab_words=99)
    assert len(load_tokenizer(other)) != len(load_tokenizer(teacher_project / "tiny-teacher"))
    overrides = {"student.init": "pretrained", "student.base_model": str(other), "gate.champion_tolerance": 1.0,
                 "distill.learning_rate": 3e-3, "distill.epochs": 10, "distill.patience": 10,
                 # the tiny teacher is underconfident (ECE ~0.5): give the random-init student the hard labels too
                 "distill.kd_weight": 0.5, "distill.ce_weight": 0.5, "distill.temperature": 1.0,
                 "student.frontier": [{"pretrained_layers": [1]}]}  # and a one-layer cut of it on the frontier
    out = run_command(teacher_project / "distillery.yaml", overrides=overrides)
    assert len(load_tokenizer(Path(out.best.folder))) == len(load_tokenizer(other))
    assert out.evaluation.students == ("student", "other-cut1", "baseline")  # the baseline last: the gate judges it too
    assert out.evaluation.metrics["other-cut1_int8"]["parameters"] < out.evaluation.metrics["student_fp32"]["parameters"]
    assert out.evaluation.metrics["student_fp32"]["parameters"] <= out.evaluation.metrics["teacher_fp32"]["parameters"]
    # the harness read the test split through the student's own tokenizer: recomputing it that way agrees exactly
    from distillery.models.data import read_snapshot
    from distillery.models.metrics import classification_metrics
    from distillery.models.modeling import load_classifier
    from distillery.models.training import encode, predict_logits

    splits, labels = read_snapshot(teacher_project / "data")
    tokenizer = load_tokenizer(other)
    data = encode(tokenizer, splits["test"]["text"].tolist(), 16, splits["test"]["label_id"].tolist())
    logits = predict_logits(load_classifier(Path(out.best.folder)), data, tokenizer.pad_token_id)
    accuracy = classification_metrics(logits, data.labels.numpy(), len(labels))["accuracy"]
    assert out.evaluation.metrics["student_fp32"]["accuracy"] == pytest.approx(accuracy)
    assert accuracy >= 0.5  # above the 0.25 of chance on four balanced classes


def test_pooled_feature_kd_across_tokenizers_through_the_flow(teacher_project: Path, tmp_path: Path):
    """A pretrained student with its own tokenizer and a narrower width (24 vs the teacher's 32): feature KD aligns
    pooled sentence features through a learned projection, the teacher's features are cached beside its soft labels,
    and the sweep keeps feature KD only when it wins on validation."""
    import numpy as np

    from tests.helpers import build_tiny_model
    from tests.helpers import LABELS, make_frames

    train, _ = make_frames()
    other = build_tiny_model(tmp_path / "other", train["text"], LABELS, vocab_words=99, hidden_size=24)
    overrides = {"student.init": "pretrained", "student.base_model": str(other), "gate.champion_tolerance": 1.0,
                 "distill.learning_rate": 3e-3, "distill.epochs": 4, "distill.patience": 10,
                 "distill.kd_weight": 0.5, "distill.ce_weight": 0.5, "distill.temperature": 1.0,
                 "distill.feature_loss": "cosine", "distill.sweep.feature_weight": [0.0, 0.5]}
    out = run_command(teacher_project / "distillery.yaml", overrides=overrides)
    client = _client(teacher_project)
    runs = client.search_runs([client.get_run(out.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{out.run_id}' and tags.candidate = 'distilled'")
    by_target = {r.data.params["distill.feature_target"]: r for r in runs}
    assert sorted(by_target) == ["none", "pooled"]  # the grid: without feature KD, and with it
    assert by_target["pooled"].data.params["candidate.feature_weight"] == "0.5"
    assert by_target["pooled"].info.run_name.endswith("-fw0.5")
    cached = np.load(Path(out.outputs.path).parent / "pooled-features.npz")
    rows = int(by_target["pooled"].data.params["train_rows"])
    assert cached["features"].shape == (rows, 32) and np.isfinite(cached["features"]).all()  # the teacher's width
    scores = {t: (r.data.metrics["val_macro_f1"], r.data.metrics["val_accuracy"]) for t, r in by_target.items()}
    # kept only when it wins on validation (a tie keeps the grid's first, without feature KD)
    assert out.best.candidate.feature_weight == (0.5 if scores["pooled"] > scores["none"] else 0.0)


def test_overlapping_runs_are_serialised_and_promote_once(teacher_project: Path):
    from concurrent.futures import ThreadPoolExecutor

    cfg_path = str(teacher_project / "distillery.yaml")
    overrides = {"gate.champion_tolerance": 1.0, "distill.temperature": 3.0}  # a config no champion was made from
    client = _client(teacher_project)
    before = len(client.search_model_versions("name='student'"))
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_command(cfg_path, overrides=overrides), range(2)))
    assert sorted(r.skipped for r in runs) == [False, True]  # the second waited, then found nothing to do
    assert len(client.search_model_versions("name='student'")) == before + 1


def test_baseline_is_cut_from_the_base_model_or_says_why_not(teacher_project: Path, tmp_path: Path):
    import torch

    from distillery.models.modeling import encoder_layers, load_classifier
    from tests.helpers import build_tiny_model
    from distillery.models.students import baseline_source
    from distillery.tasks.teacher import resolve_teacher
    from tests.helpers import LABELS, make_frames

    cfg = load_config(teacher_project / "distillery.yaml")
    teacher = resolve_teacher.fn(cfg)
    assert teacher.base_model == "tiny-teacher"  # recorded on the registered teacher version
    teacher_model = load_classifier(Path(teacher.folder))
    base_model = load_classifier(teacher_project / "tiny-teacher")
    source, note = baseline_source(cfg, teacher_model, teacher, LABELS)
    assert note.startswith("base model tiny-teacher")
    layer = next(encoder_layers(source)[0].parameters())
    assert torch.equal(layer, next(encoder_layers(base_model)[0].parameters()))
    assert not torch.equal(layer, next(encoder_layers(teacher_model)[0].parameters()))  # fine-tuning moved it

    as_before = load_config(teacher_project / "distillery.yaml", {"distill.baseline_init": "teacher"})
    assert baseline_source(as_before, teacher_model, teacher, LABELS) == (teacher_model, "teacher (layers [0])")

    train, _ = make_frames()
    other = build_tiny_model(tmp_path / "other", train["text"], LABELS, vocab_words=99)
    source, note = baseline_source(cfg, teacher_model, dataclasses.replace(teacher, base_model=str(other)), LABELS)
    assert source is teacher_model and "differs from the teacher in vocab_size" in note
    source, note = baseline_source(cfg, teacher_model, dataclasses.replace(teacher, base_model=str(tmp_path / "absent")),
                                   LABELS)
    assert source is teacher_model and "unavailable" in note


def test_frontier_students_and_the_smallest_passing_policy(teacher_project: Path):
    """Two more student shapes trained with the chosen recipe, measured in the served form beside every form of
    teacher and student; under gate.policy smallest the smallest that passes is registered and served."""
    cfg_path = str(teacher_project / "distillery.yaml")
    tiny = {"init": "config", "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    overrides = {"student.frontier": [{"layers": [1]}, tiny], "gate.policy": "smallest",
                 "tracking.student_name": "student-frontier", "gate.accuracy_tolerance": 1.0,
                 "gate.macro_f1_tolerance": 1.0, "gate.max_class_f1_drop": 1.0, "gate.max_latency_ratio": 100.0}
    out = run_command(cfg_path, overrides=overrides)
    metrics = out.evaluation.metrics
    assert out.evaluation.students == ("student", "cut1", "h16x1", "baseline")
    assert {"cut1_int8", "h16x1_int8"} <= set(metrics)
    assert metrics["h16x1_int8"]["size_mb"] < metrics["cut1_int8"]["size_mb"]
    # each contender timed against the reference in pairs and through its served path
    assert all("latency_ratio_paired" in metrics[c] and "served_latency_p50_ms" in metrics[c]
               for c in ("student_int8", "cut1_int8", "h16x1_int8"))
    assert "Frontier" in out.evaluation.table and "h16x1_int8" in out.evaluation.table
    # every student passed these loose settings: the smallest is the decision and what is registered
    assert out.decision.passed and out.decision.student == "h16x1"
    client = _client(teacher_project)
    version = client.get_model_version_by_alias("student-frontier", "champion")
    assert version.tags["evaluation.candidate"] == "h16x1_int8"
    judged = mlflow.artifacts.load_dict(f"runs:/{out.run_id}/gate/decision.json")["judged"]
    assert set(judged) == {"student", "cut1", "h16x1", "baseline"} and all(d["passed"] for d in judged.values())
    served = mlflow.pyfunc.load_model("models:/student-frontier@champion").unwrap_python_model().classifier
    config = served.model.config if hasattr(served.model, "config") else None
    assert config is not None and config.hidden_size == 16 and config.num_hidden_layers == 1
    # the frontier students are trained runs of their own, named by shape
    names = {r.info.run_name for r in client.search_runs(
        [client.get_run(out.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{out.run_id}' and tags.stage = 'train-student'")}
    assert {n.split("-")[0] for n in names} >= {"cut1", "h16x1"}
