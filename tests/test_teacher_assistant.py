"""Multi-stage distillation: a frontier shape taught by the run's student (the teacher assistant), whose soft labels
come through the same labelling flow, cache and Great Expectations suites; the chain is in the registered student's
lineage, and `lineage --verify` checks it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from distillery.config import config_from_dict
from tests.helpers import run_command

pytestmark = pytest.mark.integration


def test_a_frontier_shape_taught_by_the_student_is_named_so_and_only_the_frontier_may_say_it():
    cfg = config_from_dict({"student": {"init": "cut", "layers": [0, 1],
                                        "frontier": [{"layers": [0]}, {"layers": [0], "taught_by": "student"}]}})
    shapes = cfg.student.frontier_shapes()
    assert list(shapes) == ["cut0", "cut0-ta"] and shapes["cut0-ta"].taught_by == "student"
    with pytest.raises(Exception, match="student.taught_by: the student is taught by the teacher"):
        config_from_dict({"student": {"taught_by": "student"}})
    # a run without assistants keeps its config digest (and its champion up to date)
    assert config_from_dict({}).digest() == config_from_dict({"student": {"taught_by": "teacher"}}).digest()


def test_a_student_taught_by_the_teacher_assistant_is_registered_with_the_chain_and_verified(teacher_project: Path):
    from distillery.commands.admin import lineage_of, verify_lineage
    from distillery.config import load_config
    from distillery.integrations.provenance import ASSISTANT_CHECK

    # a narrower fresh model than the 1-layer cut student, taught by that student
    small = {"init": "config", "hidden_size": 16, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    overrides = {"student.frontier": [{**small, "taught_by": "student"}], "gate.policy": "smallest",
                 "tracking.student_name": "student-ta", "gate.accuracy_tolerance": 1.0,
                 "gate.macro_f1_tolerance": 1.0, "gate.max_class_f1_drop": 1.0, "gate.max_latency_ratio": 100.0,
                 "gate.champion_tolerance": 1.0, "gate.baseline": "off", "validation.min_teacher_accuracy": 0.0,
                 "validation.min_teacher_macro_f1": 0.0}
    out = run_command(teacher_project / "distillery.yaml", overrides=overrides)
    assert out.evaluation.students == ("student", "h16x1-ta")
    assert out.decision.passed and out.decision.student == "h16x1-ta"
    cfg = load_config(teacher_project / "distillery.yaml", overrides)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_run(out.run_id).info.experiment_id
    stages = {k: v for k, v in client.get_run(out.run_id).data.metrics.items() if k.startswith("stage.")}
    assert set(stages) == {"stage.label_s", "stage.train_s", "stage.evaluate_s", "stage.gate_s"}  # wall seconds
    assert all(v >= 0 for v in stages.values()) and stages["stage.train_s"] > 0
    labelled = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{out.run_id}' and "
                                                f"tags.stage = 'label'")
    assert [r.data.tags["teacher.kind"] for r in labelled] == ["assistant"]  # its own outputs run, under this one
    assistant = labelled[0]
    assert assistant.data.tags["teacher.run_id"] == out.best.run_id  # the run's student taught it
    assert assistant.data.tags["gx.success"] == "true"  # its soft labels passed the suites
    info = lineage_of(cfg, "student-ta@champion")
    chain = info["taught_by_assistant"]
    assert chain["run_id"] == out.best.run_id and chain["outputs_run_id"] == assistant.info.run_id
    assert chain["shape"] == "cut0" and info["teacher"]["kind"] == "registered"  # the lineage's teacher stays
    assert info["trained_on"] == "cpu"  # runtime.device auto, on a machine without a GPU
    trained = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{out.run_id}' and "
                                               f"tags.stage = 'train-student'")
    taught = next(r for r in trained if r.info.run_name.startswith("h16x1-ta"))
    assert taught.data.params["teacher.kind"] == "assistant"  # it learnt the assistant's soft labels
    checks = {name: (ok, detail) for name, ok, detail in verify_lineage(cfg, info)}
    assert all(ok for ok, _ in checks.values()), checks
    assert "taught by" in checks[ASSISTANT_CHECK][1]
    # the chain pointed at the run teacher's outputs instead: found out
    version = info["version"]
    original = client.get_model_version("student-ta", version).tags["assistant.outputs_run_id"]
    teacher_outputs = client.get_run(out.run_id).data.tags["teacher_outputs.run_id"]
    client.set_model_version_tag("student-ta", version, "assistant.outputs_run_id", teacher_outputs)
    try:
        checks = {name: (ok, detail) for name, ok, detail in verify_lineage(cfg, lineage_of(cfg, "student-ta@champion"))}
        assert not checks[ASSISTANT_CHECK][0] and "names another teacher" in checks[ASSISTANT_CHECK][1]
    finally:
        client.set_model_version_tag("student-ta", version, "assistant.outputs_run_id", original)
