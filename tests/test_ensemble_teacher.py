"""An ensemble teacher (``teacher.kind: ensemble``): registered teachers whose calibrated probabilities are averaged.
The arithmetic by hand on tiny arrays; end to end on two real registered tiny teachers, each labelling on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_command


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_members_are_named_as_registered_models():
    from distillery.models.ensemble import EnsembleError, MemberRef, parse_member

    assert parse_member("teacher-large@production") == MemberRef("teacher-large", alias="production")
    assert parse_member(" minilm-teacher/3 ") == MemberRef("minilm-teacher", version="3")
    for bad in ("teacher", "teacher@", "teacher/v3", "a/b/1", "models:/teacher/1"):
        with pytest.raises(EnsembleError, match="name@alias or name/version"):
            parse_member(bad)


def test_the_ensemble_averages_its_members_probabilities_with_their_weights():
    from distillery.models.ensemble import Combination, combine

    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    b = np.log(np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]))
    equal = combine([a, b], Combination((1.0, 1.0), (0.5, 0.5), False))
    np.testing.assert_allclose(softmax(equal), [[0.4, 0.5, 0.1], [0.2, 0.2, 0.6]], atol=1e-6)
    only_a = combine([a, b], Combination((1.0, 1.0), (1.0, 0.0), False))
    np.testing.assert_allclose(softmax(only_a), softmax(a), atol=1e-6)
    # a temperature of 2 flattens a member before it is averaged: [0.7, 0.2, 0.1] ** 0.5, normalised
    hot = combine([a, b], Combination((2.0, 1.0), (1.0, 0.0), False))
    flat = np.sqrt([0.7, 0.2, 0.1]) / np.sqrt([0.7, 0.2, 0.1]).sum()
    np.testing.assert_allclose(softmax(hot)[0], flat, atol=1e-6)


def test_weights_chosen_on_validation_favour_the_member_that_is_right():
    from distillery.models.ensemble import EnsembleError, fit_combination

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    right = np.eye(4)[labels] * 3.0 + rng.normal(0, 0.3, (400, 4))  # mostly right, confident
    noise = rng.normal(0, 1.0, (400, 4))  # knows nothing
    chosen = fit_combination([right, noise], labels)
    assert chosen.chosen_on_validation and abs(sum(chosen.weights) - 1) < 1e-9
    assert chosen.weights[0] > 0.9, chosen
    given = fit_combination([right, noise], labels, weights=[3, 1], calibrate=False)
    assert given.weights == (0.75, 0.25) and given.temperatures == (1.0, 1.0) and not given.chosen_on_validation
    with pytest.raises(EnsembleError, match="one non-negative weight|non-negative weight"):
        fit_combination([right, noise], labels, weights=[1.0])
    with pytest.raises(EnsembleError, match="validation rows"):
        fit_combination([right[:0], noise[:0]], labels[:0])


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.ensemble.members": "[teacher@production]"}, "at least two registered models"),
    ({"teacher.ensemble.members": "[teacher@production, teacher]"}, "name@alias or name/version"),
    ({"teacher.ensemble.weights": "[1.0]"}, "one non-negative weight per member"),
    ({"student.init": "cut", "student.frontier": "[]"}, "is an ensemble of several models: every student"),
    ({"distill.feature_weight": 0.5}, "feature KD needs its hidden states"),
])
def test_an_ensemble_misconfigured_is_refused_with_what_to_change(overrides, message):
    from distillery.config import ConfigError, load_config

    base = {"teacher.kind": "ensemble", "teacher.ensemble.members": "[teacher@production, teacher/1]"}
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**base, **overrides})


def ensemble(members: str, **extra) -> dict:
    """Overrides that make ``members`` the teacher; its students pretrained models (the tiny base model with a new
    head: an ensemble has no one teacher to cut from)."""
    return {"teacher.kind": "ensemble", "teacher.ensemble.members": members, "student.init": "pretrained",
            "student.base_model": "tiny-teacher", "gate.accuracy_tolerance": 1.0, "gate.macro_f1_tolerance": 1.0,
            "gate.max_class_f1_drop": 1.0, **extra}


def outputs_entries(project: Path) -> set[str]:
    folder = project / ".distillery" / "teacher-outputs"
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def test_an_ensemble_labels_only_its_new_member_and_is_gated_as_the_ensemble_and_its_best_member(teacher_project):
    """Teacher v1 labelled alone first; the ensemble of v1 and a second fine-tuned v2 labels only v2 (v1's outputs
    reused), combines them with weights chosen on validation, and the harness measures the ensemble and each member
    in every form; the gate judges against the best quantised member and the ensemble; the lineage names both
    members and verifies."""
    from mlflow.tracking import MlflowClient

    from distillery.commands.admin import lineage_of, verify_lineage
    from distillery.config import load_config

    project = teacher_project
    config = project / "distillery.yaml"
    run_command(config, "label", teacher_version="1")
    run_command(config, "teacher", {"teacher.epochs": 10})  # v2, a second teacher of its own
    before = outputs_entries(project)
    overrides = ensemble("[teacher/1, teacher@production]")
    result = run_command(config, "distill", overrides, force=True)
    assert len(outputs_entries(project) - before) == 2  # v2's outputs and the ensemble's: v1 was not asked again

    metrics = result.evaluation.metrics
    for row in ("teacher_ensemble", "teacher_m1_fp32", "teacher_m1_int8", "teacher_m2_fp32", "teacher_m2_int8_onnx"):
        assert row in metrics, sorted(metrics)
    reference = result.evaluation.reference
    assert reference.startswith("teacher_m") and reference.endswith(("_int8", "_int8_onnx"))
    whole, parts = metrics["teacher_ensemble"], [metrics["teacher_m1_fp32"], metrics["teacher_m2_fp32"]]
    assert whole["latency_p50_ms"] == pytest.approx(sum(p["latency_p50_ms"] for p in parts))
    assert 0 < whole["accuracy"] <= 1 and all(0 <= p["agreement"] <= 1 for p in parts)
    criteria = {c["name"]: c for c in result.decision.criteria}
    assert criteria["accuracy_vs_ensemble_teacher"]["threshold"] == pytest.approx(whole["accuracy"] - 1.0)
    assert "best quantised ensemble member" in criteria["accuracy_vs_best_member"]["rule"]
    assert result.decision.passed, result.decision.reasons

    logged = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(result.outputs.run_id).data.metrics
    assert logged["ensemble.m1.weight"] + logged["ensemble.m2.weight"] == pytest.approx(1.0)
    assert 0 < logged["ensemble.val_accuracy"] <= 1

    cfg = load_config(config, overrides)
    info = lineage_of(cfg, f"student/{result.decision.version}")
    assert info["teacher"]["kind"] == "ensemble"
    assert [(m["name"], m["version"]) for m in info["teacher"]["identity"]["members"]] == [("teacher", "1"),
                                                                                           ("teacher", "2")]
    checks = [(name, ok) for name, ok, _ in verify_lineage(cfg, info)]
    assert ("ensemble teacher's identity hashes to its version", True) in checks
    assert [ok for name, ok in checks if name == "teacher version still registered (same run)"] == [True, True]

    entries = outputs_entries(project)
    again = run_command(config, "label", overrides)  # nothing new: every member and the ensemble from the cache
    assert again.outputs.cache_hit and outputs_entries(project) == entries
    up_to_date = run_command(config, "distill", overrides)
    assert up_to_date.up_to_date == result.decision.version
