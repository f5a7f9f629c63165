"""Pure decisions about candidates: the sweep grid and which trained candidate goes on to evaluation."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from distillery.config import DistillConfig
from distillery.records import Candidate, TrainedStudent


def sweep_grid(distill: DistillConfig) -> list[Candidate]:
    """temperature x kd_weight (ce_weight = 1 - kd_weight when kd_weight is swept) x feature_weight; one candidate
    without a sweep."""
    temperatures = distill.sweep.temperature or (distill.temperature,)
    weights = [(w, 1.0 - w) for w in distill.sweep.kd_weight] or [(distill.kd_weight, distill.ce_weight)]
    features = distill.sweep.feature_weight or (distill.feature_weight,)
    return [Candidate(kind="distilled", temperature=t, kd_weight=kd, ce_weight=ce, feature_weight=f)
            for t in temperatures for kd, ce in weights for f in features]


def pick_best(candidates: Sequence[TrainedStudent]) -> TrainedStudent:
    """The candidate with the best validation macro-F1 (accuracy breaks ties; the first of equals wins); pruned
    search trials only when nothing else finished."""
    if not candidates:
        raise ValueError("no trained candidates to choose from")
    candidates = [c for c in candidates if not c.pruned] or list(candidates)  # a pruned trial never finished
    return max(candidates, key=lambda c: (c.val_macro_f1, c.val_accuracy))


def median_bars(curves: Sequence[Mapping[int, float]], epochs: int, startup: int, warmup: int) -> tuple:
    """Optuna's median rule as data a trial can take anywhere (a thread or a Dask worker): for each epoch, the median
    validation score the finished trials had after it; ``None`` during the first ``warmup`` epochs, and no bars at
    all until ``startup`` trials have finished."""
    if len(curves) < max(startup, 1):
        return ()
    bars = []
    for epoch in range(1, epochs + 1):
        values = [c[epoch] for c in curves if epoch in c]
        bars.append(float(np.median(values)) if epoch > warmup and values else None)
    return tuple(bars)


def search_sampler(distill: DistillConfig):  # noqa: ANN201 - an optuna.samplers.TPESampler
    """The search's seeded TPE sampler: ``search.startup_trials`` random trials first, then TPE's proposals."""
    import optuna

    q = distill.search
    return optuna.samplers.TPESampler(seed=distill.seed if q.seed is None else q.seed,
                                      n_startup_trials=q.startup_trials)


def configured_trial(distill: DistillConfig) -> dict[str, float]:
    """The configured recipe as a trial's params (for ``study.enqueue_trial``), each clamped to its search range."""
    q = distill.search

    def clamp(value: float, bounds: tuple) -> float:
        return min(max(value, bounds[0]), bounds[1])

    params = {"kd_weight": clamp(distill.kd_weight, q.kd_weight), "temperature": clamp(distill.temperature,
              q.temperature), "learning_rate": clamp(distill.learning_rate, q.learning_rate),
              "epochs": int(clamp(distill.epochs, q.epochs))}
    if q.feature_weight is not None:
        params["feature_weight"] = clamp(distill.feature_weight, q.feature_weight)
    return params


def trial_candidate(trial, distill: DistillConfig) -> Candidate:  # noqa: ANN001 - an optuna.Trial
    """The recipe an Optuna trial proposes within ``distill.search``'s ranges (ce_weight = 1 - kd_weight; the
    feature-KD weight too when ``search.feature_weight`` is a range)."""
    q = distill.search
    kd = round(trial.suggest_float("kd_weight", *q.kd_weight), 4)
    temperature = round(trial.suggest_float("temperature", *q.temperature, log=True), 4)
    feature = (round(trial.suggest_float("feature_weight", *q.feature_weight), 4) if q.feature_weight is not None
               else distill.feature_weight)
    return Candidate(kind="distilled", temperature=temperature,
                     kd_weight=kd, ce_weight=round(1.0 - kd, 4), feature_weight=feature,
                     learning_rate=float(f"{trial.suggest_float('learning_rate', *q.learning_rate, log=True):.3g}"),
                     epochs=trial.suggest_int("epochs", *q.epochs), trial=trial.number)
