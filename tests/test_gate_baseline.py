"""The gate judges the student trained without the teacher too: a run never ends with nothing when something passes,
says plainly when distillation lost, and names the closest candidate and its knobs when everything fails (tiny
models, real flows)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from distillery.config import load_config
from distillery.commands.admin import lineage_of, verify_lineage
from tests.helpers import run_command

# a teacher that guesses (the random-init tiny model) gets through the output suites only with their floors lowered
GUESSING_TEACHER = {"validation.min_teacher_accuracy": 0.0, "validation.min_teacher_macro_f1": 0.0,
                    "validation.min_predictions_per_class": 0,
                    "validation.min_mean_confidence": 0.0, "validation.max_mean_entropy_fraction": 1.0}


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_distilled_student_that_passes_is_promoted_and_the_baseline_is_measured(teacher_project: Path):
    out = run_command(teacher_project / "distillery.yaml", overrides={"gate.champion_tolerance": 1.0}, force=True)
    assert out.decision.passed and out.decision.student == "student"
    assert "baseline_int8" in out.evaluation.metrics and "baseline" in out.evaluation.students
    assert any(r.startswith("policy best, baseline fallback: student_int8 of") for r in out.decision.reasons)


def test_when_distillation_loses_the_baseline_ships_and_says_so(teacher_project: Path, tiny_teacher_dir: Path):
    """Distilled from a teacher that guesses (pure KD), the student fails the champion bar; the baseline passes and
    is promoted, with the reason in the decision, the model card and the lineage; it verifies like any student."""
    cfg_path = teacher_project / "distillery.yaml"
    champion = run_command(cfg_path, overrides={"gate.champion_tolerance": 1.0}, force=True).decision.version
    guessing = run_command(cfg_path, "import-teacher", teacher_source=str(tiny_teacher_dir),
                           overrides=GUESSING_TEACHER).teacher.version
    overrides = {**GUESSING_TEACHER, "distill.kd_weight": 1.0, "distill.ce_weight": 0.0,
                 "gate.champion_tolerance": 0.2}
    out = run_command(cfg_path, overrides=overrides, teacher_version=guessing, force=True)
    assert out.decision.passed and out.decision.student == "baseline", out.decision.reasons
    note = next(r for r in out.decision.reasons if r.startswith("the hard-label baseline is promoted"))
    assert "distillation did not beat training the student alone on this data" in note
    assert "no distilled student passed the gate" in note and "one seed" in note
    client = _client(teacher_project)
    version = client.get_model_version("student", out.decision.version)
    assert version.version != champion and "distillation did not beat" in version.description
    cfg = load_config(str(cfg_path), overrides)
    info = lineage_of(cfg, f"student/{version.version}")
    assert info["candidate"]["kind"] == "baseline"
    failed = [(n, d) for n, ok, d in verify_lineage(cfg, info) if not ok]
    assert failed == [], failed


def test_when_everything_fails_the_closest_candidate_and_its_knobs_are_named(teacher_project: Path):
    out = run_command(teacher_project / "distillery.yaml", overrides={"gate.max_latency_ratio": 1e-6,
                                                                      "gate.champion_tolerance": 1.0},
                      teacher_version="1", force=True)
    assert not out.decision.passed
    closest = out.decision.reasons[-1]
    assert closest.startswith("closest to passing: ") and "latency_vs_int8_teacher" in closest
    assert "gate.max_latency_ratio (this run needs" in closest
