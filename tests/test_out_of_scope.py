"""Out-of-scope inputs: held-out intents and an out-of-scope label in the snapshot, abstention thresholds measured by
the harness, the gate guarding out-of-scope recall/AUROC, and the served model abstaining with its logged threshold."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from distillery.models.data import (
    DataError,
    check_data,
    choose_scope,
    normalise_text,
    read_out_of_scope,
    read_source,
    scoped,
    split_out_of_scope,
    split_snapshot,
    write_snapshot,
)
from distillery.models.calibration import in_scope_score
from distillery.models.gate import decide
from tests.helpers import LABELS, make_frames, run_command, write_config, write_source

OOS_WORDS = [("weather", "forecast"), ("song", "music"), ("pizza", "recipe"), ("movie", "ticket"), ("joke", "funny")]


def oos_frames(train: int = 30, test: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Texts that belong to none of the fixture's intents, labelled ``oos``."""
    texts = [f"{o} {a} {b} {t}" for o, (a, b), t in itertools.product(
        ["hey", "tell me", "what about", "do you know"], OOS_WORDS, ["today", "please", "now", "tonight"])]
    texts = texts[: train + test]
    return (pd.DataFrame({"text": texts[:train], "category": "oos"}),
            pd.DataFrame({"text": texts[train:], "category": "oos"}))


def source_with_oos(folder: Path) -> Path:
    train, test = make_frames()
    oos_train, oos_test = oos_frames()
    return write_source(folder, pd.concat([train, oos_train]), pd.concat([test, oos_test]), LABELS)


def snapshot_of(source: Path, oos_label: str | None, holdout: int, seed: int = 5):
    raw = read_source(source)
    scope = choose_scope(raw.labels, oos_label, holdout, seed)
    raw = scoped(raw, scope)
    cleaned, report = check_data(raw, 0.02, scope.names)
    inscope, oos = split_out_of_scope(cleaned, scope, 0.2, seed)
    labels = [n for n in raw.labels if n not in scope.names]
    return scope, split_snapshot(inscope, labels, 0.2, seed), oos, labels, report


def test_held_out_intents_are_split_without_leakage(tmp_path: Path):
    source = write_source(tmp_path / "src")
    scope, splits, oos, labels, _ = snapshot_of(source, None, holdout=1)
    assert len(scope.held_out) == 1 and scope.held_out[0] in LABELS and scope.seed == 5
    held = scope.held_out[0]
    assert labels == [n for n in LABELS if n != held]
    for split in splits.values():  # the models never see a held-out intent, nor an id for it
        assert held not in set(split["label"]) and split["label_id"].between(0, len(labels) - 1).all()
    assert len(oos["oos_train"]) == 0  # its train rows are dropped, not taught
    assert set(oos["oos_validation"]["label"]) == {held} and set(oos["oos_test"]["label"]) == {held}
    assert (oos["oos_test"]["label_id"] == -1).all()
    keys = {name: set(df["text"].map(normalise_text)) for name, df in {**splits, **oos}.items()}
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], f"{a} and {b} share texts"
    # every source row of the held-out intent is accounted for: 20% of train to validation, test as it was
    train, test = make_frames()
    assert len(oos["oos_test"]) == (test["category"] == held).sum()
    assert len(oos["oos_validation"]) == round(0.2 * (train["category"] == held).sum())
    # seeded: the same choice again, another seed another intent set (over the 4 labels, some seed differs)
    assert snapshot_of(source, None, 1)[0] == scope
    assert any(snapshot_of(source, None, 1, seed)[0].held_out != scope.held_out for seed in range(6, 12))


def test_oos_label_rows_are_kept_apart_and_recorded(tmp_path: Path):
    source = source_with_oos(tmp_path / "src")
    scope, splits, oos, labels, _ = snapshot_of(source, "oos", holdout=0)
    assert labels == LABELS and "oos" not in set(pd.concat(splits.values())["label"])
    assert len(oos["oos_train"]) == 24 and len(oos["oos_validation"]) == 6 and len(oos["oos_test"]) == 10
    write_snapshot({**splits, **oos}, labels, _, tmp_path / "snap", scope)
    read_scope, frames = read_out_of_scope(tmp_path / "snap")
    assert read_scope == scope and set(frames) == {"oos_train", "oos_validation", "oos_test"}
    assert json.loads((tmp_path / "snap" / "labels.json").read_text()) == LABELS
    with pytest.raises(DataError, match="occurs in no split"):
        snapshot_of(write_source(tmp_path / "plain"), "oos", holdout=0)
    with pytest.raises(ValueError, match="hold out"):
        snapshot_of(source, "oos", holdout=3)  # 4 intents: at most 2 can go


def test_gate_rejects_a_student_whose_oos_recall_collapses():
    teacher = {"accuracy": 0.9, "macro_f1": 0.9, "latency_p50_ms": 10.0, "per_class_f1": [0.9, 0.9],
               "oos.recall": 0.62, "oos.auroc": 0.91}
    good = {**teacher, "latency_p50_ms": 2.0, "oos.recall": 0.60, "oos.auroc": 0.90}
    collapsed = {**good, "oos.recall": 0.21, "oos.auroc": 0.84}
    kwargs = dict(accuracy_tolerance=0.03, macro_f1_tolerance=0.03, max_latency_ratio=0.5, max_class_f1_drop=0.25,
                  champion_tolerance=0.005, oos_recall_tolerance=0.05, oos_auroc_tolerance=0.02)
    assert decide(good, teacher, teacher, None, **kwargs).passed
    verdict = decide(collapsed, teacher, teacher, None, **kwargs)
    assert not verdict.passed
    assert {c.name for c in verdict.failed} == {"oos_recall_vs_teacher", "oos_auroc_vs_teacher"}
    # without out-of-scope data there is no such criterion
    plain = {k: v for k, v in teacher.items() if not k.startswith("oos.")}
    names = {c.name for c in decide({**plain, "latency_p50_ms": 2.0}, plain, plain, None, **kwargs).criteria}
    assert not any(n.startswith("oos") for n in names)


@pytest.fixture(scope="module")
def oos_project(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, prefect_harness) -> Path:
    """A tiny project whose data has `oos` rows and one intent held out, with a teacher bootstrapped on it."""
    import os

    root = tmp_path_factory.mktemp("oos-project")
    source_with_oos(root / "source")
    os.symlink(tiny_teacher_dir, root / "tiny-teacher")
    write_config(root, data={"source": "source", "validation_fraction": 0.2, "oos_label": "oos",
                             "holdout_intents": 1},
                 # 3 intents of 32 rows: 8 epochs leave the tiny teacher right but near-uniform (entropy check)
                 teacher={"base_model": "tiny-teacher", "epochs": 24, "batch_size": 16, "learning_rate": 3e-3,
                          "max_length": 16, "group_by_length": False},
                 distill={"epochs": 6, "batch_size": 16, "learning_rate": 3e-3, "max_length": 16,
                          "temperature": 2.0, "group_by_length": False, "sweep": {"temperature": []}},
                 gate={"max_latency_ratio": 100.0, "accuracy_tolerance": 0.5, "macro_f1_tolerance": 0.5,
                       "max_class_f1_drop": 1.0, "oos_recall_tolerance": 1.0, "oos_auroc_tolerance": 1.0})
    run_command(root / "distillery.yaml", "ingest")
    run_command(root / "distillery.yaml", "teacher")
    return root


def test_out_of_scope_through_the_pipeline(oos_project: Path):
    """Ingest records the scope; KD sees the oos rows, the baseline does not; every candidate gets a threshold and
    OOS metrics on test; the promoted model abstains exactly below its logged threshold with the `oos` label."""
    from distillery.integrations.registry import load_served_model

    scope, frames = read_out_of_scope(oos_project / "data")
    assert scope.oos_label == "oos" and len(scope.held_out) == 1
    assert json.loads((oos_project / "data" / "labels.json").read_text()) == \
        [n for n in LABELS if n not in scope.held_out]
    result = run_command(oos_project / "distillery.yaml", "distill")
    assert result.decision.passed, result.decision.reasons
    client = mlflow.tracking.MlflowClient(f"sqlite:///{oos_project / 'mlflow.db'}")
    eval_run = client.get_run(result.evaluation.run_id)
    assert eval_run.data.params["oos.held_out_intents"] == scope.held_out[0]
    assert eval_run.data.params["oos.label"] == "oos"
    artifacts = {Path(a.path).name for a in client.list_artifacts(eval_run.info.run_id, "evaluation")}
    assert "oos_tradeoff.png" in artifacts
    results = Path(client.download_artifacts(eval_run.info.run_id, "evaluation/results.txt")).read_text()
    assert "OOS recall" in results and "AUROC" in results
    metrics = result.evaluation.metrics
    for name in ("teacher_fp32", "teacher_int8", "student_int8", "baseline_fp32"):
        m = metrics[name]
        assert np.isfinite(m["abstain_threshold"])  # on the energy score (the default): not a probability
        assert {"oos.recall", "oos.auroc", "oos.inscope_accuracy", "oos.abstention_rate"} <= set(m)
        assert ("oos.precision" in m) == (m["oos.abstention_rate"] > 0)  # no abstentions: no precision
        assert m["oos.inscope_accuracy"] <= m["oos.inscope_accuracy_no_abstention"]
    # the distilled student trained on the teacher's soft labels of the oos train rows; the baseline did not
    student_run = client.get_run(result.best.run_id)
    n_in = len(pd.read_parquet(oos_project / "data" / "train.parquet"))
    assert int(student_run.data.params["train_rows"]) == n_in + len(frames["oos_train"])
    assert int(client.get_run(result.baseline.run_id).data.params["train_rows"]) == n_in
    # the gate judged OOS recall and AUROC; the card states the threshold
    names = {c["name"] for c in result.decision.criteria}
    assert {"oos_recall_vs_teacher", "oos_auroc_vs_teacher"} <= names
    version = client.get_model_version_by_alias("student", "champion")
    card = client.get_model_version("student", version.version).description
    assert version.tags["data.held_out_intents"] == scope.held_out[0] and version.tags["data.oos_label"] == "oos"
    threshold = metrics["student_int8"]["abstain_threshold"]
    assert "Out-of-scope inputs" in card and f"{threshold:.4f}" in card
    # served: abstains exactly below the logged threshold, answering the data's oos label
    model = load_served_model("models:/student@champion")
    texts = list(frames["oos_test"]["text"]) + list(pd.read_parquet(oos_project / "data" / "test.parquet")["text"])
    out = model.predict(texts)
    served = model.unwrap_python_model().classifier
    assert served.settings["abstain_score"] == "energy" and served.settings["abstain_below"] == threshold
    scaled = served.scaled_logits(texts)
    score = in_scope_score(scaled * served.settings["calibration_temperature"], served.settings["calibration_temperature"], "energy")
    below = score < threshold
    assert list(out["abstained"]) == list(below)
    assert set(out.loc[below, "label"]) <= {"oos"} and "oos" not in set(out.loc[~below, "label"])
    assert np.isclose(out["abstained"].mean(), metrics["student_int8"]["oos.abstention_rate"], atol=0.05)


def test_a_teacher_for_another_label_set_is_refused_before_labelling(oos_project: Path):
    """Held-out intents change the label set: the teacher trained without one intent cannot label data that has it
    again, and the run says so in one error instead of failing on array shapes; the champion stays."""
    from distillery.models.modeling import ModelError

    client = mlflow.tracking.MlflowClient(f"sqlite:///{oos_project / 'mlflow.db'}")
    before = client.get_model_version_by_alias("student", "champion").version
    with pytest.raises(ModelError, match=r"answers 3 labels, the data snapshot has 4 .*missing \['\w+'\]"):
        run_command(oos_project / "distillery.yaml", "run", overrides={"data.holdout_intents": 0})
    assert client.get_model_version_by_alias("student", "champion").version == before
