"""Prefect tasks: the promotion gate on MLflow-logged metrics, the two-phase promotion (the only code that moves the
champion alias), and the reconciliation that cleans what a crashed promotion left behind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config, StudentConfig
from distillery.faults import fault_point
from distillery.integrations import provenance, registry, store
from distillery.integrations.served_model import SERVING_FILE
from distillery.records import (
    DECISION_TAG,
    MODEL_SHA_TAG,
    METRIC_PREFIX,
    PENDING,
    PROMOTED,
    REJECTED,
    Decision,
    Evaluation,
    Lineage,
    SnapshotRef,
    TeacherRef,
    TrainedStudent,
    ValidationSummary,
    decision_of,
    served_candidate,
)
from distillery.models.data import read_out_of_scope
from distillery.models.gate import (
    BASELINE_STUDENT,
    GateError,
    baseline_note,
    choose_candidate,
    closest_miss,
    judge_logged,
    plan_reconcile,
)
from distillery.models.report import model_card

HARNESS = {"teacher_fp32", "teacher_int8", "student_fp32", "baseline_fp32"}


def champion_metrics(cfg: Config, reg: registry.Registry) -> tuple[str | None, dict | None]:
    """The current champion's version and the metrics of its served form, from the evaluation that promoted it.

    (None, None) only when the registry answers that there is no champion; an unreachable registry raises.
    """
    version = reg.alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    if version is None:
        return None, None
    try:
        lineage = Lineage.from_tags(version.tags)
    except KeyError:
        raise GateError(f"champion {cfg.tracking.student_name} v{version.version} carries no lineage tags") from None
    if not lineage.evaluation_run_id:
        raise GateError(f"champion {cfg.tracking.student_name} v{version.version} has no evaluation.run_id tag")
    logged = registry.logged_candidate_metrics(reg, lineage.evaluation_run_id)
    return str(version.version), logged[lineage.measured_as]


def shape_knob(student: StudentConfig, shape: StudentConfig) -> str:
    """The overrides that make a frontier shape the configured student (``--set student.prune_vocab=false``)."""
    mine, theirs = student.model_dump(exclude={"frontier"}), shape.model_dump(exclude={"frontier"})
    changed = [f"--set student.{k}={json.dumps(v) if not isinstance(v, str) else v}"
               for k, v in theirs.items() if mine.get(k) != v]
    return f"make it the student: {' '.join(changed)}" if changed else ""


@task(name="gate", cache_policy=NO_CACHE)
def judge(cfg: Config, run_id: str, evaluation: Evaluation) -> tuple[Decision, dict]:
    """Decide on the logged metrics against the teacher's best quantised form and the champion; record the decision
    on the run. Under ``gate.policy: smallest`` every measured student is judged and the smallest that passes is the
    decision (``Decision.student`` names it)."""
    logger = get_run_logger()
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    logged = registry.logged_candidate_metrics(reg, evaluation.run_id)
    students = evaluation.students if cfg.gate.policy == "smallest" else \
        evaluation.students[:1] + tuple(s for s in evaluation.students if s == BASELINE_STUDENT)
    # the gate judges the form that will be served, against the reference the harness chose on validation
    served = {name: served_candidate(cfg.student.deploy, name) for name in students}
    missing = (HARNESS | set(served.values()) | {evaluation.reference}) - set(logged)
    if missing:
        raise GateError(f"evaluation run {evaluation.run_id} lacks metrics for {sorted(missing)}")
    fault_point("gate.before")
    champion_version, champion = champion_metrics(cfg, reg)
    def judged(name: str) -> Decision:
        return dataclasses.replace(judge_logged(cfg.gate, logged, served_candidate(cfg.student.deploy, name), champion,
                                                champion_version, reference=evaluation.reference), student=name)

    decisions = {name: judged(name) for name in students}
    chosen = choose_candidate(decisions, {name: logged[c]["size_mb"] for name, c in served.items()},
                              {name: logged[c].get("val_accuracy", float("nan")) for name, c in served.items()},
                              cfg.gate.policy, cfg.gate.baseline)
    decision = decisions[chosen]
    notes = []
    if len(decisions) > 1:
        summary = "; ".join(f"{served[n]} {logged[served[n]]['size_mb']:.1f} MB "
                            f"{'passed' if d.passed else 'failed ' + ','.join(d.failed_names())}"
                            for n, d in decisions.items())
        notes.append(f"policy {cfg.gate.policy}, baseline {cfg.gate.baseline}: {served[chosen]} of [{summary}]")
    notes += [note] if (note := baseline_note(chosen, decisions, logged, served, students[0])) else []
    if not any(d.passed for d in decisions.values()):  # which measured student came closest, judged or not
        everyone = {**decisions, **{n: judged(n) for n in evaluation.students if n not in decisions}}
        shapes = cfg.student.frontier_shapes()
        knobs = {name: shape_knob(cfg.student, shapes[name]) for name in everyone if name in shapes}
        notes.append(closest_miss(everyone, {n: served_candidate(cfg.student.deploy, n) for n in everyone}, knobs))
    decision = dataclasses.replace(decision, reasons=(*decision.reasons, *notes))
    with registry.open_run(cfg, run_id):
        registry.log_json({**decision.to_dict(), "judged": {n: d.to_dict() for n, d in decisions.items()}},
                          "gate/decision.json")
        registry.log_metrics({"gate.passed": float(decision.passed)})
        registry.set_tags({DECISION_TAG: PROMOTED if decision.passed else REJECTED,
                         "gate.failed": ",".join(decision.failed_names()) or "none",
                         "gate.student": served[chosen], "gate.reference": evaluation.reference,
                         "git.revision": store.git_revision(Path(cfg.root))})
    for line in decision.reasons:
        logger.info("gate: %s", line)
    if not decision.passed:
        logger.warning("student rejected: %s; %s@%s unchanged", ", ".join(decision.failed_names()),
                       cfg.tracking.student_name, cfg.tracking.champion_alias)
    return decision, logged


def scope_tags(snapshot: SnapshotRef) -> dict[str, str]:
    """The out-of-scope setting the student was trained and measured under (also inside the snapshot's hash)."""
    scope, _ = read_out_of_scope(Path(snapshot.path))
    if not scope.active:
        return {}
    return {"data.oos_label": scope.oos_label or "", "data.held_out_intents": ",".join(scope.held_out)[:5000]}


def served_calibration(cfg: Config, metrics: dict) -> dict | None:
    """What the registered model applies to its confidences, from what the harness fitted on validation: the
    temperature, and the abstention threshold with the label it answers below it."""
    calibration = {k: metrics[k] for k in ("calibration_temperature",) if k in metrics}
    if "abstain_threshold" in metrics:
        calibration.update(abstain_below=metrics["abstain_threshold"], abstain_score=cfg.evaluation.abstain_score,
                           oos_label=cfg.data.oos_label or cfg.evaluation.oos_label)
    return calibration or None


@task(name="promote", cache_policy=NO_CACHE)
def promote(cfg: Config, run_id: str, snapshot: SnapshotRef, teacher: TeacherRef, student: TrainedStudent,
            validation: ValidationSummary, evaluation: Evaluation, decision: Decision, logged: dict) -> Decision:
    """Two-phase promotion: register the student as ``pending``, move the champion alias, then mark it ``promoted``.

    A crash before the alias moves leaves the alias where it was and a ``pending`` version that never served (the
    next run's ``reconcile_registry`` deletes it); a crash after leaves the alias on a ``pending`` version, which
    reconciliation marks ``promoted``. No version ever claims to have served without having held the alias.
    """
    logger = get_run_logger()
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    reg = registry.Registry.from_config(cfg)
    deployed = served_candidate(cfg.student.deploy, decision.student)
    student_cfg = cfg.student.frontier_shapes().get(decision.student, cfg.student)
    files = store.tree_sha256(student.folder, exclude=(SERVING_FILE,))
    measured = registry.candidate_tags(reg, evaluation.run_id).get(deployed, {}).get(MODEL_SHA_TAG)
    if files != measured:
        raise GateError(f"{student.folder} no longer holds the files the evaluation measured as {deployed} (sha256 "
                        f"{files[:16]}…, measured {str(measured)[:16]}…): nothing registered, {name}@{alias} unchanged")
    lineage = Lineage(
        teacher=teacher, snapshot_md5=snapshot.md5, git_revision=store.git_revision(Path(cfg.root)),
        config_hash=cfg.digest(), distill_run_id=run_id, student_run_id=student.run_id,
        evaluation_run_id=evaluation.run_id, deploy_form=cfg.student.deploy, served_as=deployed,
        reference=evaluation.reference, candidate=student.candidate.to_dict(),
        validation=validation.to_tags(), criteria=decision.criteria,
        metrics={k: v for k, v in logged[deployed].items() if k not in ("per_class_f1", "labels")},
        model_sha256=files)
    with registry.open_run(cfg, run_id):
        calibration = served_calibration(cfg, evaluation.metrics[deployed])
        info = registry.log_classifier(Path(student.folder), quantize=cfg.student.deploy,
                                       max_length=cfg.distill.max_length, calibration=calibration)
        registry.log_json(cfg.to_dict(), "config.json")
    # lean version tags: the lineage keys; the full config is the run's config.json, the card the description
    tags = {**lineage.to_tags(), **scope_tags(snapshot), "model_card": f"runs:/{run_id}/model_card.md",
            DECISION_TAG: PENDING}
    version = str(reg.register(info.model_uri, name, tags).version)
    fault_point("promote.registered")
    try:
        provenance.seal_version(reg, name, version, (run_id, evaluation.run_id))
        failed = [f"{check}: {detail}" for check, ok, detail in
                  provenance.promotable_checks(reg, name, version, reg.version(name, version).tags) if not ok]
        if failed:
            raise GateError("the registered version fails its integrity checks: " + "; ".join(failed))
        card_lineage = {k: v for k, v in lineage.to_tags().items()
                        if not k.startswith((METRIC_PREFIX, "gate.", "gx.", "candidate"))}
        notes = [r for r in decision.reasons if not r.startswith(("PASS ", "FAIL "))]
        card = model_card(name, version, card_lineage, logged,
                          {"passed": decision.passed, "criteria": list(decision.criteria), "notes": notes},
                          {**student.candidate.to_dict(), "student": student_cfg.model_dump_json()}, served=deployed,
                          abstain_score=cfg.evaluation.abstain_score, reference=evaluation.reference)
        with registry.open_run(cfg, run_id):
            registry.log_text(card, "model_card.md")
        reg.describe(name, version, card)
        reg.set_alias(name, alias, version)
    except Exception as exc:
        try:
            reg.delete_version(name, version)
            undone = "the new version was deleted again"
        except registry.TrackingError:
            undone = (f"v{version} is left marked {PENDING} (it never served); the next run or `distillery gc` "
                      f"deletes it")
        raise GateError(f"promotion of {name} v{version} failed before {name}@{alias} moved ({exc}); the alias is "
                        f"unchanged and {undone}") from exc
    fault_point("promote.alias_moved")
    try:
        reg.set_tags(name, version, {DECISION_TAG: PROMOTED})
    except registry.TrackingError as exc:
        logger.warning("%s@%s now serves v%s, but marking it %s failed (%s): the next run marks it", name, alias,
                       version, PROMOTED, exc)
    logger.info("promoted %s v%s to @%s", name, version, alias)
    return dataclasses.replace(decision, version=version)


@task(name="reconcile-registry", cache_policy=NO_CACHE)
def reconcile_registry(cfg: Config) -> list[tuple[str, str]]:
    """Finish or delete what a crashed promotion left (see ``models.gate.plan_reconcile``); returns what it did."""
    return reconcile(cfg, registry.Registry.from_config(cfg), get_run_logger())


def reconcile(cfg: Config, reg: registry.Registry, logger, apply: bool = True) -> list[tuple[str, str]]:  # noqa: ANN001
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    versions = reg.versions(name)
    # who holds the alias is read from the alias itself: search results do not reliably carry aliases
    holder = reg.alias_version(name, alias) if any(decision_of(v.tags) == PENDING for v in versions) else None
    serving = str(holder.version) if holder is not None else None
    actions = plan_reconcile([(str(v.version), decision_of(v.tags), str(v.version) == serving) for v in versions],
                             PENDING, PROMOTED)
    for version, action in actions:
        if not apply:
            logger.warning("%s v%s was left %s by an interrupted promotion: the next run will %s it", name, version,
                           PENDING, action)
            continue
        if action == "finish":
            failed = [f"{check}: {detail}" for check, ok, detail in provenance.promotable_checks(
                reg, name, version, reg.version(name, version).tags) if not ok]
            if failed:  # it holds the alias, but nothing vouches for it: never mark it as gated
                logger.error("%s v%s holds @%s and was left %s, but fails its promotion checks (%s): not marked %s; "
                             "move the alias back with `distillery promote --rollback` or `--version N`", name,
                             version, alias, PENDING, "; ".join(failed), PROMOTED)
                continue
            reg.set_tags(name, version, {DECISION_TAG: PROMOTED})
            logger.warning("%s v%s holds @%s but was left %s by an interrupted promotion: marked %s", name, version,
                           alias, PENDING, PROMOTED)
        else:
            reg.delete_version(name, version)
            logger.warning("%s v%s was left %s by an interrupted promotion and never served: deleted", name, version,
                           PENDING)
    return actions
