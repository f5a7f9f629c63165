"""Teacher-outputs flow: soft labels of the registered teacher, cached, then gated by Great Expectations."""

from __future__ import annotations

import dataclasses
import time

from prefect import flow

from distillery.config import Config
from distillery.records import SnapshotRef, TeacherOutputs, TeacherRef
from distillery.models.labelling import shard_bounds
from distillery.tasks.labelling import (
    ask_endpoint,
    cache_key,
    combine_members,
    ensemble_key,
    labelling_dry_run,
    endpoint_soft_labels,
    endpoint_texts,
    check_teacher_labels,
    label_shard,
    log_labelling,
    lookup_cache,
    reuse_outputs,
    rows_to_label,
    select_within_budget,
    store_outputs,
    validate_outputs,
)
from distillery.tasks.data import freeze
from distillery.tasks.teacher import start_run


@flow(name="teacher-outputs", flow_run_name="label-teacher-v{teacher.version}-data-{snapshot.md5:.8}", log_prints=True,
      validate_parameters=False)
def label_flow(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef,
               parent_run_id: str | None = None) -> TeacherOutputs:
    """Label train/validation (+ transfer set) with the teacher, reuse the cache when the key matches, validate.
    An ensemble's members label first, each as a teacher of its own (cached and validated on its own)."""
    if teacher.kind == "ensemble":
        return ensemble_outputs(cfg, snapshot, teacher,
                                [label_flow(cfg, snapshot, m, parent_run_id) for m in teacher.members], parent_run_id)
    inputs, labels = rows_to_label(cfg, snapshot)
    if teacher.black_box:  # a budget too small for every generated or transfer text asks a chosen part of them
        inputs = select_within_budget(cfg, teacher, snapshot, inputs)
    check_teacher_labels(teacher, labels)
    key = cache_key(teacher, snapshot, inputs, cfg.teacher.max_length)
    run_id = start_run(cfg, "teacher-outputs", {"stage": "label", **teacher.to_tags(), **snapshot.to_tags()},
                       parent_run_id, snapshot=snapshot)
    start = time.perf_counter()
    path = lookup_cache(cfg.work.teacher_outputs, key)
    cache_hit, how = path is not None, "cache hit"
    if not cache_hit and teacher.black_box:  # answers asked once (cached by text), within the budget
        asked = ask_endpoint(cfg, teacher, snapshot, endpoint_texts(snapshot, inputs), run_id)
        soft = endpoint_soft_labels(cfg, teacher, inputs["text"].tolist(), labels)
        meta = {"teacher": teacher.__dict__, "snapshot_md5": snapshot.md5, "answers": soft.kind,
                "max_length": cfg.teacher.max_length}
        path = store_outputs(cfg, key, inputs, [soft.logits], labels, meta, run_id, answered=soft.answered)
        how = (f"{soft.kind} answers; the endpoint asked {int(asked['endpoint.asked_texts'])} texts, "
               f"{int(asked['endpoint.cached_texts'])} answered from its cache,")
    elif not cache_hit:
        reused = reuse_outputs(cfg, teacher, labels, inputs)
        texts = list(reused.missing_texts)
        bounds = shard_bounds(len(texts), cfg.labelling.shards) if texts else []
        futures = [label_shard.submit(teacher.folder, texts[a:b], cfg.teacher.max_length, cfg.labelling.batch_size, i,
                                      cfg.runtime.device) for i, (a, b) in enumerate(bounds)]
        meta = {"teacher": teacher.__dict__, "snapshot_md5": snapshot.md5, "shards": len(bounds),
                "max_length": cfg.teacher.max_length}
        path = store_outputs(cfg, key, inputs, [f.result() for f in futures], labels, meta, run_id, reused)
        how = (f"labelled {len(inputs) - reused.rows}, reused {reused.rows} from earlier outputs of this teacher,"
               if reused.rows else "labelled")
    seconds = time.perf_counter() - start
    log_labelling(cfg, run_id, teacher, snapshot, key, cache_hit, seconds, path, inputs)
    print(f"teacher {teacher.name} v{teacher.version} outputs for {len(inputs)} rows: {how} in {seconds:.1f} s")
    validation = validate_outputs(cfg, path, len(inputs), run_id, teacher, snapshot)
    return TeacherOutputs(path=path, key=key, cache_hit=cache_hit, seconds=seconds, run_id=run_id,
                          validation=validation)


def ensemble_outputs(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, members: list[TeacherOutputs],
                     parent_run_id: str | None) -> TeacherOutputs:
    """The ensemble's soft labels from its members' validated outputs (cached by theirs), validated in turn."""
    inputs, labels = rows_to_label(cfg, snapshot)
    key = ensemble_key(teacher, members)
    run_id = start_run(cfg, "teacher-outputs", {"stage": "label", **teacher.to_tags(), **snapshot.to_tags()},
                       parent_run_id, snapshot=snapshot)
    start = time.perf_counter()
    path = lookup_cache(cfg.work.teacher_outputs, key)
    cache_hit = path is not None
    if not cache_hit:
        logits, combination = combine_members(cfg, teacher, inputs, members, run_id)
        meta = {"teacher": dataclasses.asdict(teacher), "snapshot_md5": snapshot.md5, "members": [m.key for m in members],
                "ensemble": combination.to_dict(), "max_length": cfg.teacher.max_length}
        path = store_outputs(cfg, key, inputs, [logits], labels, meta, run_id)
    seconds = time.perf_counter() - start
    log_labelling(cfg, run_id, teacher, snapshot, key, cache_hit, seconds, path, inputs)
    fresh = sum(not m.cache_hit for m in members)
    print(f"teacher {teacher.name} (ensemble of {len(members)}, {fresh} labelled afresh) outputs for {len(inputs)} "
          f"rows: {'cache hit' if cache_hit else 'combined'} in {seconds:.1f} s")
    validation = validate_outputs(cfg, path, len(inputs), run_id, teacher, snapshot)
    return TeacherOutputs(path=path, key=key, cache_hit=cache_hit, seconds=seconds, run_id=run_id,
                          validation=validation)


def plan_labelling(cfg: Config) -> dict:
    """What ``label_flow`` would ask on the verified snapshot, asking nothing (``distillery label --dry-run``): no
    flow run, no Prefect server, no MLflow run."""
    return labelling_dry_run(cfg, freeze(cfg))
