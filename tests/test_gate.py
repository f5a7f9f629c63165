"""The gate's pure decision logic."""

from __future__ import annotations

from distillery.models.gate import decide

RULES = dict(accuracy_tolerance=0.02, macro_f1_tolerance=0.02, max_latency_ratio=0.5, max_class_f1_drop=0.2,
             champion_tolerance=0.005)
TEACHER = {"accuracy": 0.92, "macro_f1": 0.91, "latency_p50_ms": 10.0, "per_class_f1": [0.9, 0.9, 0.9]}
INT8 = {"accuracy": 0.91, "macro_f1": 0.90, "latency_p50_ms": 6.0, "per_class_f1": [0.9, 0.9, 0.9]}


def student(**changes):
    return {"accuracy": 0.90, "macro_f1": 0.89, "latency_p50_ms": 2.0, "per_class_f1": [0.85, 0.9, 0.88], **changes}


def test_a_good_student_passes_every_criterion():
    decision = decide(student(), INT8, TEACHER, None, **RULES)
    assert decision.passed and [c.name for c in decision.criteria] == [
        "accuracy_vs_int8_teacher", "macro_f1_vs_int8_teacher", "latency_vs_int8_teacher", "per_class_f1_drop"]


def test_every_failed_criterion_is_reported():
    decision = decide(student(accuracy=0.80, latency_p50_ms=3.5, per_class_f1=[0.5, 0.9, 0.9]), INT8, TEACHER, None,
                      labels=["a", "b", "c"], **RULES)
    assert not decision.passed
    assert {c.name for c in decision.failed} == {"accuracy_vs_int8_teacher", "latency_vs_int8_teacher",
                                                 "per_class_f1_drop"}
    assert any("worst: a" in r and r.startswith("FAIL") for r in decision.reasons())


def test_tolerance_boundary_is_inclusive():
    assert decide(student(accuracy=0.89), INT8, TEACHER, None, **RULES).passed
    assert not decide(student(accuracy=0.8899), INT8, TEACHER, None, **RULES).passed


def test_champion_must_not_be_beaten():
    assert decide(student(), INT8, TEACHER, {"accuracy": 0.903}, **RULES).passed
    decision = decide(student(), INT8, TEACHER, {"accuracy": 0.95}, **RULES)
    assert not decision.passed and [c.name for c in decision.failed] == ["accuracy_vs_champion"]
