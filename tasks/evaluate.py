"""Prefect task: the one evaluation harness over all candidates, logged to MLflow (a parent run, nested per candidate)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config, EvaluationConfig
from distillery.integrations import registry, store
from distillery.integrations.served_model import SERVING_FILE
from distillery.records import (
    ENDPOINT_TEACHER,
    ENSEMBLE_TEACHER,
    EVALUATION_CONTENDERS_TAG,
    EVALUATION_SERVED_TAG,
    GATE_REFERENCE_TAG,
    MODEL_SHA_TAG,
    PRIMARY,
    PRODUCTION_CHAMPION_METRIC,
    PRODUCTION_CHAMPION_TAG,
    PRODUCTION_TEXTS_METRIC,
    QUANTISED_TEACHERS,
    Evaluation,
    SnapshotRef,
    TeacherOutputs,
    TeacherRef,
    TrainedStudent,
    is_member_row,
    member_row,
    served_candidate,
)
from distillery.models.data import PRODUCTION_HOLDOUT, Scope, read_out_of_scope, read_snapshot
from distillery.models.devices import resolve_device
from distillery.models.evaluation import (
    Measured,
    encode_harness_rows,
    harness_candidates,
    measure_answers,
    measure_candidates,
    measure_ensemble,
    time_served_forms,
    timing_settings,
)
from distillery.models.ensemble import Combination
from distillery.models.gate import best_reference
from distillery.models.labelling import META_FILE, read_outputs
from distillery.models.metrics import label_agreement
from distillery.models.report import harness_summary, headline_ratios, write_evaluation
from distillery.tasks.labelling import endpoint_measurements


def onnx_teacher_folder(cfg: Config, teacher: TeacherRef) -> Path:
    """Where a registered teacher's ONNX Runtime INT8 form is kept (made once per teacher version)."""
    return cfg.work.onnx / f"{teacher.name}-v{teacher.version}-{teacher.run_id[:12]}"


@task(name="evaluate-candidates", cache_policy=NO_CACHE)
def evaluate_candidates(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, student: TrainedStudent,
                        baseline: TrainedStudent, parent_run_id: str,
                        frontier: dict[str, TrainedStudent] | None = None, outputs: TeacherOutputs | None = None
                        ) -> Evaluation:
    """Teacher (an ensemble: as it labelled ``outputs``) and students (``frontier``: ``{shape: student}``) in every
    form on test (and the production hold-out); an evaluation run, a nested run per candidate, tables, plots."""
    e, form, frontier = cfg.evaluation, cfg.student.deploy, frontier or {}
    splits, labels = read_snapshot(Path(snapshot.path))
    scope, oos = read_out_of_scope(Path(snapshot.path))
    abstain = e.abstain == "on" or (e.abstain == "auto" and scope.active)
    students = {PRIMARY: student.folder, **(shapes := {k: v.folder for k, v in frontier.items()})}
    candidates = harness_candidates(harness_teachers(cfg, teacher), student.folder, baseline.folder, shapes, form)
    folders = {c[2] for c in candidates.values()}
    encoded = encode_harness_rows(folders, splits, oos if abstain else None, cfg.distill.max_length)
    eval_run = registry.create_run(cfg, "evaluation", {"stage": "evaluate", **teacher.to_tags(), **run_tags(
        student, baseline, frontier)}, parent_run_id, snapshot=snapshot, split="test",
        params=oos_params(scope, oos, e) if abstain else None)
    timing = timing_settings(e)
    measured, reference = measure(cfg, teacher, candidates, encoded, splits, oos if abstain else None, labels, outputs)
    texts = splits["test"]["text"].tolist()
    contenders = time_served_forms(candidates, measured.metrics, encoded["test"], students, form, reference, texts,
                                   served_predictor(form, cfg.distill.max_length, timing.threads), timing)
    production = measure_production(cfg, outputs, {served_candidate(form, n): f for n, f in students.items()},
                                    labels, measured.metrics)
    hashes = {folder: store.tree_sha256(folder, exclude=(SERVING_FILE,)) for folder in folders}
    registry.log_candidate_runs(cfg, eval_run, measured.metrics, labels,
                                {name: {MODEL_SHA_TAG: hashes[c[2]]} for name, c in candidates.items()})
    ratios = headline_ratios(measured.metrics, contenders[0], reference)
    with tempfile.TemporaryDirectory() as tmp:
        table = write_evaluation(Path(tmp), measured.metrics, measured.logits, measured.curves,
                                 splits["test"]["label_id"].to_numpy(), labels, contenders[0], reference,
                                 tuple(contenders), e.ece_bins, len(oos.get("oos_test", ())), cfg.gate.accuracy_tolerance)
        registry.log_to_run(cfg, eval_run, metrics={**ratios, **production.metrics}, folder=Path(tmp),
                            artifact_path="evaluation", tags={GATE_REFERENCE_TAG: reference, **production.tags,
                            EVALUATION_SERVED_TAG: contenders[0], EVALUATION_CONTENDERS_TAG: ",".join(contenders)})
    for line in harness_summary(measured.metrics, contenders, reference, quantised_teachers(teacher), e, abstain):
        get_run_logger().info(line)
    return Evaluation(run_id=eval_run, table=table, ratios=ratios, reference=reference, students=(PRIMARY, *frontier),
                      metrics={k: {kk: vv for kk, vv in v.items() if kk != "per_class_f1"}
                               for k, v in measured.metrics.items()})


def harness_teachers(cfg: Config, teacher: TeacherRef) -> dict[str, tuple[str, Path]]:
    """The teacher models the harness measures in every form, ``{name: (folder, folder for its ONNX file)}``: the
    registered teacher, an ensemble's members (``teacher_m1``...), none for a black box."""
    if teacher.kind == "ensemble":
        return {member_row(i): (m.folder, onnx_teacher_folder(cfg, m)) for i, m in enumerate(teacher.members, start=1)}
    return {} if teacher.black_box else {"teacher": (teacher.folder, onnx_teacher_folder(cfg, teacher))}


def quantised_teachers(teacher: TeacherRef) -> tuple[str, ...]:
    """The quantised teacher forms the gate's reference is chosen from (an ensemble's: every member's)."""
    if teacher.kind == "ensemble":
        return tuple(served_candidate(form, member_row(i)) for i in range(1, len(teacher.members) + 1)
                     for form in ("int8", "onnx-int8"))
    return QUANTISED_TEACHERS


def measure(cfg: Config, teacher: TeacherRef, candidates: dict, encoded: dict, splits: dict, oos: dict | None,
            labels: list[str], outputs: TeacherOutputs | None = None) -> tuple[Measured, str]:
    """Every candidate measured, and the gate's reference: the teacher's best quantised form (an ensemble's: its
    best quantised member), or a black-box teacher as served, measured from its cached answers (first in the table:
    quality on the same rows, latency per request, what 1,000 of its answers cost)."""
    e = cfg.evaluation
    if teacher.kind == "ensemble":
        return measure_with_ensemble(cfg, teacher, candidates, encoded, splits, labels, outputs)
    if not teacher.black_box:
        measured = measure_candidates(candidates, encoded, len(labels), e, timing_settings(e),
                                      device=resolve_device(cfg.runtime.device))
        return measured, best_reference(measured.metrics, cfg.student.deploy)
    frames = {"test": splits["test"], "validation": splits["validation"]}
    if oos is not None:
        frames |= {k: oos.get(k, splits["test"].iloc[:0]) for k in ("oos_validation", "oos_test")}
    answers = endpoint_measurements(cfg, teacher, frames, labels)
    measured = measure_candidates(candidates, encoded, len(labels), e, timing_settings(e),
                                  reference_pred=answers.logits["test"].argmax(1),
                                  device=resolve_device(cfg.runtime.device))
    m, curve = measure_answers(answers.logits, splits["test"]["label_id"].to_numpy(),
                               splits["validation"]["label_id"].to_numpy(), len(labels), e, answers.request_ms,
                               answers.request_texts)
    p = cfg.teacher.endpoint
    m["cost_per_1k_texts"] = 1000.0 * p.price_per_request / p.texts_per_request + p.price_per_1k_texts
    measured.metrics = {ENDPOINT_TEACHER: m, **measured.metrics}
    measured.logits[ENDPOINT_TEACHER] = answers.logits["test"]
    if curve is not None:
        measured.curves[ENDPOINT_TEACHER] = curve
    return measured, ENDPOINT_TEACHER


def measure_with_ensemble(cfg: Config, teacher: TeacherRef, candidates: dict, encoded: dict, splits: dict,
                          labels: list[str], outputs: TeacherOutputs | None) -> tuple[Measured, str]:
    """The members in every form first, then the ensemble combined from their FP32 logits as it labelled (first in
    the table, the students' agreement measured against it), then the students; the reference is the best
    quantised member."""
    if outputs is None:
        raise ValueError("an ensemble teacher is measured with the outputs it labelled (their combination)")
    e, timing, device = cfg.evaluation, timing_settings(cfg.evaluation), resolve_device(cfg.runtime.device)
    combination = Combination.from_dict(json.loads((Path(outputs.path).parent / META_FILE).read_text())["ensemble"])
    members = {k: v for k, v in candidates.items() if is_member_row(k)}
    measured = measure_candidates(members, encoded, len(labels), e, timing, device=device)
    fp32 = [served_candidate("fp32", member_row(i)) for i in range(1, len(teacher.members) + 1)]
    m, logits, curve = measure_ensemble(fp32, measured, combination, splits["test"]["label_id"].to_numpy(),
                                        splits["validation"]["label_id"].to_numpy(), len(labels), e)
    pred = logits["test"].argmax(1)
    for name in members:  # each member against the ensemble it is part of
        measured.metrics[name]["agreement"] = float((measured.logits[name].argmax(1) == pred).mean())
    rest = measure_candidates({k: v for k, v in candidates.items() if k not in members}, encoded, len(labels), e,
                              timing, reference_pred=pred, device=device)
    measured = Measured(metrics={ENSEMBLE_TEACHER: m, **measured.metrics, **rest.metrics},
                        logits={ENSEMBLE_TEACHER: logits["test"], **measured.logits, **rest.logits},
                        curves={**measured.curves, **rest.curves, **({ENSEMBLE_TEACHER: curve} if curve else {})},
                        held_out={ENSEMBLE_TEACHER: logits, **measured.held_out, **rest.held_out})
    return measured, best_reference(measured.metrics, cfg.student.deploy, quantised_teachers(teacher))


def run_tags(student: TrainedStudent, baseline: TrainedStudent, frontier: dict[str, TrainedStudent]) -> dict[str, str]:
    """The evaluation run's links to the training runs of what it measures."""
    return {"student.run_id": student.run_id, "baseline.run_id": baseline.run_id,
            **{f"frontier.{k}.run_id": v.run_id for k, v in frontier.items()}}


def oos_params(scope: Scope, oos: dict, e: EvaluationConfig) -> dict:
    """The out-of-scope setting an evaluation measured abstention under."""
    return {"oos.label": scope.oos_label, "oos.held_out_intents": ",".join(scope.held_out),
            "oos.target": e.abstain_target, "oos.target_value": e.abstain_value, "oos.score": e.abstain_score,
            **{f"oos.{k}_rows": len(v) for k, v in oos.items()}}


def served_predictor(form: str, max_length: int, threads: int):  # noqa: ANN201 - folder -> predict
    """How the harness times a student's served path: the registered model's own loader on its folder."""
    from distillery.integrations.served_model import ServedClassifier

    return lambda folder: ServedClassifier(Path(folder), {"quantize": form, "max_length": max_length,
                                                          "threads": threads}).predict


@dataclasses.dataclass(frozen=True)
class ProductionHoldout:
    """What the evaluation run records of the production hold-out (the students' agreement is on their own rows)."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


def measure_production(cfg: Config, outputs: TeacherOutputs | None, served: dict[str, str], labels: list[str],
                       metrics: dict[str, dict]) -> ProductionHoldout:
    """Agreement with the teacher on the snapshot's production hold-out (texts production sent that the teacher
    labelled and no student trained on, ``gate.production_holdout``): each student in its served form (``served``:
    ``{served name: folder}``; added to its ``metrics`` row as ``production_agreement`` and ``production_texts``) and
    the champion as registered, on the same texts. Nothing without a hold-out."""
    from distillery.integrations.served_model import ServedClassifier

    if outputs is None:
        return ProductionHoldout()
    read = read_outputs(outputs.path)
    rows = read.where((read.frame["split"] == PRODUCTION_HOLDOUT) & read.frame["answered"].astype(bool))
    if not len(rows):
        return ProductionHoldout()
    texts, teacher_logits = rows.frame["text"].tolist(), rows.logits

    def agreement(classifier: ServedClassifier) -> float:
        return label_agreement(classifier.top_labels(texts), teacher_logits, labels)

    form = {"quantize": cfg.student.deploy, "max_length": cfg.distill.max_length}
    for name, folder in served.items():
        metrics[name] |= {"production_agreement": agreement(ServedClassifier(Path(folder), form)),
                          "production_texts": float(len(rows))}
    held = ProductionHoldout({PRODUCTION_TEXTS_METRIC: float(len(rows))})
    version = registry.Registry.from_config(cfg).champion(cfg)
    if version is not None:  # as it serves: its own registered settings
        champion = agreement(ServedClassifier(registry.download_classifier(version, cfg.work.registry)))
        held = ProductionHoldout({**held.metrics, PRODUCTION_CHAMPION_METRIC: champion},
                                 {PRODUCTION_CHAMPION_TAG: str(version.version)})
    get_run_logger().info("production hold-out (%d texts the teacher labelled, never trained on), agreement with the "
                          "teacher: %s; champion %s", len(rows), ", ".join(
                              f"{n} {metrics[n]['production_agreement']:.4f}" for n in served),
                          f"v{version.version} {champion:.4f}" if version is not None else "none")
    return held
