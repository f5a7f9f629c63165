"""Lineage audit, status and rollback over the MLflow registry, with DVC/git checks for ``--verify``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from distillery.config import Config
from tasks import tracking, versioning


class LineageError(RuntimeError):
    """A lineage record is missing or does not verify; the message names what failed."""


def parse_ref(ref: str, default_name: str) -> tuple[str, str]:
    """``student@champion`` / ``student/3`` / ``3`` / ``champion`` -> (model name, alias or version)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name or default_name, alias
    if "/" in ref:
        name, version = ref.split("/", 1)
        return name, version
    return default_name, ref


def _loads(value: str | None):  # noqa: ANN202 - JSON value or the string itself
    if value is None:
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def dvc_commit_for(root: Path, md5: str, dvc_file: str = "data.dvc") -> str | None:
    """The first git commit whose ``data.dvc`` records ``md5`` (where to check the snapshot out from)."""
    log = subprocess.run(["git", "log", "--reverse", "--format=%H", "--", dvc_file], cwd=root,
                         capture_output=True, text=True)
    for commit in log.stdout.split():
        shown = subprocess.run(["git", "show", f"{commit}:{dvc_file}"], cwd=root, capture_output=True, text=True)
        if md5 in shown.stdout:
            return commit
    return None


def lineage_of(cfg: Config, ref: str) -> dict:
    """Everything recorded about a registered student version."""
    tracking.configure_tracking(cfg)
    name, which = parse_ref(ref, cfg.tracking.student_name)
    version = tracking.resolve_version(name, which)
    tags = version.tags
    if "teacher.version" not in tags:
        raise LineageError(f"{name} v{version.version} carries no distillery lineage tags")
    md5 = tags.get("data.snapshot_md5", "")
    return {
        "model": name, "version": str(version.version), "aliases": list(version.aliases),
        "teacher": {"name": tags.get("teacher.name"), "version": tags.get("teacher.version"),
                    "run_id": tags.get("teacher.run_id")},
        "data": {"snapshot_md5": md5, "dvc_remote": cfg.dvc.remote_name,
                 "git_commit_with_data_dvc": dvc_commit_for(Path(cfg.root), md5) if md5 else None},
        "git_revision": tags.get("git.revision"), "config_hash": tags.get("config.hash"),
        "config": _loads(tags.get("config")), "candidate": _loads(tags.get("candidate")),
        "validation": {"gx_success": tags.get("gx.success"), "summary": _loads(tags.get("gx.summary"))},
        "metrics": {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")},
        "gate": {"decision": tags.get("gate.decision"), "criteria": _loads(tags.get("gate.criteria"))},
        "runs": {k: tags.get(k) for k in ("distill.run_id", "student.run_id", "evaluation.run_id")},
        "model_card": tags.get("model_card"),
        "rollback": {k: tags[k] for k in tags if k.startswith("rollback.")},
    }


def verify_lineage(cfg: Config, info: dict) -> list[tuple[str, bool, str]]:
    """Check what a lineage record claims: snapshot fetchable and hashing right, teacher and runs still there."""
    checks: list[tuple[str, bool, str]] = []
    md5 = info["data"]["snapshot_md5"]
    dvc_text = f"outs:\n- md5: {md5}\n  hash: md5\n  path: data\n"
    try:
        got = versioning.verify_snapshot_fetchable(Path(cfg.root), dvc_text, cfg.dvc.remote_name)
        checks.append(("data snapshot fetchable from DVC remote and hashes to the recorded md5", True, got))
    except versioning.VersioningError as exc:
        checks.append(("data snapshot fetchable from DVC remote and hashes to the recorded md5", False, str(exc)))
    client = MlflowClient()
    teacher = info["teacher"]
    try:
        mv = client.get_model_version(teacher["name"], teacher["version"])
        ok = mv.run_id == teacher["run_id"]
        checks.append(("teacher version still registered (same run)", ok,
                       f"{teacher['name']} v{teacher['version']} run {mv.run_id}"))
    except MlflowException as exc:
        checks.append(("teacher version still registered (same run)", False, str(exc).splitlines()[0]))
    for key, run_id in info["runs"].items():
        try:
            client.get_run(run_id)
            checks.append((f"{key} exists in tracking", True, run_id))
        except (MlflowException, TypeError):
            checks.append((f"{key} exists in tracking", False, str(run_id)))
    revision = (info["git_revision"] or "").removesuffix("-dirty")
    known = subprocess.run(["git", "cat-file", "-e", f"{revision}^{{commit}}"], cwd=cfg.root,
                           capture_output=True).returncode == 0 if revision and revision != "unknown" else False
    checks.append(("code revision known to this git repository", known, info["git_revision"] or "none"))
    return checks


def status_of(cfg: Config, last_runs: int = 8) -> dict:
    """Current teacher, champion and the most recent runs."""
    tracking.configure_tracking(cfg)
    teacher = tracking.get_alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    champion = tracking.get_alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=last_runs) if experiment else []
    return {
        "teacher": None if teacher is None else {
            "ref": f"{teacher.name}@{cfg.teacher.alias}", "version": str(teacher.version),
            "snapshot_md5": teacher.tags.get("data.snapshot_md5"),
            "val_accuracy": teacher.tags.get("metric.val_accuracy")},
        "champion": None if champion is None else {
            "ref": f"{champion.name}@{cfg.tracking.champion_alias}", "version": str(champion.version),
            "teacher_version": champion.tags.get("teacher.version"),
            "snapshot_md5": champion.tags.get("data.snapshot_md5"), "accuracy": champion.tags.get("metric.accuracy"),
            "latency_p50_ms": champion.tags.get("metric.latency_p50_ms")},
        "runs": [{"name": r.info.run_name, "status": r.info.status, "run_id": r.info.run_id,
                  "stage": r.data.tags.get("stage"), "gate": r.data.tags.get("gate.decision")} for r in runs],
    }


def rollback_champion(cfg: Config, reason: str) -> tuple[str, str]:
    """Move the champion alias back to the previous promoted version; record why on both versions."""
    tracking.configure_tracking(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    current = tracking.get_alias_version(name, alias)
    if current is None:
        raise LineageError(f"{name}@{alias} does not exist: nothing to roll back")
    promoted = [v for v in tracking.search_versions(name)
                if v.tags.get("gate.decision") == "promoted" and int(v.version) < int(current.version)
                and "rollback.retired" not in v.tags]
    if not promoted:
        raise LineageError(f"{name} has no promoted version before v{current.version}: nothing to roll back to")
    previous = promoted[-1]
    tracking.set_version_tags(name, str(current.version), {"rollback.retired": "true", "rollback.reason": reason,
                                                           "rollback.replaced_by": str(previous.version)})
    tracking.set_version_tags(name, str(previous.version), {"rollback.restored_from": str(current.version),
                                                            "rollback.reason": reason})
    tracking.set_alias(name, alias, str(previous.version))  # last
    return str(current.version), str(previous.version)


def champion_matches(cfg: Config, teacher_version: str, snapshot_md5: str) -> str | None:
    """The champion version when it was made from this teacher version, data snapshot and config; else None."""
    tracking.configure_tracking(cfg)
    champion = tracking.get_alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    if champion is None:
        return None
    t = champion.tags
    same = (t.get("teacher.version") == str(teacher_version) and t.get("data.snapshot_md5") == snapshot_md5
            and t.get("config.hash") == cfg.digest())
    return str(champion.version) if same else None
