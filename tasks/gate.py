"""Prefect tasks: the promotion gate on MLflow-logged metrics, the promotion of a student that passed (through
``integrations.promotion``, the only code that moves the champion alias), and the reconciliation of what a crashed
promotion left behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.faults import fault_point
from distillery.integrations import promotion, registry, store
from distillery.records import (
    APPROVAL_RUN_TAG,
    APPROVAL_STATE_TAG,
    APPROVED,
    AWAITING,
    REFUSED,
    TIMED_OUT,
    DECISION_TAG,
    GATE_FAILED_TAG,
    GATE_REFERENCE_TAG,
    GATE_STUDENT_TAG,
    GIT_REVISION_TAG,
    MODEL_CARD_TAG,
    PRODUCTION_CHAMPION_METRIC,
    PRODUCTION_CHAMPION_TAG,
    PROMOTED,
    REJECTED,
    Decision,
    Evaluation,
    Lineage,
    SnapshotRef,
    TeacherRef,
    TrainedStudent,
    ValidationSummary,
    scope_tags,
    served_candidate,
)
from distillery.models.calibration import served_calibration
from distillery.tasks.data import production_tags
from distillery.models.data import read_out_of_scope
from distillery.models.gate import GateError, harness_rows, judge_students, promotion_reason
from distillery.models.report import gated_model_card


@task(name="gate", cache_policy=NO_CACHE)
def judge(cfg: Config, run_id: str, evaluation: Evaluation) -> tuple[Decision, dict]:
    """Decide on the logged metrics against the teacher's best quantised form and the champion
    (``models.gate.judge_students``); record the decision on the run."""
    logger = get_run_logger()
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    logged = registry.logged_candidate_metrics(reg, evaluation.run_id)
    needed = harness_rows(evaluation.reference) | {served_candidate(cfg.student.deploy, s) for s in evaluation.students} | {evaluation.reference}
    if missing := needed - set(logged):
        raise GateError(f"evaluation run {evaluation.run_id} lacks metrics for {sorted(missing)}")
    fault_point("gate.before")
    champion_version, champion = promotion.champion_metrics(cfg, reg)
    on_production = champion_production(reg, evaluation, champion_version)
    decision, judged = judge_students(cfg.gate, cfg.student, logged, evaluation.students, evaluation.reference,
                                      champion, champion_version, on_production)
    registry.log_to_run(cfg, run_id, metrics={"gate.passed": float(decision.passed)}, json_files={
        "gate/decision.json": {**decision.to_dict(), "judged": {n: d.to_dict() for n, d in judged.items()}}}, tags={
        DECISION_TAG: PROMOTED if decision.passed else REJECTED, GATE_FAILED_TAG: ",".join(decision.failed_names())
        or "none", GATE_STUDENT_TAG: served_candidate(cfg.student.deploy, decision.student),
        GATE_REFERENCE_TAG: evaluation.reference, GIT_REVISION_TAG: store.git_revision(Path(cfg.root))})
    for line in decision.reasons:
        logger.info("gate: %s", line)
    if not decision.passed:
        logger.warning("student rejected: %s; %s@%s unchanged", ", ".join(decision.failed_names()),
                       cfg.tracking.student_name, cfg.tracking.champion_alias)
    return decision, logged


def champion_production(reg: registry.Registry, evaluation: Evaluation, champion_version: str | None) -> float | None:
    """The champion's agreement with the teacher on the production hold-out, as the evaluation measured it (None
    without a hold-out or a champion). A GateError when the champion moved since: its number is another model's."""
    run = reg.run(evaluation.run_id)
    measured = run.data.tags.get(PRODUCTION_CHAMPION_TAG) if run is not None else None
    if measured is None:
        return None
    if measured != champion_version:
        raise GateError(f"the evaluation measured the champion v{measured} on the production hold-out, the champion is "
                        f"now v{champion_version}: nothing registered; run the distillation again")
    return run.data.metrics[PRODUCTION_CHAMPION_METRIC]


@task(name="promote", cache_policy=NO_CACHE)
def promote(cfg: Config, run_id: str, snapshot: SnapshotRef, teacher: TeacherRef, student: TrainedStudent,
            validation: ValidationSummary, evaluation: Evaluation, decision: Decision, logged: dict) -> Decision:
    """Register the student that passed, with its lineage, and move the champion alias to it in two phases
    (``integrations.promotion.promote_two_phase``); its folder must still hold the files the evaluation measured."""
    name, reg = cfg.tracking.student_name, registry.Registry.from_config(cfg)
    deployed = served_candidate(cfg.student.deploy, decision.student)
    files = promotion.measured_files(reg, student.folder, evaluation.run_id, deployed,
                                     f"{name}@{cfg.tracking.champion_alias}")
    lineage = Lineage(
        teacher=teacher, snapshot_md5=snapshot.md5, git_revision=store.git_revision(Path(cfg.root)),
        config_hash=cfg.digest(), distill_run_id=run_id, student_run_id=student.run_id,
        evaluation_run_id=evaluation.run_id, deploy_form=cfg.student.deploy, served_as=deployed,
        reference=evaluation.reference, candidate=student.candidate.to_dict(), validation=validation.to_tags(),
        criteria=decision.criteria, model_sha256=files, assistant=student.assistant, device=student.device,
        metrics={k: v for k, v in logged[deployed].items() if k not in ("per_class_f1", "labels")})
    calibration = served_calibration(cfg.evaluation, cfg.data.oos_label, evaluation.metrics[deployed])
    with registry.open_run(cfg, run_id):
        info = registry.log_classifier(Path(student.folder), quantize=cfg.student.deploy,
                                       max_length=cfg.distill.max_length, calibration=calibration)
        registry.log_json(cfg.to_dict(), "config.json")
    # lean version tags: the lineage keys; the full config is the run's config.json, the card the description
    scope, _ = read_out_of_scope(Path(snapshot.path))
    tags = {**lineage.to_tags(), **scope_tags(scope.oos_label, scope.held_out), **production_tags(snapshot),
            MODEL_CARD_TAG: f"runs:/{run_id}/model_card.md"}
    recipe = {**student.candidate.to_dict(),
              "student": cfg.student.frontier_shapes().get(decision.student, cfg.student).model_dump_json()}
    approve = ((lambda v: wait_for_approval(cfg, reg, v, decision, deployed, run_id))
               if cfg.gate.approval == "manual" else None)
    version, refused = promotion.promote_two_phase(
        cfg, reg, run_id, evaluation.run_id, info.model_uri, tags, lambda v: (
            gated_model_card(name, v, lineage.to_tags(), logged, decision, recipe, deployed,
                             cfg.evaluation.abstain_score, evaluation.reference)), get_run_logger(),
        reason=promotion_reason(decision, deployed), approve=approve)
    if refused is not None:
        return dataclasses.replace(decision, passed=False, version=version, reasons=(*decision.reasons, refused))
    return dataclasses.replace(decision, version=version)


def approval_input():  # noqa: ANN201 - a prefect.input.RunInput subclass
    """The form a paused run shows in the Prefect UI (and what `distillery promote --approve` sends)."""
    from prefect.input import RunInput

    class Approval(RunInput):
        approve: bool = False
        by: str = ""
        reason: str = ""

    return Approval


def wait_for_approval(cfg: Config, reg: registry.Registry, version: str, decision: Decision, deployed: str,
                      run_id: str) -> tuple[str, str, str]:
    """``gate.approval: manual``: mark the registered version awaiting, show the gate's report as a Prefect artifact,
    and pause this flow run until it is resumed with an answer (the Prefect UI's form, or `distillery promote
    --approve/--refuse`), at most ``gate.approval_timeout_s``. Returns (state, by whom, why)."""
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    name = cfg.tracking.student_name
    flow_run = FlowRunContext.get().flow_run
    reg.set_tags(name, version, {APPROVAL_STATE_TAG: AWAITING, APPROVAL_RUN_TAG: str(flow_run.id)})
    create_markdown_artifact(
        key=f"distillery-{name}-approval".lower().replace("_", "-"),
        description=f"{name} v{version} passed the gate and awaits approval",
        markdown="\n".join([f"# {name} v{version} awaits approval", "", f"Served form `{deployed}`, distill run "
                            f"`{run_id}`. Resume this flow run with `approve: true` to promote it (or run "
                            f"`distillery promote --approve --version {version} --reason ...`); `approve: false`, "
                            f"or no answer in {cfg.gate.approval_timeout_s} s, leaves the champion alone.", "",
                            "## Gate", "", *[f"- {line}" for line in decision.reasons]]))
    logger.warning("%s v%s passed the gate and awaits approval (gate.approval: manual) for up to %d s: resume flow "
                   "run %s in the Prefect UI, or `distillery promote --approve --version %s`", name, version,
                   cfg.gate.approval_timeout_s, flow_run.id, version)
    try:
        answer = pause_flow_run(wait_for_input=approval_input(), timeout=cfg.gate.approval_timeout_s,
                                key=f"approve-{name}-v{version}", poll_interval=2)
    except FlowPauseTimeout:
        return TIMED_OUT, "", f"no answer within {cfg.gate.approval_timeout_s} s"
    return (APPROVED if answer.approve else REFUSED), (answer.by or "the Prefect UI"), answer.reason


@task(name="reconcile-registry", cache_policy=NO_CACHE)
def reconcile_registry(cfg: Config) -> list[tuple[str, str]]:
    """Finish or delete what a crashed promotion left (see ``models.gate.plan_reconcile``); returns what it did."""
    return promotion.reconcile(cfg, registry.Registry.from_config(cfg), get_run_logger())
