"""Promotion in the registry: the only code that moves the champion alias. The two-phase promotion (register as
``pending``, move the alias, mark ``promoted``), the champion's metrics the gate compares with, and the
reconciliation that finishes or deletes what an interrupted promotion left."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import Callable

from distillery.config import Config
from distillery.faults import fault_point
from distillery.integrations import provenance, registry, store
from distillery.integrations.served_model import SERVING_FILE
from distillery.records import (ALIAS_MOVE_PREFIX, APPROVAL_BY_TAG, APPROVAL_REASON_TAG, APPROVAL_STATE_TAG, APPROVED,
                                DECISION_TAG, MODEL_SHA_TAG, PENDING, PROMOTED, REJECTED, AliasMove, Lineage,
                                alias_history, decision_of)
from distillery.models.gate import GateError, plan_reconcile


def champion_metrics(cfg: Config, reg: registry.Registry) -> tuple[str | None, dict | None]:
    """The current champion's version and the metrics of its served form, from the evaluation that promoted it.

    (None, None) only when the registry answers that there is no champion; an unreachable registry raises.
    """
    version = reg.champion(cfg)
    if version is None:
        return None, None
    try:
        lineage = Lineage.from_tags(version.tags)
    except KeyError:
        raise GateError(f"champion {cfg.tracking.student_name} v{version.version} carries no lineage tags") from None
    if not lineage.evaluation_run_id:
        raise GateError(f"champion {cfg.tracking.student_name} v{version.version} has no evaluation.run_id tag")
    logged = registry.logged_candidate_metrics(reg, lineage.evaluation_run_id)
    return str(version.version), logged[lineage.served_as]


def measured_files(reg: registry.Registry, folder: str, evaluation_run_id: str, candidate: str, ref: str) -> str:
    """The hash of ``folder``'s files, which must be those the evaluation measured as ``candidate`` (a GateError
    naming both, with nothing registered, when they changed since)."""
    files = store.tree_sha256(folder, exclude=(SERVING_FILE,))
    measured = registry.candidate_tags(reg, evaluation_run_id).get(candidate, {}).get(MODEL_SHA_TAG)
    if files != measured:
        raise GateError(f"{folder} no longer holds the files the evaluation measured as {candidate} (sha256 "
                        f"{files[:16]}…, measured {str(measured)[:16]}…): nothing registered, {ref} unchanged")
    return files


def move_alias(reg: registry.Registry, name: str, alias: str, version: str, kind: str, by: str,
               reason: str) -> str | None:
    """Move ``name@alias`` to ``version``, the move first recorded on the registered model (``AliasMove``: MLflow
    keeps no history of aliases). Every move of a champion alias goes through here. Returns the version it left."""
    current = reg.alias_version(name, alias)
    previous = str(current.version) if current is not None else ""
    at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    move = AliasMove(at, alias, previous, str(version), kind, by, reason)
    reg.set_model_tag(name, *move.to_tag())
    fault_point("alias.recorded")
    reg.set_alias(name, alias, str(version))
    try:
        reg.set_model_tag(name, *dataclasses.replace(move, made=True).to_tag())
    except registry.TrackingError as exc:  # the history still tells it from the alias and the next move
        logging.getLogger(__name__).warning("%s@%s moved to v%s; recording that it did failed (%s)", name, alias,
                                            version, exc)
    return previous or None


def history(reg: registry.Registry, name: str, alias: str) -> tuple[list[tuple[AliasMove, bool]], str | None, str]:
    """Every recorded move of ``name@alias``, oldest first, with whether it took effect; the version the alias is on
    now; and a note when that is not where the last move put it (``records.alias_history``). No moves and no
    holder when the model does not exist (an unreachable registry raises)."""
    try:
        tags = reg.model_tags(name)
    except registry.NotFound:
        return [], None, ""
    moves = [AliasMove.from_tag(k, v) for k, v in tags.items() if k.startswith(ALIAS_MOVE_PREFIX)]
    current = reg.alias_version(name, alias)
    holder = str(current.version) if current is not None else None
    checked, note = alias_history(moves, alias, holder)
    return checked, holder, note


def promote_two_phase(cfg: Config, reg: registry.Registry, run_id: str, eval_run_id: str, model_uri: str,
                      tags: dict[str, str], card_for: Callable[[str], str], logger: logging.Logger,
                      reason: str = "passed the gate",
                      approve: Callable[[str], tuple[str, str, str]] | None = None) -> tuple[str, str | None]:
    """Register ``model_uri`` (logged on the distill run ``run_id``) with ``tags`` as ``pending``, seal and check it,
    describe it with ``card_for(version)``, move the champion alias to it, then mark it ``promoted``.

    A crash before the alias moves leaves the alias where it was and a ``pending`` version that never served (the
    next run's reconciliation deletes it, or this function does at once); a crash after leaves the alias on a
    ``pending`` version, which reconciliation marks ``promoted``. No version ever claims to have served without
    having held the alias.

    With ``approve`` (``gate.approval: manual``), the sealed and described version waits for ``approve(version)``:
    (state, by whom, why), state ``approved``, ``refused`` or ``timed_out``. Anything but approved marks it
    ``rejected`` with the answer and leaves the alias alone; a crash while waiting leaves it ``pending``, never
    served, for reconciliation to delete. Returns (the version, None) or (the version, why it was not approved)."""
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    version = str(reg.register(model_uri, name, {**tags, DECISION_TAG: PENDING}).version)
    fault_point("promote.registered")
    try:
        provenance.seal_version(reg, name, version, (run_id, eval_run_id))
        failed = [f"{check}: {detail}" for check, ok, detail in
                  provenance.promotable_checks(reg, name, version, reg.version(name, version).tags) if not ok]
        if failed:
            raise GateError("the registered version fails its integrity checks: " + "; ".join(failed))
        card = card_for(version)
        with registry.open_run(cfg, run_id):
            registry.log_text(card, "model_card.md")
        reg.describe(name, version, card)
        by = f"distill run {run_id}"
        if approve is not None:
            state, who, why = approve(version)
            reg.set_tags(name, version, {APPROVAL_STATE_TAG: state, APPROVAL_BY_TAG: who, APPROVAL_REASON_TAG: why})
            if state != APPROVED:
                reg.set_tags(name, version, {DECISION_TAG: REJECTED})
                logger.warning("%s v%s not promoted: approval %s%s%s", name, version, state.replace("_", " "),
                               f" by {who}" if who else "", f" ({why})" if why else "")
                return version, f"approval {state.replace('_', ' ')}{f' by {who}' if who else ''}: {why or '-'}"
            by, reason = f"{by}, approved by {who}", f"{reason}; approved: {why or '-'}"
        move_alias(reg, name, alias, version, "gate", by, reason)
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
    return version, None


def reconcile(cfg: Config, reg: registry.Registry, logger, apply: bool = True) -> list[tuple[str, str]]:  # noqa: ANN001
    """Finish (alias holder that passes the promotion checks) or delete (never served) every version an interrupted
    promotion left ``pending`` (``models.gate.plan_reconcile``); with ``apply`` False only say what would be done."""
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
