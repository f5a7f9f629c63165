"""The records that flow between the pipeline's steps, and the registry tags they own.

config -> SnapshotRef -> TeacherRef -> TeacherOutputs -> TrainedStudent -> Evaluation -> Decision -> Lineage tags.
Each record is frozen; a step is handed the record it needs and never re-reads what it was handed. A key that names a
fact in the MLflow registry (the lineage schema) is spelled once, in the ``to_tags`` / ``from_tags`` of the record
that owns it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

# The promotion state of a registered student version (two-phase promotion): registered as PENDING, the champion alias
# moves to it, then it is marked PROMOTED. A PENDING version never served unless it holds the alias.
DECISION_TAG = "gate.decision"
PENDING, PROMOTED, REJECTED = "pending", "promoted", "rejected"
ROLLBACK_PREFIX = "rollback."
PROMOTION_PREFIX = "promotion."
METRIC_PREFIX = "metric."
# Integrity: the sha256 of a model folder's files (serving settings aside) that the evaluation measured, tagged on the
# candidate's evaluation run and on the registered version; the registered version each run made (on the distill and
# evaluation runs, so a run names the one version it vouches for); the HMAC of a version's lineage tags.
MODEL_SHA_TAG = "model.sha256"
REGISTERED_TAG = "registered.model"
SIGNATURE_TAG = "lineage.signature"
CONFIG_HASH_TAG = "config.hash"
GIT_REVISION_TAG = "git.revision"
OUTPUTS_RUN_TAG = "teacher_outputs.run_id"
SNAPSHOT_TAG = "data.snapshot_md5"
# a snapshot with texts production sent (``distillery monitor`` -> re-distil on drift): how many, their file's hash,
# and the snapshot they were added to (what the code revision's data.dvc records until someone commits the new one)
PRODUCTION_TEXTS_TAG = "data.production_texts"
PRODUCTION_SHA_TAG = "data.production_sha256"
PRODUCTION_BASE_TAG = "data.production_base_md5"
# on an evaluation run with a production hold-out: its size, the champion measured on it and its agreement with the
# teacher there (each student's is on the student's own row, ``production_agreement``)
PRODUCTION_TEXTS_METRIC = "production.holdout_texts"
PRODUCTION_CHAMPION_METRIC = "production.champion_agreement"
PRODUCTION_CHAMPION_TAG = "production.champion_version"
GATE_REFERENCE_TAG = "gate.reference"     # the teacher form the gate compared with
DEVICE_TAG = "runtime.device"  # where a student trained (also a param of its training run)
GATE_CRITERIA_TAG = "gate.criteria"
GATE_FAILED_TAG = "gate.failed"           # on a distill run: the criteria that failed ("none")
GATE_STUDENT_TAG = "gate.student"         # on a distill run: the candidate the gate decided on
MODEL_CARD_TAG = "model_card"
EVALUATION_SERVED_TAG = "evaluation.served"
EVALUATION_CONTENDERS_TAG = "evaluation.contenders"
TEACHER_SOURCE_TAG = "teacher.source"     # an imported teacher's source, and a hash of its files
# tags that change after registration by design (promotion state, rollbacks, manual promotions): never signed
# gate.approval: manual: a passing version waits (state awaiting, the flow run that waits), then approved, refused or
# timed out, by whom and why
APPROVAL_PREFIX = "approval."
APPROVAL_STATE_TAG, APPROVAL_RUN_TAG = "approval.state", "approval.flow_run_id"
APPROVAL_BY_TAG, APPROVAL_REASON_TAG = "approval.by", "approval.reason"
AWAITING, APPROVED, REFUSED, TIMED_OUT = "awaiting", "approved", "refused", "timed_out"
MUTABLE_TAG_PREFIXES = (DECISION_TAG, ROLLBACK_PREFIX, PROMOTION_PREFIX, APPROVAL_PREFIX, SIGNATURE_TAG, "mlflow.")


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _loads(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


# The forms a student can be served in (student.deploy) and the suffix of the harness candidate that measures each
# (``student_int8``, ``cut0_int8_onnx``): the gate judges that candidate and the registry serves the same bytes.
FORM_SUFFIX = {"fp32": "fp32", "int8": "int8", "onnx-int8": "int8_onnx"}
# the teacher's quantised forms the harness measures; the gate compares with the best of them on validation accuracy
QUANTISED_TEACHERS = ("teacher_int8", "teacher_int8_onnx")
PRIMARY = "student"  # the harness name of the student chosen on validation (frontier students go by their shape)
TEACHER_FP32 = "teacher_fp32"
# a black-box teacher's one form, measured through its endpoint: the teacher and the gate's reference at once
ENDPOINT_TEACHER = "teacher_endpoint"
# an ensemble teacher: measured from its members' FP32 forms combined; each member ``teacher_m<i>`` in every form
ENSEMBLE_TEACHER = "teacher_ensemble"


MEMBER_PREFIX = "teacher_m"


def member_row(index: int) -> str:
    """The harness name of an ensemble's member (1-based, in the config's order): ``teacher_m1``."""
    return f"{MEMBER_PREFIX}{index}"


def is_member_row(name: str) -> bool:
    """Whether a harness row is an ensemble member's (in any form: ``teacher_m2_int8``)."""
    return name.startswith(MEMBER_PREFIX)


def teacher_row(metrics: Mapping[str, object]) -> str:
    """The harness row of the teacher itself: its FP32 form, an ensemble, or a black box as served."""
    for row in (TEACHER_FP32, ENSEMBLE_TEACHER):
        if row in metrics:
            return row
    return ENDPOINT_TEACHER


def served_candidate(form: str, student: str = PRIMARY) -> str:
    """The harness candidate of a student in a deployment form (``int8`` -> ``student_int8``)."""
    return f"{student}_{FORM_SUFFIX.get(form, form)}"


def reference_candidate(form: str) -> str:
    """The teacher's quantised form in the student's runtime (the reference when validation cannot tell them apart)."""
    return "teacher_int8_onnx" if form == "onnx-int8" else "teacher_int8"


@dataclass(frozen=True)
class SnapshotRef:
    """A verified data snapshot: ``md5`` is DVC's ``.dir`` hash and ``path`` a folder whose bytes hash to it."""

    md5: str
    path: str

    def to_tags(self) -> dict[str, str]:
        return {SNAPSHOT_TAG: self.md5}


@dataclass(frozen=True)
class TeacherRef:
    """A registered teacher version and the local folder its classifier was downloaded to."""

    name: str
    version: str
    run_id: str
    folder: str = ""
    base_model: str = ""
    snapshot_md5: str = ""
    # registered: a classifier in the MLflow registry (``folder`` holds it); endpoint/llm: a black box behind HTTP;
    # ensemble: registered ``members``. The last two are versioned by the digest of their ``identity`` (JSON: URL and
    # request params, prompt; or the members' versions and how they are combined) and have no run or folder
    kind: str = "registered"
    identity: str = ""
    members: tuple["TeacherRef", ...] = ()

    @property
    def black_box(self) -> bool:
        """Only its answers exist: no weights, hidden states or quantised forms."""
        return self.kind in ("endpoint", "llm")

    @property
    def composite(self) -> bool:
        """Not one registered model (a black box or an ensemble): versioned by its identity's digest."""
        return self.kind != "registered"

    def to_tags(self) -> dict[str, str]:
        """What a student records about its teacher."""
        tags = {"teacher.name": self.name, "teacher.version": self.version, "teacher.run_id": self.run_id}
        if self.composite:
            tags |= {"teacher.kind": self.kind, "teacher.identity": self.identity}
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "TeacherRef":
        return cls(name=tags.get("teacher.name", ""), version=tags.get("teacher.version", ""),
                   run_id=tags.get("teacher.run_id", ""), kind=tags.get("teacher.kind", "registered"),
                   identity=tags.get("teacher.identity", ""))

    def version_tags(self, git_revision: str, config_hash: str, metrics: Mapping[str, float]) -> dict[str, str]:
        """The tags of the teacher's own registry version."""
        return {SNAPSHOT_TAG: self.snapshot_md5, GIT_REVISION_TAG: git_revision, "run_id": self.run_id,
                "base_model": self.base_model, "config.hash": config_hash,
                **{f"{METRIC_PREFIX}{k}": f"{v:.6g}" for k, v in metrics.items()}}

    @classmethod
    def from_version(cls, name: str, version: str, run_id: str, tags: Mapping[str, str], folder: str = "") -> "TeacherRef":
        return cls(name=name, version=str(version), run_id=run_id or "", folder=folder,
                   base_model=tags.get("base_model", ""), snapshot_md5=tags.get(SNAPSHOT_TAG, ""))


@dataclass(frozen=True)
class Candidate:
    """One student recipe: a distilled candidate of the sweep, or the hard-label baseline."""

    kind: str  # "distilled" | "baseline"
    temperature: float
    kd_weight: float
    ce_weight: float
    feature_weight: float = 0.0
    learning_rate: float | None = None  # None: distill.learning_rate (a search trial sets its own)
    epochs: int | None = None  # None: distill.epochs
    trial: int | None = None  # the search trial that proposed it
    shape: str | None = None  # a frontier student's shape (``cut0``): the chosen recipe on another student

    @property
    def name(self) -> str:
        if self.kind == "baseline":
            return "baseline"
        if self.trial is not None:
            recipe = f"trial-{self.trial}"
        else:
            recipe = f"distill-T{self.temperature}-kd{self.kd_weight}"
            recipe += f"-fw{self.feature_weight}" if self.feature_weight else ""
        return f"{self.shape}-{recipe}" if self.shape else recipe

    def to_dict(self) -> dict[str, Any]:
        """Set fields only: a grid candidate keeps the key (and the checkpoints) it had before search fields existed."""
        return {k: v for k, v in asdict(self).items() if v is not None}


BASELINE = Candidate(kind="baseline", temperature=1.0, kd_weight=0.0, ce_weight=1.0, feature_weight=0.0)


@dataclass(frozen=True)
class ValidationSummary:
    """What the Great Expectations suites said about the teacher outputs."""

    success: bool
    evaluated: int
    failed: tuple[dict, ...] = ()
    statistics: Mapping[str, float] = field(default_factory=dict)

    def to_tags(self) -> dict[str, str]:
        return {"gx.success": str(self.success).lower(),
                "gx.summary": _json({"evaluated": self.evaluated, "failed": len(self.failed), **self.statistics})}

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "evaluated": self.evaluated, "failed": list(self.failed),
                "statistics": dict(self.statistics)}


@dataclass(frozen=True)
class TeacherOutputs:
    """Validated soft labels of one teacher on one snapshot, cached under ``key``."""

    path: str
    key: str
    cache_hit: bool
    seconds: float
    run_id: str
    validation: ValidationSummary


@dataclass(frozen=True)
class TrainedStudent:
    """A trained candidate: its run, its saved folder and its validation scores."""

    run_id: str
    folder: str
    candidate: Candidate
    val_accuracy: float
    val_macro_f1: float
    best_epoch: int
    train_seconds: float
    resumed_from_epoch: int = 0
    weights_from: str = ""
    curve: tuple[float, ...] = ()  # validation macro-F1 after each epoch
    pruned: bool = False  # a search trial stopped below the median of finished trials
    # what taught it when not the run's teacher: the teacher assistant's lineage tags (``assistant.*``)
    assistant: Mapping[str, str] = field(default_factory=dict)
    device: str = ""  # where it trained (``cpu``, ``cuda:0 bf16``)

    @property
    def name(self) -> str:
        return self.candidate.name


def identity_digest(identity: Mapping[str, Any]) -> str:
    """The version of a teacher that is not one registered model (a black box, an ensemble, an assistant): a digest
    of what it is."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


ASSISTANT_PREFIX = "assistant."  # a student taught by the run's student: that teacher assistant's lineage


def taught_by(student: TrainedStudent, teacher: TeacherRef, outputs: TeacherOutputs) -> TrainedStudent:
    """``student`` with what taught it recorded when that was a teacher assistant: its version, its own training
    run, its files' hash and shape, and the run that made and validated its soft labels."""
    if teacher.kind != "assistant":
        return student
    identity = json.loads(teacher.identity)
    return replace(student, assistant={
        f"{ASSISTANT_PREFIX}version": teacher.version, f"{ASSISTANT_PREFIX}run_id": teacher.run_id,
        f"{ASSISTANT_PREFIX}model_sha256": identity["model_sha256"], f"{ASSISTANT_PREFIX}shape": identity["shape"],
        f"{ASSISTANT_PREFIX}outputs_run_id": outputs.run_id})


@dataclass(frozen=True)
class Evaluation:
    """The one harness's result: the parent MLflow run, the printed table and headline ratios; ``reference`` is the
    teacher's quantised form the gate compares with, ``students`` the harness names of the students measured in their
    served form (the chosen one first, then the frontier)."""

    run_id: str
    table: str
    ratios: Mapping[str, float]
    metrics: Mapping[str, Mapping[str, float]]
    reference: str = "teacher_int8"
    students: tuple[str, ...] = (PRIMARY,)


@dataclass(frozen=True)
class Decision:
    """What the gate decided and, on a pass, the registered version."""

    passed: bool
    reasons: tuple[str, ...] = ()
    criteria: tuple[dict, ...] = ()
    version: str | None = None
    champion_version: str | None = None
    student: str = PRIMARY  # which measured student the decision is about (a frontier shape under gate.policy smallest)

    def failed_names(self) -> list[str]:
        return [c["name"] for c in self.criteria if not c["passed"]]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "criteria": list(self.criteria),
                "version": self.version, "champion_version": self.champion_version, "student": self.student}


@dataclass(frozen=True)
class Lineage:
    """Everything a registered student records about how it was made (its registry version tags)."""

    teacher: TeacherRef
    snapshot_md5: str
    git_revision: str
    config_hash: str
    distill_run_id: str
    student_run_id: str
    evaluation_run_id: str
    deploy_form: str = "fp32"
    served_as: str = ""  # the harness candidate measured as this model
    reference: str = ""  # the teacher's quantised form it was judged against
    candidate: Mapping[str, Any] = field(default_factory=dict)
    validation: Mapping[str, Any] = field(default_factory=dict)
    criteria: tuple[dict, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    model_sha256: str = ""  # the registered files' hash, as the evaluation measured them
    assistant: Mapping[str, str] = field(default_factory=dict)  # ``assistant.*``: the teacher assistant that taught it
    device: str = ""  # where the student trained (``runtime.device`` resolved, with its precision)

    RUN_KEYS = ("distill.run_id", "student.run_id", "evaluation.run_id")

    def to_tags(self) -> dict[str, str]:
        return {**self.teacher.to_tags(), SNAPSHOT_TAG: self.snapshot_md5, GIT_REVISION_TAG: self.git_revision,
                CONFIG_HASH_TAG: self.config_hash, MODEL_SHA_TAG: self.model_sha256, "distill.run_id": self.distill_run_id,
                "student.run_id": self.student_run_id, "evaluation.run_id": self.evaluation_run_id,
                "deploy.form": self.deploy_form, "evaluation.candidate": self.served_as,
                GATE_REFERENCE_TAG: self.reference,
                "candidate": _json(dict(self.candidate)),
                GATE_CRITERIA_TAG: _json(list(self.criteria)), **{k: _json(v) for k, v in self.validation.items()},
                **{f"{METRIC_PREFIX}{k}": f"{v:.6g}" for k, v in self.metrics.items()}, **self.assistant,
                **({DEVICE_TAG: self.device} if self.device else {})}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "Lineage":
        if "teacher.version" not in tags:
            raise KeyError("teacher.version")
        return cls(
            teacher=TeacherRef.from_tags(tags), snapshot_md5=tags.get(SNAPSHOT_TAG, ""),
            git_revision=tags.get(GIT_REVISION_TAG, ""), config_hash=tags.get(CONFIG_HASH_TAG, ""),
            model_sha256=tags.get(MODEL_SHA_TAG, ""),
            distill_run_id=tags.get("distill.run_id", ""), student_run_id=tags.get("student.run_id", ""),
            evaluation_run_id=tags.get("evaluation.run_id", ""), deploy_form=tags.get("deploy.form", "fp32"),
            served_as=tags.get("evaluation.candidate", ""), reference=tags.get(GATE_REFERENCE_TAG, ""),
            candidate=_loads(tags.get("candidate")) or {},
            validation={"gx.success": tags.get("gx.success"), "gx.summary": _loads(tags.get("gx.summary"))},
            criteria=tuple(_loads(tags.get(GATE_CRITERIA_TAG)) or ()),
            metrics={k.removeprefix(METRIC_PREFIX): float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIX)},
            assistant={k: v for k, v in tags.items() if k.startswith(ASSISTANT_PREFIX)},
            device=tags.get(DEVICE_TAG, ""),
        )

    def runs(self) -> dict[str, str]:
        return dict(zip(self.RUN_KEYS, (self.distill_run_id, self.student_run_id, self.evaluation_run_id)))

    def made_from(self, teacher_version: str, snapshot_md5: str, config_hash: str) -> bool:
        return (self.teacher.version == str(teacher_version) and self.snapshot_md5 == snapshot_md5
                and self.config_hash == config_hash)


def decision_of(tags: Mapping[str, str]) -> str | None:
    return tags.get(DECISION_TAG)


def rollback_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k.startswith(ROLLBACK_PREFIX)}


def retired_tags(reason: str, replaced_by: str) -> dict[str, str]:
    return {f"{ROLLBACK_PREFIX}retired": "true", f"{ROLLBACK_PREFIX}reason": reason,
            f"{ROLLBACK_PREFIX}replaced_by": replaced_by}


def restored_tags(reason: str, restored_from: str) -> dict[str, str]:
    return {f"{ROLLBACK_PREFIX}restored_from": restored_from, f"{ROLLBACK_PREFIX}reason": reason}


def manual_promotion_tags(reason: str, replaced: str | None) -> dict[str, str]:
    return {f"{PROMOTION_PREFIX}manual_reason": reason, f"{PROMOTION_PREFIX}replaced": replaced or "none"}


def signed_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a lineage signature covers: all but those that change after registration by design."""
    return {k: v for k, v in tags.items() if not k.startswith(MUTABLE_TAG_PREFIXES)}


def registered_ref(name: str, version: str) -> str:
    """How a run names the registered version it made (``student/3``)."""
    return f"{name}/{version}"


def is_retired(tags: Mapping[str, str]) -> bool:
    return f"{ROLLBACK_PREFIX}retired" in tags


ALIAS_MOVE_PREFIX = "alias_move."  # a registered-model tag per move of its champion alias (MLflow keeps no history)


@dataclass(frozen=True)
class AliasMove:
    """One move of a champion alias, written on the registered model just before the alias moves: when, from which
    version to which, how (the gate's promotion, a promotion by hand, a rollback), by whom (the distill run, or the
    user and host of a command) and why; ``made`` is written once the alias has moved. A move recorded but never
    marked made (a crash in between) is told by the next move's ``from_version`` (for the last, by the alias
    itself): see ``alias_history``."""

    at: str  # UTC, ISO 8601 with microseconds: the tag's key, so the history sorts by it
    alias: str
    from_version: str  # "" when the alias did not exist
    to_version: str
    kind: str  # gate | manual | rollback
    by: str
    reason: str
    made: bool = False  # written again once the alias has moved

    MAX_REASON = 2000  # a tag value holds 5,000 characters; the rest of the reason stays in the run or the card

    def to_tag(self) -> tuple[str, str]:
        body = {k: v for k, v in asdict(self).items() if k != "at"}
        body["reason"] = body["reason"][: self.MAX_REASON]
        # characters as they are: escaped, a reason in another script could grow past the tag's 5,000 characters
        return f"{ALIAS_MOVE_PREFIX}{self.at}", json.dumps(body, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_tag(cls, key: str, value: str) -> "AliasMove":
        body = json.loads(value)
        return cls(at=key.removeprefix(ALIAS_MOVE_PREFIX), made=body.get("made") is True,
                   **{k: str(body.get(k, "")) for k in ("alias", "from_version", "to_version", "kind", "by", "reason")})


def alias_history(moves: list[AliasMove], alias: str, holder: str | None) -> tuple[list[tuple[AliasMove, bool]], str]:
    """Each recorded move of ``alias`` (oldest first) with whether it took effect, and a note ("" when the alias's
    holder now, ``holder``, is where the last move that took effect put it). A move took effect when it says so
    (``made``, written after the alias moved), or, when a crash came before that, when the next move starts from its
    target (the last one: when the alias holds its target)."""
    moves = sorted((m for m in moves if m.alias == alias), key=lambda m: m.at)
    out = []
    for n, move in enumerate(moves):
        later = moves[n + 1:]
        took = move.made or ((later[0].from_version == move.to_version) if later else holder == move.to_version)
        out.append((move, took))
    effective = [m for m, took in out if took]
    expected = effective[-1].to_version if effective else None
    if holder == expected:
        return out, ""
    if not moves:
        return out, (f"@{alias} is on v{holder} and no move of it is recorded: made before distillery kept a "
                     f"history, or outside distillery")
    return out, (f"@{alias} is on {'v' + holder if holder else 'nothing'}, but the last move distillery made put it "
                 f"on v{expected}: it was moved outside distillery since")


@dataclass(frozen=True)
class RunResult:
    """What one pipeline command produced; fields a command did not reach stay None. ``up_to_date``: the champion
    version that was already made from this teacher, snapshot and config (the run had nothing to do, and no gate
    decided anything)."""

    command: str
    snapshot: SnapshotRef
    teacher: TeacherRef | None = None
    outputs: TeacherOutputs | None = None
    run_id: str = ""
    best: TrainedStudent | None = None
    baseline: TrainedStudent | None = None
    evaluation: Evaluation | None = None
    decision: Decision | None = None
    ingest: Mapping[str, Any] | None = None
    up_to_date: str | None = None

    @property
    def skipped(self) -> bool:
        return self.up_to_date is not None


def scope_tags(oos_label: str | None, held_out: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The out-of-scope setting a student was trained and measured under, as version tags (none without one)."""
    if oos_label is None and not held_out:
        return {}
    return {"data.oos_label": oos_label or "", "data.held_out_intents": ",".join(held_out)[:5000]}


def import_provenance(source: str, sha256: str, labels_reordered: bool) -> dict[str, str]:
    """The tags of a teacher registered from elsewhere: where it came from, a hash of its files, whether its labels
    were put in the data's order."""
    return {TEACHER_SOURCE_TAG: source, f"{TEACHER_SOURCE_TAG}_sha256": sha256, "teacher.imported": "true",
            "teacher.labels_reordered": str(labels_reordered).lower()}
