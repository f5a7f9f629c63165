"""Teacher-outputs flow: soft labels of the registered teacher, cached, then gated by Great Expectations."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from distillery.config import load_config
from models.labelling import shard_bounds
from tasks.data import current_snapshot
from tasks.labelling import (
    cache_key,
    label_shard,
    labelling_inputs,
    log_labelling,
    lookup_cache,
    resolve_teacher,
    store_outputs,
    validate_outputs,
)
from tasks.teacher import start_run


@flow(name="teacher-outputs", log_prints=True)
def label_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None,
               teacher_version: str | None = None, parent_run_id: str | None = None) -> dict:
    """Label train/validation (+ transfer set) with the teacher, reuse the cache when the key matches, validate."""
    cfg = load_config(config_path, overrides)
    md5 = current_snapshot(cfg)
    teacher = resolve_teacher(cfg, teacher_version)
    inputs, labels = labelling_inputs(cfg)
    key = cache_key(teacher, md5, inputs, cfg)
    run_id = start_run(cfg, "teacher-outputs", {"stage": "label", "teacher.version": teacher["version"],
                                                "data.snapshot_md5": md5}, parent_run_id)
    start = time.perf_counter()
    path = lookup_cache(cfg, key)
    cache_hit = path is not None
    if not cache_hit:
        texts = inputs["text"].tolist()
        bounds = shard_bounds(len(texts), cfg.labelling.shards)
        futures = [label_shard.submit(teacher["folder"], texts[a:b], cfg.teacher.max_length, cfg.labelling.batch_size, i)
                   for i, (a, b) in enumerate(bounds)]
        shard_logits = [f.result() for f in futures]
        meta = {"teacher": teacher, "snapshot_md5": md5, "shards": len(bounds)}
        path = store_outputs(cfg, key, inputs, shard_logits, labels, meta, run_id)
    seconds = time.perf_counter() - start
    log_labelling(cfg, run_id, teacher, md5, key, cache_hit, seconds, path)
    print(f"teacher {teacher['name']} v{teacher['version']} outputs for {len(inputs)} rows: "
          f"{'cache hit' if cache_hit else 'labelled'} in {seconds:.1f} s")
    validation = validate_outputs(cfg, path, len(inputs), run_id)
    return {"path": path, "key": key, "cache_hit": cache_hit, "seconds": seconds, "teacher": teacher,
            "snapshot_md5": md5, "run_id": run_id, "validation": validation}
