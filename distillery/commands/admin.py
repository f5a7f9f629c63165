"""Read and admin commands (status, lineage, rollback, gc) for the CLI.

They read or change only the registry and the work folder, answer in about a second and need no orchestration
server, so they are plain functions over the integrations rather than Prefect flows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from distillery import processes
from distillery.config import Config, ConfigError
from distillery.integrations import provenance, registry, store
from distillery.records import (
    ASSISTANT_PREFIX,
    APPROVAL_BY_TAG,
    APPROVAL_RUN_TAG,
    APPROVAL_STATE_TAG,
    AWAITING,
    METRIC_PREFIX,
    PRODUCTION_BASE_TAG,
    PRODUCTION_SHA_TAG,
    PRODUCTION_TEXTS_TAG,
    MODEL_CARD_TAG,
    OUTPUTS_RUN_TAG,
    SIGNATURE_TAG,
    Decision,
    PENDING,
    PROMOTED,
    Lineage,
    TeacherRef,
    decision_of,
    is_retired,
    manual_promotion_tags,
    restored_tags,
    retired_tags,
    rollback_tags,
)
from distillery.flows.runners import run_lock
from distillery.models.gate import GateError, judge_logged
from distillery.models.retention import Entry, plan_retention
from distillery.integrations.promotion import champion_metrics, history, move_alias, reconcile
from distillery.errors import DistilleryError

logger = logging.getLogger(__name__)

SNAPSHOT_CHECK = "data snapshot fetchable from DVC remote and hashes to the recorded md5"


class LineageError(DistilleryError, RuntimeError):
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


def dvc_commit_for(root: Path, md5: str, dvc_file: str = "data.dvc") -> str | None:
    """The first git commit whose ``data.dvc`` records ``md5`` (where to check the snapshot out from)."""
    log = subprocess.run(["git", "log", "--reverse", "--format=%H", "--", dvc_file], cwd=root,
                         capture_output=True, text=True)
    for commit in log.stdout.split():
        shown = subprocess.run(["git", "show", f"{commit}:{dvc_file}"], cwd=root, capture_output=True, text=True)
        if md5 in shown.stdout:
            return commit
    return None


def _registry(cfg: Config) -> registry.Registry:
    registry.configure_tracking(cfg)
    return registry.Registry.from_config(cfg)


def lineage_of(cfg: Config, ref: str) -> dict:
    """Everything recorded about a registered student version."""
    reg = _registry(cfg)
    name, which = parse_ref(ref, cfg.tracking.student_name)
    version = reg.resolve(name, which)
    tags = version.tags
    try:
        lineage = Lineage.from_tags(tags)
    except KeyError:
        raise LineageError(f"{name} v{version.version} carries no distillery lineage tags") from None
    md5 = lineage.snapshot_md5
    return {
        "model": name, "version": str(version.version), "aliases": list(version.aliases),
        "teacher": {"name": lineage.teacher.name, "version": lineage.teacher.version, "run_id": lineage.teacher.run_id,
                    "kind": lineage.teacher.kind, **({"identity": json.loads(lineage.teacher.identity)}
                                                     if lineage.teacher.composite else {})},
        **({"taught_by_assistant": {k.removeprefix(ASSISTANT_PREFIX): v for k, v in lineage.assistant.items()}}
           if lineage.assistant else {}),
        "data": {"snapshot_md5": md5, "dvc_remote": cfg.dvc.remote_name,
                 "git_commit_with_data_dvc": dvc_commit_for(Path(cfg.root), md5) if md5 else None,
                 **({"production_texts": int(tags[PRODUCTION_TEXTS_TAG]), "production_sha256": tags[PRODUCTION_SHA_TAG],
                     "production_base_md5": tags[PRODUCTION_BASE_TAG]} if PRODUCTION_TEXTS_TAG in tags else {})},
        "git_revision": lineage.git_revision, "config_hash": lineage.config_hash, "trained_on": lineage.device or None,
        "model_sha256": lineage.model_sha256, "signed": SIGNATURE_TAG in tags,
        "config": _run_config(lineage.distill_run_id), "candidate": dict(lineage.candidate),
        "validation": {"gx_success": lineage.validation.get("gx.success"),
                       "summary": lineage.validation.get("gx.summary")},
        "metrics": dict(lineage.metrics),
        "gate": {"decision": decision_of(tags), "criteria": list(lineage.criteria)},
        "runs": lineage.runs(),
        "model_card": tags.get(MODEL_CARD_TAG),
        "rollback": rollback_tags(tags),
    }


def _run_config(run_id: str) -> dict | None:
    """The full configuration a distillation ran with (its run's config.json), or None when it is not there."""
    return registry.load_run_json(run_id, "config.json") if run_id else None


def verify_lineage(cfg: Config, info: dict) -> list[tuple[str, bool, str]]:
    """Check what a lineage record claims, each check a row ``(name, passed, detail)``: the snapshot's bytes as fetched
    from the remote, the registered files against what the evaluation measured, the runs against the version's tags
    (and naming it back), the signature when there is one, and the code revision's ``data.dvc``."""
    checks: list[tuple[str, bool, str]] = []
    md5 = info["data"]["snapshot_md5"]
    dvc_text = f"outs:\n- md5: {md5}\n  hash: md5\n  path: data\n"
    data = info["data"]
    production = ({"sha256": data["production_sha256"], "base": data["production_base_md5"]}
                  if "production_texts" in data else None)
    try:
        got = store.verify_snapshot_fetchable(Path(cfg.root), dvc_text, cfg.dvc.remote_name, production)
        checks.append((SNAPSHOT_CHECK, True, got + (f" ({data['production_texts']} production texts, "
                                                     f"{data['production_sha256'][:12]})" if production else "")))
    except store.VersioningError as exc:
        checks.append((SNAPSHOT_CHECK, False, str(exc)))
    reg = _registry(cfg)
    teacher = info["teacher"]
    kind = teacher.get("kind", "registered")
    if kind != "registered":  # a black box or an ensemble: its version is its identity's digest
        from distillery.integrations.endpoint import identity_digest

        digest = identity_digest(teacher["identity"])
        what = teacher["identity"].get("url") or ", ".join(f"{m['name']} v{m['version']}"
                                                          for m in teacher["identity"].get("members", ()))
        checks.append((f"{'ensemble' if kind == 'ensemble' else 'black-box'} teacher's identity hashes to its version",
                       digest == teacher["version"], f"{teacher['name']} {what} -> {digest}"))
    members = teacher["identity"].get("members", ()) if kind == "ensemble" else [teacher] if kind == "registered" else []
    for member in members:
        try:
            mv = reg.version(member["name"], member["version"])
            checks.append(("teacher version still registered (same run)", mv.run_id == member["run_id"],
                           f"{member['name']} v{member['version']} run {mv.run_id}"))
        except registry.NotFound as exc:
            checks.append(("teacher version still registered (same run)", False, str(exc)))
    for key, run_id in info["runs"].items():
        found = reg.run(run_id) if run_id else None
        checks.append((f"{key} exists in tracking", found is not None, str(run_id)))
    name, version = info["model"], info["version"]
    tags = reg.version(name, version).tags
    lineage = Lineage.from_tags(tags)
    checks += [provenance.files_check(reg, name, version, lineage), provenance.names_check(reg, name, version, lineage)]
    signed = provenance.signature_check(name, version, tags)
    checks += [signed] if signed is not None else []
    checks += provenance.consistency_checks(reg, name, version, tags)
    checks.append(_revision_check(cfg, info["git_revision"] or "", md5, production["base"] if production else None))
    return checks


REVISION_CHECK = "code revision is in this git repository and its data.dvc records the snapshot"


def _revision_check(cfg: Config, revision: str, md5: str, production_base: str | None = None) -> tuple[str, bool, str]:
    """The code revision's data.dvc records the snapshot, or (for texts production sent, added by the run itself) the
    snapshot they were added to; the snapshot check verified the addition's bytes."""
    commit = revision.removesuffix("-dirty")
    if not commit or commit == "unknown":
        return REVISION_CHECK, False, f"no code revision recorded ({revision or 'none'})"
    root = Path(cfg.root)
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True).returncode:
        return REVISION_CHECK, False, f"{commit} is not a commit of this repository"
    dvc_file = os.path.relpath(store.dvc_file_for(root, cfg.path(cfg.data.snapshot_dir)), root)
    shown = subprocess.run(["git", "show", f"{commit}:{dvc_file}"], cwd=root, capture_output=True, text=True)
    recorded = store.parse_snapshot_md5(shown.stdout) if shown.returncode == 0 else None
    dirty = " (it had uncommitted changes then)" if revision.endswith("-dirty") else ""
    if recorded != md5 and production_base is not None and recorded == production_base:
        return REVISION_CHECK, True, (f"{revision}{dirty}: its {dvc_file} records {recorded}, to which the run added "
                                      f"the production texts ({md5})")
    if recorded != md5:
        return REVISION_CHECK, False, (f"{dvc_file} at {commit[:12]} records {recorded or 'nothing'}, not {md5}{dirty}: "
                                       f"commit {dvc_file} after ingesting, before distilling, for a lineage that a "
                                       f"checkout reproduces")
    return REVISION_CHECK, True, f"{revision}{dirty}"


def status_of(cfg: Config, last_runs: int = 8) -> dict:
    """Current teacher, champion, versions an interrupted promotion left, and the most recent runs."""
    reg = _registry(cfg)
    teacher = reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    champion = reg.champion(cfg)
    leftovers = reconcile(cfg, reg, logger, apply=False)
    experiment = reg.client.get_experiment_by_name(cfg.tracking.experiment)
    # the pipeline's own runs (not their nested candidate and evaluation runs), newest first
    runs = reg.client.search_runs([experiment.experiment_id], "tags.stage != 'train-student' and "
                                  "tags.stage != 'evaluate'", order_by=["attributes.start_time DESC"],
                                  max_results=last_runs) if experiment else []
    made = Lineage.from_tags(champion.tags) if champion is not None else None
    # an alias moved with a plain MLflow client skips every check: say so when its version fails them
    integrity = [f"{check}: {detail}" for check, ok, detail in provenance.promotable_checks(
        reg, champion.name, str(champion.version), champion.tags) if not ok] if champion is not None else []
    teacher_ref = TeacherRef.from_version(teacher.name, teacher.version, teacher.run_id, teacher.tags) if teacher else None
    return {
        "teacher": None if teacher is None else {
            "ref": f"{teacher.name}@{cfg.teacher.alias}", "version": str(teacher.version),
            "snapshot_md5": teacher_ref.snapshot_md5,
            "val_accuracy": teacher.tags.get(f"{METRIC_PREFIX}val_accuracy")},
        "champion": None if champion is None else {
            "ref": f"{champion.name}@{cfg.tracking.champion_alias}", "version": str(champion.version),
            "teacher_version": made.teacher.version, "snapshot_md5": made.snapshot_md5,
            "accuracy": made.metrics.get("accuracy"), "latency_p50_ms": made.metrics.get("latency_p50_ms"),
            "integrity_failures": integrity},
        "leftovers": [{"version": v, "state": PENDING, "next_run_will": action} for v, action in leftovers],
        "runs": [{"name": r.info.run_name, "status": r.info.status, "run_id": r.info.run_id,
                  "stage": r.data.tags.get("stage"), "gate": decision_of(r.data.tags),
                  "started": _when(r.info.start_time),
                  "seconds": round((r.info.end_time - r.info.start_time) / 1000, 1) if r.info.end_time else None}
                 for r in runs],
    }


def _when(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None


def alias_moves(cfg: Config) -> dict:
    """The champion alias's history (``integrations.promotion.history``) as plain data, for the CLI."""
    reg = _registry(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    moves, holder, note = history(reg, name, alias)
    return {"ref": f"{name}@{alias}", "holder": holder, "note": note,
            "moves": [{**dataclasses.asdict(m), "took_effect": took} for m, took in moves]}


def rollback_champion(cfg: Config, reason: str) -> tuple[str, str]:
    """Move the champion alias back to the previous promoted version; record why on both versions."""
    reg = _registry(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    current = reg.alias_version(name, alias)
    if current is None:
        raise LineageError(f"{name}@{alias} does not exist: nothing to roll back")
    promoted = [v for v in reg.versions(name)
                if decision_of(v.tags) == PROMOTED and int(v.version) < int(current.version) and not is_retired(v.tags)]
    if not promoted:
        raise LineageError(f"{name} has no promoted version before v{current.version}: nothing to roll back to")
    previous = promoted[-1]
    reg.set_tags(name, str(current.version), retired_tags(reason, str(previous.version)))
    reg.set_tags(name, str(previous.version), restored_tags(reason, str(current.version)))
    move_alias(reg, name, alias, str(previous.version), "rollback", processes.who(), reason)  # last
    return str(current.version), str(previous.version)


PAUSE_GRACE_S = 30.0


def _resume_paused(flow_run, run_input: dict, grace_s: float = PAUSE_GRACE_S) -> bool:  # noqa: ANN001 - a UUID
    """Resume a paused flow run with ``run_input``. The run tags its version awaiting just before it pauses, so an
    answer can come while it is still running on its way to the pause: retry while it is not final, up to
    ``grace_s``. False when it ended (or never paused) without the answer."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import NotPausedError
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + grace_s
    while True:
        try:
            resume_flow_run(flow_run, run_input=run_input)
            return True
        except NotPausedError:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run).state
            if (state is not None and state.is_final()) or time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def answer_approval(cfg: Config, version: str | None, approve: bool, reason: str, wait_s: float = 120.0) -> dict:
    """Answer a version that awaits approval (``gate.approval: manual``): resume the flow run that waits for it
    with the answer, then wait (up to ``wait_s``) for that run to record it. Never takes the run lock (the waiting run
    holds it and moves the alias itself, crash-safe). Returns the version's approval tags and the champion."""
    from uuid import UUID

    reg = _registry(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    waiting = [v for v in reg.versions(name)
               if v.tags.get(APPROVAL_STATE_TAG) == AWAITING and decision_of(v.tags) == PENDING]
    if version is not None:
        waiting = [v for v in waiting if str(v.version) == str(version)]
    if not waiting:
        raise GateError(f"no version of {name} awaits approval{f' as v{version}' if version else ''} (gate.approval: "
                        "manual makes a passing student wait)")
    target = max(waiting, key=lambda v: int(v.version))
    flow_run = target.tags[APPROVAL_RUN_TAG]
    if not _resume_paused(UUID(flow_run), {"approve": approve, "by": processes.who(), "reason": reason}):
        raise GateError(f"{name} v{target.version} awaits approval, but the run that waits for it (Prefect flow run "
                        f"{flow_run}) is no longer paused: it ended without an answer. The version never served; the "
                        f"next run deletes it (re-run `distillery distill --force` to ask again)")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        tags = reg.version(name, str(target.version)).tags
        if tags.get(APPROVAL_STATE_TAG) != AWAITING and decision_of(tags) != PENDING:
            break
        time.sleep(1)
    tags = reg.version(name, str(target.version)).tags
    champion = reg.alias_version(name, alias)
    return {"model": name, "version": str(target.version), "flow_run": flow_run,
            "approval": tags.get(APPROVAL_STATE_TAG), "decision": decision_of(tags), "by": tags.get(APPROVAL_BY_TAG),
            "champion": str(champion.version) if champion is not None else None}


def promote_version(cfg: Config, version: str, reason: str) -> tuple[str | None, Decision]:
    """Move the champion alias to a registered version by hand, after the checks a promotion makes.

    The version's served form is judged again, from the evaluation that registered it, against that evaluation's
    INT8 teacher and the current champion, under today's gate settings. Raises GateError (nothing moved) when a
    criterion fails. Returns (the version that was champion, the decision).
    """
    reg = _registry(cfg)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    target = reg.version(name, version)
    if decision_of(target.tags) != PROMOTED:
        raise GateError(f"{name} v{version} is {decision_of(target.tags) or 'not a distillery student'}: only versions "
                        f"that passed the gate (state {PROMOTED}) can be promoted by hand")
    failed = [f"{check} ({detail})" for check, ok, detail in
              provenance.promotable_checks(reg, name, str(version), target.tags) if not ok]
    if failed:
        raise GateError(f"{name} v{version} is not the model its gate measured, {name}@{alias} unchanged:\n  "
                        + "\n  ".join(failed))
    lineage = Lineage.from_tags(target.tags)
    with run_lock(cfg):
        previous, champion = champion_metrics(cfg, reg)
        if previous == str(version):
            champion = None  # it is the champion already: nothing to be no worse than
        logged = registry.logged_candidate_metrics(reg, lineage.evaluation_run_id)
        decision = judge_logged(cfg.gate, logged, lineage.served_as, champion, previous, str(version),
                                reference=lineage.reference)
        if not decision.passed:
            raise GateError(f"{name} v{version} fails the gate, {name}@{alias} unchanged:\n  "
                            + "\n  ".join(decision.reasons))
        reg.set_tags(name, str(version), manual_promotion_tags(reason, previous))
        move_alias(reg, name, alias, str(version), "manual", processes.who(), reason)  # last
    return previous, decision


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def collect_garbage(cfg: Config, keep_runs: int | None = None, dry_run: bool = False) -> dict:
    """Delete what no run needs from the work folder (``runtime.workdir``) and reconcile the registry.

    Kept: the champion's and the current teacher's registry downloads, the verified snapshot ``data.dvc`` records and
    the champion's, the teacher outputs the champion was distilled from, and per kind the ``keep_runs`` latest
    entries (so the latest runs can resume or re-run from cache). Everything else, and any half-written leftover, goes.
    """
    keep_runs = keep_runs or cfg.runtime.keep_runs
    reg = _registry(cfg)
    in_use: set[tuple[str, str]] = set()
    teacher = reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    champion = reg.champion(cfg)
    if teacher is not None:
        in_use.add(("registry", f"{teacher.name}-v{teacher.version}"))
    if champion is not None:
        made = Lineage.from_tags(champion.tags)
        in_use |= {("registry", f"{champion.name}-v{champion.version}"),
                   ("registry", f"{made.teacher.name}-v{made.teacher.version}"),
                   ("snapshots", made.snapshot_md5.removesuffix(".dir"))}
        outputs_run = reg.run(made.distill_run_id)
        source = outputs_run.data.tags.get(OUTPUTS_RUN_TAG) if outputs_run else None
        label_run = reg.run(source) if source else None
        if label_run is not None and label_run.data.params.get("labelling.cache_key"):
            in_use.add(("teacher-outputs", label_run.data.params["labelling.cache_key"]))
    dvc_file = store.dvc_file_for(Path(cfg.root), cfg.path(cfg.data.snapshot_dir))
    if dvc_file.is_file():
        in_use.add(("snapshots", store.snapshot_md5(dvc_file).removesuffix(".dir")))
    roots = cfg.work.collected()
    entries = [Entry(kind, p.name, p.stat().st_mtime, _size(p)) for kind, root in roots.items() if root.is_dir()
               for p in root.iterdir()]
    keep, delete = plan_retention(entries, in_use, keep_runs)
    with run_lock(cfg):  # never under a running distillation's feet
        if not dry_run:
            for entry in delete:
                path = roots[entry.kind] / entry.name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        actions = reconcile(cfg, reg, logger, apply=not dry_run)
        # what a killed command (kill -9, a lost machine) could not end itself
        orphans = registry.fail_orphaned_runs(reg, cfg.tracking.experiment, apply=not dry_run)
        helpers = processes.orphaned_helpers()
        if not dry_run:
            processes.stop(helpers)
    return {"kept": len(keep), "deleted": [f"{e.kind}/{e.name}" for e in delete],
            "freed_bytes": sum(e.size for e in delete), "registry": actions, "dry_run": dry_run,
            "orphaned_runs_failed": orphans, "orphaned_servers_stopped": [p.pid for p in helpers],
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def register_webhook(cfg: Config, url: str) -> str:
    """Point an MLflow registry webhook (teacher alias moves) at the receiver at ``url``; idempotent."""
    from distillery.integrations.webhook import SECRET_ENV

    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise ConfigError(f"set {SECRET_ENV} to the shared webhook secret (never put it in a file under git)")
    reg = _registry(cfg)
    existing = [h for h in reg.client.list_webhooks() if h.url == url]
    if existing:
        return f"MLflow webhook {existing[0].webhook_id} already delivers to {url}"
    hook = reg.client.create_webhook(name="distillery-teacher-alias", url=url, events=["model_version_alias.created"],
                                     secret=secret)
    return f"registered MLflow webhook {hook.webhook_id} -> {url}"


def serve_webhook(cfg: Config, host: str, port: int, on_ready: Callable[[], None] = lambda: None) -> None:
    """Serve the MLflow webhook receiver; a verified teacher alias move emits the re-distill event (once per delivery),
    to the Prefect server at PREFECT_API_URL: without one the events would be lost, so it refuses to start."""
    from distillery.integrations.events import check_prefect_server, emit_redistill
    from distillery.integrations.webhook import SECRET_ENV, create_app, serve

    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise ConfigError(f"set {SECRET_ENV} to the shared webhook secret (never put it in a file under git)")
    if not os.environ.get("PREFECT_API_URL"):  # events would go to a temporary server no deployment listens to
        raise ConfigError("the receiver emits Prefect events for the redistill-on-change deployment: set "
                          "PREFECT_API_URL to the Prefect server it is deployed on (`scripts/stack.sh up` starts one)")
    check_prefect_server()
    name = cfg.teacher.registered_name

    def on_alias(version: str, reason: str) -> str | None:
        return emit_redistill(name, version, reason)

    on_ready()
    serve(create_app(secret, name, cfg.teacher.alias, on_alias), host, port)
