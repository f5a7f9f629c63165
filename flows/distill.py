"""Distillation flow: validated teacher outputs -> sweep + baseline -> one evaluation harness -> promotion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from distillery.config import load_config
from flows.label import label_flow
from flows.runners import serialised, task_runner_for
from tasks.data import current_snapshot
from tasks.events import champion_up_to_date
from tasks.labelling import resolve_teacher
from tasks.distill import BASELINE, sweep_grid, train_student
from tasks.evaluate import evaluate_candidates
from tasks.gate import gate_and_promote
from tasks.teacher import start_run


@flow(name="distill", log_prints=True)
def distill_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None,
                 teacher_version: str | None = None, force: bool = False) -> dict:
    """Everything after the teacher: a failed GX suite stops it before any training, a rejection before any alias."""
    cfg = load_config(config_path, overrides)
    with serialised(cfg):
        if not force:
            md5 = current_snapshot(cfg)
            teacher = resolve_teacher(cfg, teacher_version)
            champion = champion_up_to_date(cfg, teacher["version"], md5)
            if champion is not None:
                print(f"nothing to do: {cfg.tracking.student_name} v{champion} (@{cfg.tracking.champion_alias}) was made "
                      f"from teacher v{teacher['version']}, data {md5} and this config (use --force to re-run)")
                return {"skipped": True, "champion_version": champion, "teacher": teacher, "snapshot_md5": md5,
                        "decision": {"passed": True, "version": None, "reasons": []}}
        return _distill(cfg, config_path, overrides, teacher_version)


def _distill(cfg, config_path: str | None, overrides: dict[str, Any] | None,  # noqa: ANN001 - Config
             teacher_version: str | None) -> dict:
    labelled = label_flow.with_options(task_runner=task_runner_for(cfg))(config_path, overrides, teacher_version)
    teacher, md5 = labelled["teacher"], labelled["snapshot_md5"]
    run_id = start_run(cfg, "distill", {"stage": "distill", "teacher.version": teacher["version"],
                                        "data.snapshot_md5": md5, "teacher_outputs.run_id": labelled["run_id"]})
    grid = sweep_grid(cfg)
    # the sweep and the baseline are independent: mapped over the task runner (threads or Dask workers)
    futures = [train_student.submit(cfg, teacher, labelled["path"], c, run_id) for c in grid]
    baseline_future = train_student.submit(cfg, teacher, labelled["path"], BASELINE, run_id)
    candidates = [f.result() for f in futures]
    baseline = baseline_future.result()
    best = max(candidates, key=lambda c: (c["val_macro_f1"], c["val_accuracy"]))
    if len(candidates) > 1:
        print("sweep (validation macro-F1): " + ", ".join(f"{c['name']}={c['val_macro_f1']:.4f}" for c in candidates)
              + f" -> {best['name']}")
    evaluation = evaluate_candidates(cfg, teacher, best, baseline, run_id)
    decision = gate_and_promote(cfg, run_id, evaluation["run_id"], best, teacher, md5, labelled["validation"])
    verdict = (f"PROMOTED as {cfg.tracking.student_name} v{decision['version']} (@{cfg.tracking.champion_alias})"
               if decision["passed"] else f"REJECTED ({cfg.tracking.student_name}@{cfg.tracking.champion_alias} unchanged)")
    print("\n" + evaluation["table"] + "\n\ngate:\n  " + "\n  ".join(decision["reasons"]) + f"\n\n{verdict}")
    return {"skipped": False, "run_id": run_id, "teacher": teacher, "snapshot_md5": md5, "best": best, "baseline": baseline,
            "evaluation": evaluation, "decision": decision, "labelling": {k: labelled[k] for k in ("cache_hit", "seconds")}}
