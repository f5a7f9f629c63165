"""Prefect tasks for the teacher: fine-tune a base model on the snapshot, register it, resolve the registered one."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.config import Config
from distillery.integrations import registry, store
from distillery.integrations.endpoint import endpoint_identity, identity_digest, llm_identity
from distillery.records import GIT_REVISION_TAG, TEACHER_SOURCE_TAG, SnapshotRef, TeacherRef, import_provenance
from distillery.models.data import read_snapshot
from distillery.models.ensemble import parse_member
from distillery.models.modeling import ModelError, align_labels, load_classifier, load_tokenizer, save_classifier
from distillery.models.students import below_floors, measure_classifier, prepare_teacher, run_teacher_training


@task(name="fine-tune-teacher", cache_policy=NO_CACHE)
def fine_tune_teacher(cfg: Config, snapshot: SnapshotRef, run_id: str) -> tuple[str, dict]:
    """Fine-tune the configured base model on train, keep the best validation epoch, save it locally.

    Checkpoints are keyed by the inputs (base model, snapshot, teacher settings), so a run killed mid-way resumes
    after its last finished epoch when started again.
    """
    splits, labels = read_snapshot(Path(snapshot.path))
    job = prepare_teacher(cfg, splits, labels, snapshot.md5)
    with registry.open_run(cfg, run_id):
        registry.log_params({**job.params, **snapshot.to_tags()})
        summary, result = run_teacher_training(job, cfg.work.checkpoints, registry.curve_logger(), len(labels))
        registry.log_metrics(summary)
    folder = save_classifier(job.model, job.tokenizer, cfg.work.teachers / run_id)
    get_run_logger().info("teacher fine-tuned: validation accuracy %.4f, macro-F1 %.4f (best epoch %d%s)",
                          summary["val_accuracy"], summary["val_macro_f1"], result.best_epoch,
                          f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else "")
    return str(folder), summary


@task(name="check-imported-teacher", cache_policy=NO_CACHE)
def check_imported_teacher(cfg: Config, snapshot: SnapshotRef, source: str) -> tuple[str, dict, dict]:
    """Fetch an existing classifier, map its labels to the data's by name, and measure it on validation and test.

    Nothing is registered here: a teacher whose labels do not match, or that scores below the validation floors
    (``models.students.below_floors``), is refused with a ModelError. Returns (aligned folder, metrics, provenance
    tags).
    """
    splits, labels = read_snapshot(Path(snapshot.path))
    if not source.startswith(registry.MODEL_URI_SCHEMES):
        source = str(cfg.path(source))  # a folder in the config is relative to the config's folder
    cfg.work.imports.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.work.imports, prefix=".fetch-") as tmp:
        fetched = registry.fetch_classifier(source, Path(tmp) / "model", cfg.teacher.max_parameters)
        source_hash = store.tree_sha256(fetched)
        model = load_classifier(fetched, max_parameters=cfg.teacher.max_parameters).eval()
        tokenizer = load_tokenizer(fetched)
    reordered = align_labels(model, labels, what=f"teacher {source}") != list(range(len(labels)))
    metrics = measure_classifier(model, tokenizer, splits, len(labels), cfg.teacher.max_length, f"teacher {source}")
    get_run_logger().info(
        "imported teacher %s: validation accuracy %.4f, macro-F1 %.4f; test accuracy %.4f, macro-F1 %.4f%s", source,
        metrics["val_accuracy"], metrics["val_macro_f1"], metrics["test_accuracy"], metrics["test_macro_f1"],
        " (labels reordered by name to the data's order)" if reordered else "")
    if low := below_floors(metrics, cfg.validation):
        raise ModelError(f"teacher {source} refused, nothing registered: {'; '.join(low)}")
    folder = save_classifier(model, tokenizer, cfg.work.imports / source_hash[:16])
    return str(folder), metrics, import_provenance(source, source_hash, reordered)


@task(name="register-teacher", cache_policy=NO_CACHE)
def register_teacher(cfg: Config, snapshot: SnapshotRef, run_id: str, folder: str, metrics: dict,
                     provenance: dict | None = None) -> TeacherRef:
    """Log the teacher as a model, register a version with lineage tags, and move the alias to it last."""
    logger = get_run_logger()
    revision = store.git_revision(Path(cfg.root))
    with registry.open_run(cfg, run_id):
        info = registry.log_classifier(Path(folder), max_length=cfg.teacher.max_length)
        registry.set_tags({**snapshot.to_tags(), GIT_REVISION_TAG: revision, **(provenance or {})})
        if provenance:  # an imported teacher's measurements (a fine-tuned one logged them while training)
            registry.log_metrics(metrics)
    name = cfg.teacher.registered_name
    base = (provenance or {}).get(TEACHER_SOURCE_TAG, cfg.teacher.base_model)
    draft = TeacherRef(name=name, version="", run_id=run_id, folder=folder, base_model=base,
                       snapshot_md5=snapshot.md5)
    reg = registry.Registry.from_config(cfg)
    version = reg.register(info.model_uri, name, {**draft.version_tags(revision, cfg.digest(), metrics),
                                                  **(provenance or {})})
    reg.set_alias(name, cfg.teacher.alias, str(version.version))  # last: a failure above leaves the alias alone
    logger.info("registered %s version %s and moved @%s to it", name, version.version, cfg.teacher.alias)
    return dataclasses.replace(draft, version=str(version.version))


def endpoint_teacher(cfg: Config, snapshot: SnapshotRef) -> TeacherRef:
    """The black-box teacher of ``teacher.endpoint`` (an LLM's with ``teacher.llm``: its prompt holds the snapshot's
    labels and examples): named by the config, versioned by its identity's digest."""
    if cfg.teacher.kind == "llm":
        from distillery.tasks.labelling import llm_prompt

        identity = llm_identity(cfg.teacher.endpoint, cfg.teacher.llm, *llm_prompt(cfg, snapshot))
    else:
        identity = endpoint_identity(cfg.teacher.endpoint)
    return TeacherRef(name=cfg.teacher.endpoint.name, version=identity_digest(identity), run_id="",
                      kind=cfg.teacher.kind, identity=json.dumps(identity, sort_keys=True))


def ensemble_teacher(cfg: Config, download: bool = True) -> TeacherRef:
    """The ensemble of ``teacher.ensemble``: each member resolved in the registry (and, with ``download``, fetched to
    a local folder), versioned by the digest of the members' versions and how they are combined. A member that is
    not registered is a NotFound naming it; an unreachable registry an error, never an ensemble of fewer."""
    e = cfg.teacher.ensemble
    registry.configure_tracking(cfg)
    reg = registry.Registry.from_config(cfg)
    members = []
    for ref in map(parse_member, e.members):
        mv = reg.resolve(ref.name, ref.alias or ref.version)
        folder = str(registry.download_classifier(mv, cfg.work.registry)) if download else ""
        members.append(TeacherRef.from_version(ref.name, str(mv.version), mv.run_id, mv.tags, folder))
    identity = {"kind": "ensemble", "weights": e.weights, "calibrate": e.calibrate,
                "members": [{"name": m.name, "version": m.version, "run_id": m.run_id} for m in members]}
    return TeacherRef(name=e.name, version=identity_digest(identity), run_id="", kind="ensemble",
                      identity=json.dumps(identity, sort_keys=True), members=tuple(members))


def composite_version(cfg: Config, snapshot: SnapshotRef) -> str:
    """The version a black box or an ensemble has now (its identity's digest), downloading nothing."""
    return (ensemble_teacher(cfg, download=False) if cfg.teacher.kind == "ensemble"
            else endpoint_teacher(cfg, snapshot)).version


@task(name="resolve-teacher", cache_policy=NO_CACHE)
def resolve_teacher(cfg: Config, version: str | None = None, snapshot: SnapshotRef | None = None) -> TeacherRef:
    """The registered teacher behind ``version`` (or the configured alias), downloaded to a local folder; with
    ``teacher.kind: ensemble`` its members; with ``endpoint`` or ``llm`` the black box the config names, for
    ``snapshot`` (nothing to download)."""
    if cfg.teacher.kind != "registered":
        if snapshot is None:
            raise ValueError("a black-box teacher is resolved for a data snapshot")
        teacher = ensemble_teacher(cfg) if cfg.teacher.kind == "ensemble" else endpoint_teacher(cfg, snapshot)
        if version is not None and version != teacher.version:
            raise ModelError(f"the {cfg.teacher.kind} teacher's version is its identity digest {teacher.version}, not "
                             f"{version}: --teacher-version picks a registered teacher (teacher.kind: registered)")
        return teacher
    registry.configure_tracking(cfg)
    name = cfg.teacher.registered_name
    mv = registry.Registry.from_config(cfg).resolve(name, version or cfg.teacher.alias)
    folder = registry.download_classifier(mv, cfg.work.registry)
    return TeacherRef.from_version(name, str(mv.version), mv.run_id, mv.tags, str(folder))


@task(name="current-teacher", cache_policy=NO_CACHE)
def current_teacher_version(cfg: Config) -> str | None:
    """The version behind ``teacher@alias``; None only when the registry says there is none (an unreachable
    registry is an error, never "no teacher": that would bootstrap a second one). An endpoint teacher is always
    there (its version is its identity's digest, known once the snapshot is: ``resolve_teacher``)."""
    if cfg.teacher.kind != "registered":
        return cfg.teacher.kind
    registry.configure_tracking(cfg)
    version = registry.Registry.from_config(cfg).alias_version(cfg.teacher.registered_name, cfg.teacher.alias)
    return str(version.version) if version else None


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(cfg: Config, run_name: str, tags: dict | None = None, parent_run_id: str | None = None,
              snapshot: SnapshotRef | None = None, with_config: bool = False) -> str:
    """An MLflow run for a flow; with ``snapshot`` it records the data snapshot as its dataset input, with
    ``with_config`` the whole configuration as its params (dotted keys)."""
    return registry.create_run(cfg, run_name, tags, parent_run_id, snapshot=snapshot,
                               params=cfg.flat() if with_config else None)
