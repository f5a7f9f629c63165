"""The promotion gate: pure comparison of a candidate's metrics against the INT8 teacher and the champion."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, replace

from distillery.config import GateConfig, StudentConfig
from distillery.records import (ENDPOINT_TEACHER, ENSEMBLE_TEACHER, QUANTISED_TEACHERS, is_member_row, Decision, reference_candidate,
                                served_candidate, teacher_row)
from distillery.errors import DistilleryError


class GateError(DistilleryError, RuntimeError):
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


def _latency(student: dict, reference: dict, max_ratio: float, reference_name: str, name: str) -> Criterion:
    """Paired (interleaved) timing when the harness measured it: the median of per-row latency ratios, which a
    loaded machine moves far less than two p50s taken apart; else the p50s."""
    if "latency_ratio_paired" in student:
        ratio = student["latency_ratio_paired"]
        return Criterion(name, ratio <= max_ratio, ratio, max_ratio,
                         f"student/{reference_name} batch-1 latency, median of interleaved pairs, <= {max_ratio}")
    return Criterion(name,
                     student["latency_p50_ms"] <= max_ratio * reference["latency_p50_ms"],
                     student["latency_p50_ms"], max_ratio * reference["latency_p50_ms"],
                     f"student p50 latency <= {max_ratio} x {reference_name} p50 latency (ms)")


def decide(student: dict, int8_teacher: dict, teacher: dict, champion: dict | None, *, accuracy_tolerance: float,
           macro_f1_tolerance: float, max_latency_ratio: float, max_class_f1_drop: float,
           champion_tolerance: float, labels: list[str] | None = None, oos_recall_tolerance: float = 0.05,
           oos_auroc_tolerance: float = 0.02, reference_name: str = "INT8 teacher",
           reference_key: str = "int8_teacher", ensemble: bool = False, champion_production: float | None = None,
           production_tolerance: float = 0.0, production_min_texts: int = 1) -> GateDecision:
    """Every criterion is evaluated (no short-circuit) so a rejection lists all its reasons.

    ``student``/``int8_teacher``/``teacher``/``champion`` hold metrics as logged: accuracy, macro_f1,
    latency_p50_ms and per_class_f1 (a list per label); with out-of-scope test data also ``oos.recall`` and
    ``oos.auroc``, which must not fall more than their tolerances below the (FP32) teacher's. With ``ensemble``,
    ``teacher`` is an ensemble teacher and the student's accuracy is also held to it (the reference is then its best
    quantised member). The criteria against the reference are named for it: ``accuracy_vs_<reference_key>``
    (see ``reference_key``). With ``champion_production`` (the champion's agreement with the teacher on the production
    hold-out) and the student's ``production_agreement`` on the same ``production_texts`` (at least
    ``production_min_texts``), the student's may fall at most ``production_tolerance`` below it.
    """
    criteria = [
        Criterion(f"accuracy_vs_{reference_key}", student["accuracy"] >= int8_teacher["accuracy"] - accuracy_tolerance,
                  student["accuracy"], int8_teacher["accuracy"] - accuracy_tolerance,
                  f"student accuracy >= {reference_name} accuracy - {accuracy_tolerance}"),
        Criterion(f"macro_f1_vs_{reference_key}", student["macro_f1"] >= int8_teacher["macro_f1"] - macro_f1_tolerance,
                  student["macro_f1"], int8_teacher["macro_f1"] - macro_f1_tolerance,
                  f"student macro-F1 >= {reference_name} macro-F1 - {macro_f1_tolerance}"),
    ]
    if ensemble:  # the ensemble it learnt from, beside the best member a team could deploy alone
        criteria.append(Criterion(
            "accuracy_vs_ensemble_teacher", student["accuracy"] >= teacher["accuracy"] - accuracy_tolerance,
            student["accuracy"], teacher["accuracy"] - accuracy_tolerance,
            f"student accuracy >= ensemble teacher accuracy - {accuracy_tolerance}"))
    criteria.append(_latency(student, int8_teacher, max_latency_ratio, reference_name, f"latency_vs_{reference_key}"))
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
        texts = int(student.get("production_texts", 0))
        if champion_production is not None and "production_agreement" in student and texts >= production_min_texts:
            observed, bound = student["production_agreement"], champion_production - production_tolerance
            criteria.append(Criterion(
                "production_agreement_vs_champion", observed >= bound, observed, bound,
                f"student agreement with the teacher on {texts} held-out production texts >= the champion's there "
                f"- {production_tolerance}"))
    return GateDecision(passed=all(c.passed for c in criteria), criteria=criteria)


def judge_logged(gate: GateConfig, logged: dict[str, dict], served: str, champion: dict | None,
                 champion_version: str | None, version: str | None = None,
                 reference: str = "teacher_int8", champion_production: float | None = None) -> Decision:
    """The gate's decision for the ``served`` form of an evaluation's logged metrics, under ``gate``'s settings,
    against the ``reference`` form of the teacher (its INT8 form in the student's runtime) and the champion (its
    ``champion_production`` agreement measured by the same evaluation)."""
    student, teacher = logged[served], teacher_row(logged)
    verdict = decide(student, logged[reference], logged[teacher], champion,
                     accuracy_tolerance=gate.accuracy_tolerance, macro_f1_tolerance=gate.macro_f1_tolerance,
                     max_latency_ratio=gate.max_latency_ratio, max_class_f1_drop=gate.max_class_f1_drop,
                     champion_tolerance=gate.champion_tolerance, labels=student["labels"],
                     oos_recall_tolerance=gate.oos_recall_tolerance, oos_auroc_tolerance=gate.oos_auroc_tolerance,
                     reference_name=reference_name(reference), reference_key=reference_key(reference),
                     ensemble=teacher == ENSEMBLE_TEACHER,
                     champion_production=champion_production,
                     production_tolerance=gate.production_agreement_tolerance,
                     production_min_texts=gate.production_min_texts)
    return Decision(passed=verdict.passed, reasons=tuple(verdict.reasons()),
                    criteria=tuple(verdict.to_dict()["criteria"]), version=version, champion_version=champion_version)


# how criterion names say the reference: a registered teacher's quantised form, a black box as served, an ensemble's
# best quantised member
REFERENCE_KEYS = ("int8_teacher", "served_teacher", "best_member")


def reference_key(reference: str) -> str:
    """The reference of a gate criterion's name (``accuracy_vs_served_teacher``): one of ``REFERENCE_KEYS``."""
    if reference == ENDPOINT_TEACHER:
        return "served_teacher"
    return "best_member" if is_member_row(reference) else "int8_teacher"


def reference_name(reference: str) -> str:
    """How the gate's reasons name the reference."""
    if reference == ENDPOINT_TEACHER:
        return "endpoint teacher"
    if is_member_row(reference):
        return f"best quantised ensemble member ({reference})"
    return "INT8 teacher" if reference == "teacher_int8" else f"INT8 teacher ({reference})"


def best_reference(metrics: dict[str, dict], form: str, quantised: tuple[str, ...] = QUANTISED_TEACHERS) -> str:
    """The teacher's quantised form the gate compares with: the best validation accuracy among the runtimes the
    harness measured (a tie goes to the student's own runtime; ``quantised``: an ensemble's members' forms, of
    which the first member's in the student's runtime is the fallback). A student must beat the quantised teacher a
    team would actually deploy, not a form one runtime happens to break."""
    own = reference_candidate(form)
    if own not in quantised:  # an ensemble: the first member's form in the student's runtime
        own = next((q for q in quantised if q.endswith(own.removeprefix("teacher"))), quantised[0])
    measured = [k for k in quantised if k in metrics]
    if not measured or not all("val_accuracy" in metrics[k] for k in measured):
        return own
    return max(measured, key=lambda k: (metrics[k]["val_accuracy"], k == own))


def choose_smallest(decisions: dict[str, Decision], sizes: dict[str, float]) -> str:
    """Of the judged students (``{name: decision}``, the chosen-on-validation one first), the smallest on disk that
    passed; the first one when none passed (its reasons are the run's)."""
    passing = [name for name, d in decisions.items() if d.passed]
    if not passing:
        return next(iter(decisions))
    return min(passing, key=lambda name: (sizes[name], list(decisions).index(name)))


# what every evaluation measures besides the students' served forms (the gate needs them all)
HARNESS = {"teacher_fp32", "teacher_int8", "student_fp32", "baseline_fp32"}
BLACK_BOX_HARNESS = {ENDPOINT_TEACHER, "student_fp32", "baseline_fp32"}  # a black-box teacher has one form
ENSEMBLE_HARNESS = {ENSEMBLE_TEACHER, "student_fp32", "baseline_fp32"}  # and the members the reference is one of


def harness_rows(reference: str) -> set[str]:
    """What an evaluation with this gate ``reference`` must have measured besides the served students."""
    if reference == ENDPOINT_TEACHER:
        return BLACK_BOX_HARNESS
    return ENSEMBLE_HARNESS if is_member_row(reference) else HARNESS
BASELINE_STUDENT = "baseline"  # the harness name of the student trained without the teacher, when the gate judges it


def choose_candidate(decisions: dict[str, Decision], sizes: dict[str, float], val_accuracy: dict[str, float],
                     policy: str, baseline: str) -> str:
    """Which judged student the run's decision is about. The distilled ones first, by ``policy`` (``best``: the one
    chosen on validation, the first; ``smallest``: the smallest that passes); then the hard-label baseline, when it
    passes: instead of a distilled student that fails (``fallback`` and ``compete``), or, under ``compete``, instead
    of the distilled student of its own shape that it beats on validation accuracy."""
    distilled = {name: d for name, d in decisions.items() if name != BASELINE_STUDENT}
    chosen = choose_smallest(distilled, sizes) if policy == "smallest" else next(iter(distilled))
    judged = decisions.get(BASELINE_STUDENT)
    if judged is None or not judged.passed or baseline == "off":
        return chosen
    if not distilled[chosen].passed:
        return BASELINE_STUDENT
    first = next(iter(distilled))  # the distilled student of the baseline's shape
    if baseline == "compete" and chosen == first and val_accuracy[BASELINE_STUDENT] > val_accuracy[first]:
        return BASELINE_STUDENT
    return chosen


def baseline_note(chosen: str, decisions: dict[str, Decision], metrics: dict[str, dict], served: dict[str, str],
                  primary: str) -> str | None:
    """What a promotion of the baseline means, plainly: distillation did not beat training the student alone here."""
    if chosen != BASELINE_STUDENT:
        return None
    base, dist = metrics[served[BASELINE_STUDENT]], metrics[served[primary]]
    why = ("no distilled student passed the gate" if not decisions[primary].passed else
           "it beat the distilled student on validation accuracy")
    return (f"the hard-label baseline is promoted: distillation did not beat training the student alone on this data "
            f"({why}; test accuracy {base['accuracy']:.4f} vs {dist['accuracy']:.4f} distilled, "
            f"{100 * (base['accuracy'] - dist['accuracy']):+.2f} points; validation {base['val_accuracy']:.4f} vs "
            f"{dist['val_accuracy']:.4f}; one seed: this run, `benchmarks/seeds.py` measures it over seeds)")


# the setting that moves each criterion's bar, and whether the observed value must stay above (+1) or below (-1) it
CRITERION_KNOBS = {f"{measure}_vs_{key}": knob for key in REFERENCE_KEYS
                   for measure, knob in (("accuracy", ("gate.accuracy_tolerance", 1)),
                                         ("macro_f1", ("gate.macro_f1_tolerance", 1)),
                                         ("latency", ("gate.max_latency_ratio", -1)))} | {
                   "per_class_f1_drop": ("gate.max_class_f1_drop", -1),
                   "oos_recall_vs_teacher": ("gate.oos_recall_tolerance", 1),
                   "oos_auroc_vs_teacher": ("gate.oos_auroc_tolerance", 1),
                   "accuracy_vs_ensemble_teacher": ("gate.accuracy_tolerance", 1),
                   "accuracy_vs_champion": ("gate.champion_tolerance", 1),
                   "production_agreement_vs_champion": ("gate.production_agreement_tolerance", 1)}


def _shortfall(criterion: dict) -> float:
    """How far a failed criterion is from its bar, relative to the bar (0 for a pass)."""
    if criterion["passed"]:
        return 0.0
    gap = abs(criterion["threshold"] - criterion["observed"])
    return gap / max(abs(criterion["threshold"]), 1e-9)


def closest_miss(decisions: dict[str, Decision], served: dict[str, str], shape_knobs: dict[str, str]) -> str:
    """When every judged student fails: the one closest to passing (fewest failed criteria, then the smallest relative
    shortfall), how far each failed criterion is from its bar, and the settings the measurements point at: the
    shape that came closest (``shape_knobs[name]``, e.g. ``--set student.prune_vocab=false``), the bar of each
    failed criterion, and, for the baseline, that distillation is what falls short."""
    def distance(name: str) -> tuple[int, float]:
        failed = [c for c in decisions[name].criteria if not c["passed"]]
        return len(failed), sum(_shortfall(c) for c in failed)

    name = min(decisions, key=lambda n: (distance(n), list(decisions).index(n)))
    failed = [c for c in decisions[name].criteria if not c["passed"]]
    gaps = ", ".join(f"{c['name']} {c['observed']:.4f} vs bar {c['threshold']:.4f} "
                     f"({abs(c['threshold'] - c['observed']):.4f} short)" for c in failed)
    knobs = [shape_knobs[name]] if shape_knobs.get(name) else []
    for c in failed:
        key, _ = CRITERION_KNOBS.get(c["name"], (None, 0))
        if key in ("gate.champion_tolerance", "gate.production_agreement_tolerance"):
            knobs.append("none: the champion is better, nothing to replace")
        elif key:
            knobs.append(f"{key} (this run needs {abs(c['threshold'] - c['observed']):.4f} more)")
    parts = [f"closest to passing: {served[name]} ({gaps})"]
    if name == BASELINE_STUDENT:
        against = {f"accuracy_vs_{key}" for key in REFERENCE_KEYS}
        accuracy = {n: next((c["observed"] for c in d.criteria if c["name"] in against), None)
                    for n, d in decisions.items()}
        distilled = max((a for n, a in accuracy.items() if n != BASELINE_STUDENT and a is not None), default=None)
        if distilled is None or accuracy[name] is None or accuracy[name] >= distilled:
            parts.append("it is the student trained without the teacher, as accurate as any distilled one: "
                         "distillation is not what helps on this data (benchmarks/seeds.py measures it over seeds)")
        else:
            parts.append(f"it is the student trained without the teacher; the best distilled student is more accurate "
                         f"({distilled:.4f} against {accuracy[name]:.4f}) but further from the other bars")
    if knobs:
        parts.append("settings that would move it: " + "; ".join(knobs))
    return ". ".join(parts)


def promotion_reason(decision: Decision, served: str) -> str:
    """Why the gate moved the alias, for the alias history: the served form, how many criteria it passed, the notes
    (policy, the baseline's note when it ships), then each criterion; the short form reads first."""
    passed = [r for r in decision.reasons if r.startswith("PASS ")]
    notes = [r for r in decision.reasons if not r.startswith(("PASS ", "FAIL "))]
    return "; ".join([f"{served} passed the gate ({len(passed)} criteria)", *notes, *passed])


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


def shape_knob(student: StudentConfig, shape: StudentConfig) -> str:
    """The overrides that make a frontier shape the configured student (``--set student.prune_vocab=false``), quoted
    for a shell."""
    mine, theirs = student.model_dump(exclude={"frontier"}), shape.model_dump(exclude={"frontier"})
    changed = [f"--set student.{k}={shlex.quote(json.dumps(v) if not isinstance(v, str) else v)}"
               for k, v in theirs.items() if mine.get(k) != v]
    return f"make it the student: {' '.join(changed)}" if changed else ""


def judge_students(gate: GateConfig, student: StudentConfig, logged: dict[str, dict], students: tuple[str, ...],
                   reference: str, champion: dict | None, champion_version: str | None,
                   champion_production: float | None = None) -> tuple[Decision, dict]:
    """The gate over an evaluation's logged metrics: each judged student in its served form against the teacher's
    ``reference`` form and the champion; the one chosen (``choose_candidate`` under ``gate.policy`` and
    ``gate.baseline``) with notes on the choice, on the baseline, and, when none passes, on the closest miss over
    every measured student. Returns (decision, every judged student's decision)."""
    judged_names = students if gate.policy == "smallest" else \
        students[:1] + tuple(s for s in students if s == BASELINE_STUDENT)
    served = {name: served_candidate(student.deploy, name) for name in students}

    def judged(name: str) -> Decision:
        return replace(judge_logged(gate, logged, served[name], champion, champion_version, reference=reference,
                                    champion_production=champion_production), student=name)

    decisions = {name: judged(name) for name in judged_names}
    chosen = choose_candidate(decisions, {n: logged[served[n]]["size_mb"] for n in judged_names},
                              {n: logged[served[n]].get("val_accuracy", float("nan")) for n in judged_names},
                              gate.policy, gate.baseline)
    notes = []
    if len(decisions) > 1:
        summary = "; ".join(f"{served[n]} {logged[served[n]]['size_mb']:.1f} MB "
                            f"{'passed' if d.passed else 'failed ' + ','.join(d.failed_names())}"
                            for n, d in decisions.items())
        notes.append(f"policy {gate.policy}, baseline {gate.baseline}: {served[chosen]} of [{summary}]")
    served_judged = {n: served[n] for n in judged_names}
    notes += [note] if (note := baseline_note(chosen, decisions, logged, served_judged, judged_names[0])) else []
    if not any(d.passed for d in decisions.values()):  # which measured student came closest, judged or not
        everyone = {**decisions, **{n: judged(n) for n in students if n not in decisions}}
        shapes = student.frontier_shapes()
        knobs = {name: shape_knob(student, shapes[name]) for name in everyone if name in shapes}
        notes.append(closest_miss(everyone, {n: served[n] for n in everyone}, knobs))
    return replace(decisions[chosen], reasons=(*decisions[chosen].reasons, *notes)), decisions
