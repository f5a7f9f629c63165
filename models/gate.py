"""The promotion gate: pure comparison of a candidate's metrics against the INT8 teacher and the champion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from distillery.config import GateConfig
from distillery.records import QUANTISED_TEACHERS, Decision, reference_candidate


class GateError(RuntimeError):
    """The gate cannot decide (metrics missing) or promotion failed; the message says what was left where."""


@dataclass(frozen=True)
class Criterion:
    name: str
    passed: bool
    observed: float
    threshold: float
    rule: str


@dataclass
class GateDecision:
    passed: bool
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]

    def reasons(self) -> list[str]:
        return [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.observed:.4g} vs {c.threshold:.4g} ({c.rule})"
                for c in self.criteria]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "criteria": [asdict(c) for c in self.criteria]}


def _latency(student: dict, reference: dict, max_ratio: float, reference_name: str) -> Criterion:
    """Paired (interleaved) timing when the harness measured it: the median of per-row latency ratios, which a
    loaded machine moves far less than two p50s taken apart; else the p50s."""
    if "latency_ratio_paired" in student:
        ratio = student["latency_ratio_paired"]
        return Criterion("latency_vs_int8_teacher", ratio <= max_ratio, ratio, max_ratio,
                         f"student/{reference_name} batch-1 latency, median of interleaved pairs, <= {max_ratio}")
    return Criterion("latency_vs_int8_teacher",
                     student["latency_p50_ms"] <= max_ratio * reference["latency_p50_ms"],
                     student["latency_p50_ms"], max_ratio * reference["latency_p50_ms"],
                     f"student p50 latency <= {max_ratio} x {reference_name} p50 latency (ms)")


def decide(student: dict, int8_teacher: dict, teacher: dict, champion: dict | None, *, accuracy_tolerance: float,
           macro_f1_tolerance: float, max_latency_ratio: float, max_class_f1_drop: float,
           champion_tolerance: float, labels: list[str] | None = None, oos_recall_tolerance: float = 0.05,
           oos_auroc_tolerance: float = 0.02, reference_name: str = "INT8 teacher") -> GateDecision:
    """Every criterion is evaluated (no short-circuit) so a rejection lists all its reasons.

    ``student``/``int8_teacher``/``teacher``/``champion`` hold metrics as logged: accuracy, macro_f1,
    latency_p50_ms and per_class_f1 (a list per label); with out-of-scope test data also ``oos.recall`` and
    ``oos.auroc``, which must not fall more than their tolerances below the (FP32) teacher's.
    """
    criteria = [
        Criterion("accuracy_vs_int8_teacher", student["accuracy"] >= int8_teacher["accuracy"] - accuracy_tolerance,
                  student["accuracy"], int8_teacher["accuracy"] - accuracy_tolerance,
                  f"student accuracy >= {reference_name} accuracy - {accuracy_tolerance}"),
        Criterion("macro_f1_vs_int8_teacher", student["macro_f1"] >= int8_teacher["macro_f1"] - macro_f1_tolerance,
                  student["macro_f1"], int8_teacher["macro_f1"] - macro_f1_tolerance,
                  f"student macro-F1 >= {reference_name} macro-F1 - {macro_f1_tolerance}"),
        _latency(student, int8_teacher, max_latency_ratio, reference_name),
    ]
    drops = [t - s for t, s in zip(teacher["per_class_f1"], student["per_class_f1"])]
    worst = max(range(len(drops)), key=lambda i: drops[i]) if drops else 0
    worst_name = labels[worst] if labels and drops else str(worst)
    criteria.append(Criterion(
        "per_class_f1_drop", (max(drops) if drops else 0.0) <= max_class_f1_drop, max(drops) if drops else 0.0,
        max_class_f1_drop, f"no class F1 more than {max_class_f1_drop} below the teacher's (worst: {worst_name})"))
    for key, name, tolerance in (("oos.recall", "oos_recall_vs_teacher", oos_recall_tolerance),
                                 ("oos.auroc", "oos_auroc_vs_teacher", oos_auroc_tolerance)):
        if key in teacher or key in student:  # measured: the data has out-of-scope test rows
            observed, bound = student.get(key, float("nan")), teacher.get(key, float("nan")) - tolerance
            criteria.append(Criterion(name, bool(observed >= bound), observed, bound,
                                      f"student {key} >= teacher {key} - {tolerance}"))
    if champion is not None:
        criteria.append(Criterion(
            "accuracy_vs_champion", student["accuracy"] >= champion["accuracy"] - champion_tolerance,
            student["accuracy"], champion["accuracy"] - champion_tolerance,
            f"student accuracy >= champion accuracy - {champion_tolerance}"))
    return GateDecision(passed=all(c.passed for c in criteria), criteria=criteria)


def judge_logged(gate: GateConfig, logged: dict[str, dict], served: str, champion: dict | None,
                 champion_version: str | None, version: str | None = None,
                 reference: str = "teacher_int8") -> Decision:
    """The gate's decision for the ``served`` form of an evaluation's logged metrics, under ``gate``'s settings,
    against the ``reference`` form of the teacher (its INT8 form in the student's runtime)."""
    student = logged[served]
    verdict = decide(student, logged[reference], logged["teacher_fp32"], champion,
                     accuracy_tolerance=gate.accuracy_tolerance, macro_f1_tolerance=gate.macro_f1_tolerance,
                     max_latency_ratio=gate.max_latency_ratio, max_class_f1_drop=gate.max_class_f1_drop,
                     champion_tolerance=gate.champion_tolerance, labels=student["labels"],
                     oos_recall_tolerance=gate.oos_recall_tolerance, oos_auroc_tolerance=gate.oos_auroc_tolerance,
                     reference_name="INT8 teacher" if reference == "teacher_int8" else f"INT8 teacher ({reference})")
    return Decision(passed=verdict.passed, reasons=tuple(verdict.reasons()),
                    criteria=tuple(verdict.to_dict()["criteria"]), version=version, champion_version=champion_version)


def best_reference(metrics: dict[str, dict], form: str) -> str:
    """The teacher's quantised form the gate compares with: the best validation accuracy among the runtimes the
    harness measured (a tie goes to the student's own runtime). A student must beat the quantised teacher a team
    would actually deploy, not a form one runtime happens to break."""
    own = reference_candidate(form)
    measured = [k for k in QUANTISED_TEACHERS if k in metrics]
    if not all("val_accuracy" in metrics[k] for k in measured):
        return own
    return max(measured, key=lambda k: (metrics[k]["val_accuracy"], k == own))


def choose_smallest(decisions: dict[str, Decision], sizes: dict[str, float]) -> str:
    """Of the judged students (``{name: decision}``, the chosen-on-validation one first), the smallest on disk that
    passed; the first one when none passed (its reasons are the run's)."""
    passing = [name for name, d in decisions.items() if d.passed]
    if not passing:
        return next(iter(decisions))
    return min(passing, key=lambda name: (sizes[name], list(decisions).index(name)))


def plan_reconcile(versions: list[tuple[str, str | None, bool]], pending: str, promoted: str) -> list[tuple[str, str]]:
    """What to do with versions a crashed promotion left behind.

    ``versions`` holds (version, promotion state tag, holds the champion alias). A ``pending`` version that holds the
    alias was promoted before the crash (the alias moved; only the final mark is missing): ``finish`` it. A ``pending``
    version without the alias never served: ``delete`` it. Versions in any other state are left alone.
    """
    actions = []
    for version, state, holds_alias in versions:
        if state == pending:
            actions.append((version, "finish" if holds_alias else "delete"))
    return actions
