"""Whether a registered student is what its lineage says: the checks behind `lineage --verify`, `promote` and `status`.

Three kinds of check, each a row ``(name, passed, detail)`` so that a failure names the check:

- the bytes: the registered files hash to what the evaluation run logged for the form it measured (what the gate
  judged is what the registry serves);
- agreement: the runs a version names agree with its tags and name it back (the distill run's teacher, snapshot,
  config digest and code revision; the teacher-outputs run's teacher and snapshot; the evaluation's metrics; the
  gate decision's criteria), so copying tags onto another model or editing one tag is found out;
- a signature: with ``DISTILLERY_LINEAGE_KEY`` set, an HMAC-SHA256 of the version's lineage tags (its name and
  number included), so an edit by anyone without the key is detected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from typing import Mapping

from distillery.integrations import registry
from distillery.records import (
    ASSISTANT_PREFIX,
    CONFIG_HASH_TAG,
    GATE_CRITERIA_TAG,
    GIT_REVISION_TAG,
    MODEL_SHA_TAG,
    OUTPUTS_RUN_TAG,
    REGISTERED_TAG,
    SIGNATURE_TAG,
    SNAPSHOT_TAG,
    Lineage,
    identity_digest,
    registered_ref,
    signed_tags,
)

LINEAGE_KEY_ENV = "DISTILLERY_LINEAGE_KEY"
Check = tuple[str, bool, str]

FILES_CHECK = "registered model files are the bytes the evaluation measured"
NAMES_CHECK = "distill and evaluation runs name this version"
SIGNATURE_CHECK = f"lineage tags signed with {LINEAGE_KEY_ENV}"


def lineage_key() -> str | None:
    return os.environ.get(LINEAGE_KEY_ENV) or None


def signature(key: str, name: str, version: str, tags: Mapping[str, str]) -> str:
    """HMAC-SHA256 (hex) over the version's name, number and signed tags, as canonical JSON."""
    blob = json.dumps({"model": registered_ref(name, version), "tags": signed_tags(tags)}, sort_keys=True)
    return hmac.new(key.encode(), blob.encode(), hashlib.sha256).hexdigest()


def signature_check(name: str, version: str, tags: Mapping[str, str]) -> Check | None:
    """None when there is neither a key nor a signature (nothing claimed, nothing to check)."""
    key, signed = lineage_key(), tags.get(SIGNATURE_TAG)
    if key is None and signed is None:
        return None
    if key is None:
        return SIGNATURE_CHECK, False, f"the tags are signed but {LINEAGE_KEY_ENV} is not set: set it to check them"
    if signed is None:
        return SIGNATURE_CHECK, False, "no signature: registered without the key, or the signature tag was removed"
    ok = hmac.compare_digest(signed, signature(key, name, version, tags))
    return SIGNATURE_CHECK, ok, "signature matches" if ok else "the tags were changed after signing (or another key)"


def files_check(reg: registry.Registry, name: str, version: str, lineage: Lineage) -> Check:
    """The registered files against the hash the evaluation run logged for the candidate this version was measured
    as (never against the version's own tag, which anyone who can tag can copy)."""
    if not lineage.evaluation_run_id:
        return FILES_CHECK, False, "no evaluation.run_id tag"
    if reg.run(lineage.evaluation_run_id) is None:
        return FILES_CHECK, False, f"evaluation run {lineage.evaluation_run_id} does not exist"
    measured = registry.candidate_tags(reg, lineage.evaluation_run_id).get(lineage.served_as, {}).get(MODEL_SHA_TAG)
    if not measured:
        return FILES_CHECK, False, (f"evaluation run {lineage.evaluation_run_id} logged no {MODEL_SHA_TAG} for "
                                    f"{lineage.served_as}")
    try:
        served = registry.registered_files_sha256(reg, name, version)
    except registry.NotFound as exc:
        return FILES_CHECK, False, str(exc)
    if served != measured:
        return FILES_CHECK, False, (f"{name} v{version} files hash to {served[:16]}…, the evaluation measured "
                                    f"{measured[:16]}… ({lineage.served_as})")
    return FILES_CHECK, True, f"sha256 {served[:16]}… ({lineage.served_as})"


def names_check(reg: registry.Registry, name: str, version: str, lineage: Lineage) -> Check:
    """The distill run and its evaluation run each name this version as the one they registered."""
    want = registered_ref(name, version)
    named = {}
    for key, run_id in (("distill", lineage.distill_run_id), ("evaluation", lineage.evaluation_run_id)):
        run = reg.run(run_id) if run_id else None
        named[key] = None if run is None else run.data.tags.get(REGISTERED_TAG)
    wrong = {k: v for k, v in named.items() if v != want}
    if wrong:
        return NAMES_CHECK, False, "; ".join(f"{k} run names {v or 'no version'}" for k, v in wrong.items())
    return NAMES_CHECK, True, want


def promotable_checks(reg: registry.Registry, name: str, version: str, tags: Mapping[str, str]) -> list[Check]:
    """What a promotion (by the gate, by hand, or finished by reconciliation) requires of a version: the files are the
    measured bytes, the runs name it, and with a key set its tags are signed."""
    try:
        lineage = Lineage.from_tags(tags)
    except KeyError:
        return [("distillery lineage tags", False, f"{name} v{version} carries none")]
    checks = [files_check(reg, name, version, lineage), names_check(reg, name, version, lineage)]
    signed = signature_check(name, version, tags)
    if signed is not None and (signed[1] or lineage_key() is not None):
        checks.append(signed)
    return checks


def _metrics_agree(version_metrics: Mapping[str, float], logged: Mapping[str, object]) -> tuple[bool, str]:
    numbers = {k: float(v) for k, v in logged.items() if k not in ("per_class_f1", "labels")}
    if set(version_metrics) != set(numbers):
        extra, lacking = sorted(set(version_metrics) - set(numbers)), sorted(set(numbers) - set(version_metrics))
        return False, f"metric names differ (tags only: {extra[:4]}, run only: {lacking[:4]})"
    # the tags hold the run's values to 6 significant digits (f"{v:.6g}")
    differ = [k for k, v in version_metrics.items() if not math.isclose(v, float(f"{numbers[k]:.6g}"), rel_tol=1e-9,
                                                                         abs_tol=1e-12)]
    if differ:
        k = differ[0]
        return False, f"{len(differ)} differ, e.g. {k}: tag {version_metrics[k]:.6g}, run {numbers[k]:.6g}"
    return True, f"{len(numbers)} metrics"


def consistency_checks(reg: registry.Registry, name: str, version: str, tags: Mapping[str, str]) -> list[Check]:
    """The version's tags against the runs that made it; each disagreement is a failed row."""
    lineage = Lineage.from_tags(tags)
    checks: list[Check] = []
    distill = reg.run(lineage.distill_run_id) if lineage.distill_run_id else None
    if distill is None:
        return [("distill run agrees with the version's tags", False, f"run {lineage.distill_run_id!r} not found")]
    run_tags = distill.data.tags
    made_from = {**lineage.teacher.to_tags(), SNAPSHOT_TAG: lineage.snapshot_md5}
    wanted = {"stage": "distill", **made_from, CONFIG_HASH_TAG: lineage.config_hash,
              GIT_REVISION_TAG: lineage.git_revision}
    differ = [f"{k}: run {run_tags.get(k)!r}, version {v!r}" for k, v in wanted.items() if run_tags.get(k) != v]
    checks.append(("distill run agrees with the version's tags (teacher, snapshot, config, code revision)",
                   not differ, "; ".join(differ) or lineage.distill_run_id))
    outputs_id = run_tags.get(OUTPUTS_RUN_TAG)
    outputs = reg.run(outputs_id) if outputs_id else None
    if outputs is None:
        checks.append(("teacher outputs run belongs to this teacher and snapshot", False,
                       f"the distill run names no existing teacher-outputs run ({outputs_id!r})"))
    else:
        o = outputs.data.tags
        differ = [f"{k}: {o.get(k)!r} vs {v!r}" for k, v in wanted.items()
                  if k in made_from and k != "teacher.name" and o.get(k) != v]
        checks.append(("teacher outputs run belongs to this teacher and snapshot", not differ,
                       "; ".join(differ) or outputs_id))
    evaluation = reg.run(lineage.evaluation_run_id) if lineage.evaluation_run_id else None
    if evaluation is None:
        checks.append(("evaluation run belongs to the distill run and measured this student", False,
                       f"run {lineage.evaluation_run_id!r} not found"))
    else:
        e = evaluation.data.tags
        students = {v for k, v in e.items() if k == "student.run_id" or (k.startswith("frontier.") and
                                                                          k.endswith(".run_id"))}
        problems = [f"{what}" for what, bad in (
            (f"it is a {e.get('stage')!r} run, not an evaluation", e.get("stage") != "evaluate"),
            (f"its parent is {e.get('mlflow.parentRunId')}", e.get("mlflow.parentRunId") != lineage.distill_run_id),
            (f"it measured no student run {lineage.student_run_id}", lineage.student_run_id not in students)) if bad]
        checks.append(("evaluation run belongs to the distill run and measured this student", not problems,
                       "; ".join(problems) or lineage.evaluation_run_id))
        metrics_check = f"metrics on the version equal the evaluation's ({lineage.served_as})"
        try:
            logged = registry.logged_candidate_metrics(reg, lineage.evaluation_run_id).get(lineage.served_as) \
                if e.get("stage") == "evaluate" else None
            ok, detail = (False, f"no candidate {lineage.served_as}") if logged is None else \
                _metrics_agree(lineage.metrics, logged)
        except registry.NotFound as exc:
            ok, detail = False, str(exc)
        checks.append((metrics_check, ok, detail))
    if lineage.assistant:
        checks.append(assistant_check(reg, lineage))
    decision = registry.load_run_json(lineage.distill_run_id, "gate/decision.json")
    criteria_tag = tags.get(GATE_CRITERIA_TAG)
    same = decision is not None and criteria_tag == registry.tag_value(list(decision.get("criteria", [])))
    checks.append(("gate criteria on the version equal the run's gate decision", same,
                   "gate/decision.json not logged" if decision is None else
                   ("criteria match" if same else "the version's gate.criteria differ from gate/decision.json")))
    return checks



ASSISTANT_CHECK = "teacher assistant chain: the run's teacher taught the assistant, whose validated outputs taught this"


def assistant_check(reg: registry.Registry, lineage: Lineage) -> Check:
    """A student taught by the run's student: that assistant is a student run of the same distillation whose teacher
    is the version's teacher; its soft labels' run names it (version, run, files' hash) and the snapshot; and this
    student's own training run learnt from it."""
    a = {k.removeprefix(ASSISTANT_PREFIX): v for k, v in lineage.assistant.items()}
    assistant, outputs, student = (reg.run(a.get("run_id", "")), reg.run(a.get("outputs_run_id", "")),
                                   reg.run(lineage.student_run_id))
    if assistant is None or outputs is None or student is None:
        return ASSISTANT_CHECK, False, "a run of the chain is missing (assistant, its outputs or this student's)"
    trained, o = assistant.data, outputs.data.tags
    identity = json.loads(o.get("teacher.identity") or "{}")
    problems = [what for what, bad in (
        ("the assistant is not a student of this distillation",
         trained.tags.get("stage") != "train-student" or trained.tags.get("mlflow.parentRunId") != lineage.distill_run_id),
        (f"the assistant was taught by teacher v{trained.params.get('teacher.version')}, not "
         f"v{lineage.teacher.version}", trained.params.get("teacher.version") != lineage.teacher.version
         or trained.params.get("teacher.run_id") != lineage.teacher.run_id),
        ("its outputs run names another teacher", o.get("teacher.kind") != "assistant"
         or o.get("teacher.run_id") != a.get("run_id") or o.get("teacher.version") != a.get("version")),
        ("its identity does not hash to its version or names other files",
         identity_digest(identity) != a.get("version") or identity.get("model_sha256") != a.get("model_sha256")),
        (f"its outputs are of snapshot {o.get(SNAPSHOT_TAG)}", o.get(SNAPSHOT_TAG) != lineage.snapshot_md5),
        ("this student did not learn from it", student.data.params.get("teacher.run_id") != a.get("run_id")
         or student.data.params.get("teacher.version") != a.get("version"))) if bad]
    return (ASSISTANT_CHECK, not problems, "; ".join(problems) or
            f"{a.get('shape')} (run {a.get('run_id')}, outputs {a.get('outputs_run_id')}) taught by "
            f"{lineage.teacher.name} v{lineage.teacher.version}")


def seal_version(reg: registry.Registry, name: str, version: str, run_ids: tuple[str, ...]) -> None:
    """Right after registering: the runs that made the version name it, and with a key set its tags (as the registry
    stored them) are signed. Then ``promotable_checks`` must pass before any alias moves to it."""
    registry_ref = registered_ref(name, version)
    for run_id in run_ids:
        registry.set_run_tags(reg, run_id, {REGISTERED_TAG: registry_ref})
    key = lineage_key()
    if key is not None:
        stored = reg.version(name, version).tags
        reg.set_tags(name, version, {SIGNATURE_TAG: signature(key, name, version, stored)})
