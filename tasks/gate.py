"""Prefect task: the promotion gate on MLflow-logged metrics, and the only code that moves the champion alias."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from models.gate import decide
from models.report import model_card
from tasks import tracking, versioning
from tasks.evaluate import logged_candidate_metrics


class GateError(RuntimeError):
    """The gate cannot decide (metrics missing) or promotion failed; the registry is left as it was."""


def champion_metrics(cfg: Config) -> tuple[str | None, dict | None]:
    """The current champion's version and the student metrics of the evaluation that promoted it."""
    version = tracking.get_alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    if version is None:
        return None, None
    eval_run = version.tags.get("evaluation.run_id")
    if not eval_run:
        raise GateError(f"champion {cfg.tracking.student_name} v{version.version} has no evaluation.run_id tag")
    form = version.tags.get("deploy.form", "fp32")
    return str(version.version), logged_candidate_metrics(eval_run)[f"student_{form}"]


@task(name="gate-and-promote", cache_policy=NO_CACHE)
def gate_and_promote(cfg: Config, run_id: str, evaluation_run_id: str, student: dict, teacher: dict,
                     snapshot_md5: str, validation: dict) -> dict:
    """Decide on the logged metrics; on a pass register the student with lineage and move the alias last."""
    logger = get_run_logger()
    tracking.configure_tracking(cfg)
    logged = logged_candidate_metrics(evaluation_run_id)
    missing = {"teacher_fp32", "teacher_int8", "student_fp32", "baseline_fp32"} - set(logged)
    if missing:
        raise GateError(f"evaluation run {evaluation_run_id} lacks metrics for {sorted(missing)}")
    champion_version, champion = champion_metrics(cfg)
    g = cfg.gate
    deployed = f"student_{cfg.student.deploy}"  # the gate judges the form that will be served
    decision = decide(logged[deployed], logged["teacher_int8"], logged["teacher_fp32"], champion,
                      accuracy_tolerance=g.accuracy_tolerance, macro_f1_tolerance=g.macro_f1_tolerance,
                      max_latency_ratio=g.max_latency_ratio, max_class_f1_drop=g.max_class_f1_drop,
                      champion_tolerance=g.champion_tolerance, labels=logged[deployed]["labels"])
    record = {**decision.to_dict(), "champion_version": champion_version}
    revision = versioning.git_revision(Path(cfg.root))
    with tracking.open_run(cfg, run_id):
        tracking.log_json(record, "gate/decision.json")
        mlflow.log_metric("gate.passed", float(decision.passed))
        mlflow.set_tags({"gate.decision": "promoted" if decision.passed else "rejected",
                         "gate.failed": ",".join(c.name for c in decision.failed) or "none",
                         "git.revision": revision})
    for line in decision.reasons():
        logger.info("gate: %s", line)
    if not decision.passed:
        logger.warning("student rejected: %s; %s@%s unchanged", ", ".join(c.name for c in decision.failed),
                       cfg.tracking.student_name, cfg.tracking.champion_alias)
        return {"passed": False, "reasons": decision.reasons(), "version": None, "champion_version": champion_version}

    metrics = {k: v for k, v in logged[deployed].items() if k not in ("per_class_f1", "labels")}
    lineage = {
        "teacher.name": teacher["name"], "teacher.version": teacher["version"], "teacher.run_id": teacher["run_id"],
        "data.snapshot_md5": snapshot_md5, "git.revision": revision, "config.hash": cfg.digest(),
        "distill.run_id": run_id, "student.run_id": student["run_id"], "evaluation.run_id": evaluation_run_id,
    }
    tags = {**lineage, "gx.success": str(validation["success"]).lower(),
            "gx.summary": {"evaluated": validation["evaluated"], "failed": len(validation["failed"]),
                           **validation["statistics"]},
            "deploy.form": cfg.student.deploy, "gate.decision": "promoted", "gate.criteria": decision.to_dict()["criteria"],
            "candidate": student["candidate"], "config": cfg.to_dict(),
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}}
    name = cfg.tracking.student_name
    with tracking.open_run(cfg, run_id):
        info = tracking.log_classifier(Path(student["folder"]), quantize=cfg.student.deploy)
    version = tracking.register_version(info.model_uri, name, tags)
    try:
        all_metrics = {k: v for k, v in logged.items()}
        card = model_card(name, str(version.version), lineage, all_metrics, decision.to_dict(),
                          {**student["candidate"], "student": json.dumps(tags["config"]["student"])})
        with tracking.open_run(cfg, run_id):
            mlflow.log_text(card, "model_card.md")
        tracking.set_version_tags(name, str(version.version), {"model_card": f"runs:/{run_id}/model_card.md"})
        tracking.set_alias(name, cfg.tracking.champion_alias, str(version.version))  # last
    except Exception as exc:
        MlflowClient().delete_model_version(name, str(version.version))  # leave the registry as it was
        raise GateError(f"promotion of {name} v{version.version} failed and was undone: {exc}") from exc
    logger.info("promoted %s v%s to @%s", name, version.version, cfg.tracking.champion_alias)
    return {"passed": True, "reasons": decision.reasons(), "version": str(version.version),
            "champion_version": champion_version}
