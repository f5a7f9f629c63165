"""Distillation flow: validated teacher outputs -> sweep + baseline -> one evaluation harness -> gate -> promotion."""

from __future__ import annotations

import dataclasses
import time

from prefect import flow

from distillery.config import Config
from distillery.records import (BASELINE, CONFIG_HASH_TAG, OUTPUTS_RUN_TAG, RunResult, SnapshotRef, TeacherOutputs,
                                TeacherRef, TrainedStudent, taught_by)
from distillery.flows.label import label_flow
from distillery.flows.runners import spread_over_gpus, task_runner_for
from distillery.models.gate import BASELINE_STUDENT
from distillery.models.selection import (configured_trial, median_bars, pick_best, search_sampler, sweep_grid,
                                         trial_candidate)
from distillery.models.students import shape_recipe
from distillery.tasks.distill import (StageClock, cache_teacher_features, log_search, log_stage_seconds,
                                      teacher_assistant, train_student, uses_pooled_features)
from distillery.tasks.evaluate import evaluate_candidates
from distillery.tasks.events import champion_up_to_date, report_decision
from distillery.tasks.gate import judge, promote, reconcile_registry
from distillery.tasks.teacher import start_run


def search(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, outputs, run_id: str) -> list:  # noqa: ANN001
    """Optuna (seeded TPE) over temperature, kd/ce weights, learning rate and epochs, maximising validation macro-F1,
    with median pruning (``distill.search.prune``): each trial reports its per-epoch scores to the study.

    Trials are asked in rounds of ``distill.search.parallel`` and trained as tasks on the task runner (each its own
    nested MLflow run); the search stops at ``trials`` or, between rounds, after ``timeout_s``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    q = cfg.distill.search
    study = optuna.create_study(direction="maximize", sampler=search_sampler(cfg.distill))
    if q.start_configured:  # first, so no bar prunes it: the pick is never below the configured recipe on validation
        study.enqueue_trial(configured_trial(cfg.distill))
    start, trained = time.monotonic(), []
    while len(trained) < q.trials and (q.timeout_s is None or time.monotonic() - start < q.timeout_s):
        # the median rule over the trials finished so far, as per-epoch bars the new round's trials train against
        finished = [t.intermediate_values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
        bars = median_bars(finished, q.epochs[1], q.prune_startup, q.prune_warmup) if q.prune else ()
        trials = [study.ask() for _ in range(min(q.parallel, q.trials - len(trained)))]
        futures = [train_student.submit(cfg, teacher, snapshot, outputs, trial_candidate(t, cfg.distill), run_id,
                                        bars) for t in trials]
        for trial, future in zip(trials, futures):
            result = future.result()
            for epoch, value in enumerate(result.curve, start=1):
                trial.report(value, epoch)
            if result.pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, result.val_macro_f1)
            trained.append(result)
    best = study.best_trial
    pruned = sum(r.pruned for r in trained)
    log_search(cfg, run_id, len(trained), best.number, best.params, best.value, pruned)
    print(f"search: {len(trained)} trials ({pruned} pruned) in {time.monotonic() - start:.0f} s; best trial "
          f"{best.number} (validation macro-F1 {best.value:.4f}): {best.params}")
    return trained


def frontier_teachers(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, outputs: TeacherOutputs,
                      best: TrainedStudent, run_id: str) -> dict[str, tuple[TeacherRef, TeacherOutputs]]:
    """Each frontier shape's teacher and its validated outputs: the run's teacher, or for a shape ``{taught_by:
    student}`` the run's distilled student (``best``) as teacher assistant, its soft labels made by the same
    labelling flow (cached by its identity, checked by the same suites) under this run."""
    shapes = cfg.student.frontier_shapes()
    teachers = {label: (teacher, outputs) for label in shapes}
    if any(shape.taught_by == "student" for shape in shapes.values()):
        assistant = teacher_assistant(cfg, teacher, best)
        taught = label_flow.with_options(task_runner=task_runner_for(cfg))(cfg, snapshot, assistant, run_id)
        teachers |= {label: (assistant, taught) for label, shape in shapes.items() if shape.taught_by == "student"}
    return teachers


def train_recipes(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, outputs: TeacherOutputs,
                  run_id: str) -> tuple[list[TrainedStudent], TrainedStudent]:
    """The sweep's candidates (or the search's trials) and the baseline: independent, so mapped over the task
    runner (threads or Dask workers; one GPU each where several are seen, flows.runners.spread_over_gpus)."""
    grid = [] if cfg.distill.search.trials > 0 else sweep_grid(cfg.distill)
    placed = spread_over_gpus(cfg, 1 + len(grid))
    baseline_future = train_student.submit(placed[0], teacher, snapshot, outputs, BASELINE, run_id)
    if uses_pooled_features(cfg):  # once, before the candidates that read them train side by side
        cache_teacher_features(cfg, teacher, snapshot, outputs)
    if cfg.distill.search.trials > 0:
        candidates = search(cfg, snapshot, teacher, outputs, run_id)
    else:
        futures = [train_student.submit(on, teacher, snapshot, outputs, c, run_id) for on, c in zip(placed[1:], grid)]
        candidates = [f.result() for f in futures]
    return candidates, baseline_future.result()


def train_frontier(cfg: Config, snapshot: SnapshotRef, teachers: dict[str, tuple[TeacherRef, TeacherOutputs]],
                   best: TrainedStudent, run_id: str) -> dict[str, TrainedStudent]:
    """The chosen recipe on each further student shape (the frontier), side by side on the task runner (one GPU
    each where several are seen), each from its teacher: the run's, or the student as teacher assistant."""
    shapes = cfg.student.frontier_shapes()
    placed = spread_over_gpus(cfg, len(shapes))
    futures = {label: train_student.submit(on.for_student(shape.model_dump()), teachers[label][0], snapshot,
                                           teachers[label][1],
                                           dataclasses.replace(shape_recipe(shape, best.candidate), shape=label),
                                           run_id)
               for on, (label, shape) in zip(placed, shapes.items())}
    return {label: taught_by(f.result(), *teachers[label]) for label, f in futures.items()}


@flow(name="distill", flow_run_name="distill-teacher-v{teacher.version}-data-{snapshot.md5:.8}", log_prints=True,
      validate_parameters=False)
def distill_flow(cfg: Config, snapshot: SnapshotRef, teacher: TeacherRef, force: bool = False) -> RunResult:
    """Everything after the teacher: a failed GX suite stops it before any training, a rejection before any alias.

    Runs inside the pipeline's lock: it first finishes or removes what an interrupted promotion left behind.
    """
    reconcile_registry(cfg)
    if not force:
        champion = champion_up_to_date(cfg, teacher.version, snapshot)
        if champion is not None:
            print(f"nothing to do: {cfg.tracking.student_name} v{champion} (@{cfg.tracking.champion_alias}) was made "
                  f"from teacher v{teacher.version}, data {snapshot.md5} and this config (use --force to re-run)")
            return RunResult(command="distill", snapshot=snapshot, teacher=teacher, up_to_date=champion)
    clock = StageClock()
    outputs = label_flow.with_options(task_runner=task_runner_for(cfg))(cfg, snapshot, teacher)
    run_id = start_run(cfg, "distill", {"stage": "distill", **teacher.to_tags(), **snapshot.to_tags(),
                                        OUTPUTS_RUN_TAG: outputs.run_id, CONFIG_HASH_TAG: cfg.digest()},
                       snapshot=snapshot, with_config=True)
    clock.lap("label")
    candidates, baseline = train_recipes(cfg, snapshot, teacher, outputs, run_id)
    best = pick_best(candidates)
    if len(candidates) > 1:
        print("sweep (validation macro-F1): " + ", ".join(f"{c.name}={c.val_macro_f1:.4f}" for c in candidates)
              + f" -> {best.name}")
    teachers = frontier_teachers(cfg, snapshot, teacher, outputs, best, run_id)
    frontier = train_frontier(cfg, snapshot, teachers, best, run_id)
    if cfg.gate.baseline != "off":  # the student trained without the teacher is measured and judged like the others
        frontier[BASELINE_STUDENT] = baseline
    clock.lap("train")
    evaluation = evaluate_candidates(cfg, snapshot, teacher, best, baseline, run_id, frontier, outputs)
    clock.lap("evaluate")
    decision, logged = judge(cfg, run_id, evaluation)
    if decision.passed:
        chosen = frontier.get(decision.student, best)
        learnt_from = teachers.get(decision.student, (teacher, outputs))[1]  # its soft labels' validation
        decision = promote(cfg, run_id, snapshot, teacher, chosen, learnt_from.validation, evaluation, decision,
                           logged)
    log_stage_seconds(cfg, run_id, clock.lap("gate"))
    report_decision(cfg, snapshot, teacher, evaluation, decision, run_id)
    name, alias = cfg.tracking.student_name, cfg.tracking.champion_alias
    verdict = (f"PROMOTED as {name} v{decision.version} (@{alias})" if decision.passed
               else f"REJECTED ({name}@{alias} unchanged)")
    print("\n" + evaluation.table + "\n\ngate:\n  " + "\n  ".join(decision.reasons) + f"\n\n{verdict}")
    return RunResult(command="distill", snapshot=snapshot, teacher=teacher, outputs=outputs, run_id=run_id, best=best,
                     baseline=baseline, evaluation=evaluation, decision=decision)
