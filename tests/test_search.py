"""The Optuna search: seeded trials within the configured ranges, each its own nested MLflow run, the best on
validation macro-F1 going on to evaluation."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from distillery.config import load_config
from distillery.models.selection import configured_trial, search_sampler, trial_candidate
from tests.helpers import run_command


def test_trials_stay_in_their_ranges_and_are_seeded(tmp_path: Path):
    import optuna

    (tmp_path / "distillery.yaml").write_text(
        "distill:\n  search:\n    trials: 4\n    temperature: [2.0, 3.0]\n    epochs: [2, 2]\n")
    distill = load_config(tmp_path / "distillery.yaml").distill

    def proposals(seed: int) -> list:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        return [trial_candidate(study.ask(), distill) for _ in range(4)]

    first = proposals(1)
    assert first == proposals(1) and first != proposals(2)
    for c in first:
        assert 2.0 <= c.temperature <= 3.0 and c.epochs == 2 and 0.3 <= c.kd_weight <= 1.0
        assert c.ce_weight == pytest.approx(1 - c.kd_weight, abs=1e-4) and 5e-5 <= c.learning_rate <= 5e-4
    assert [c.name for c in first] == ["trial-0", "trial-1", "trial-2", "trial-3"]


def test_trials_search_the_feature_weight_only_when_given_a_range(tmp_path: Path):
    import optuna

    (tmp_path / "distillery.yaml").write_text("distill:\n  feature_weight: 0.25\n  search:\n    trials: 3\n")
    fixed = load_config(tmp_path / "distillery.yaml").distill
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    assert {trial_candidate(study.ask(), fixed).feature_weight for _ in range(3)} == {0.25}
    searched = load_config(tmp_path / "distillery.yaml", {"distill.search.feature_weight": [0.0, 2.0]}).distill
    weights = [trial_candidate(study.ask(), searched).feature_weight for _ in range(5)]
    assert all(0.0 <= w <= 2.0 for w in weights) and len(set(weights)) == 5


def test_tpe_models_the_trials_after_the_startup_ones(tmp_path: Path):
    """With fewer trials than Optuna's 10 startup ones TPE never models anything: ``startup_trials`` says when it does."""
    import optuna

    (tmp_path / "distillery.yaml").write_text("distill:\n  search:\n    trials: 6\n")

    def proposals(startup: int) -> list:
        distill = load_config(tmp_path / "distillery.yaml", {"distill.search.startup_trials": startup}).distill
        study = optuna.create_study(direction="maximize", sampler=search_sampler(distill))
        made = []
        for _ in range(6):
            trial = study.ask()
            made.append(trial_candidate(trial, distill))
            study.tell(trial, made[-1].temperature)  # a score TPE can learn from: higher temperature is better
        return made

    random, modelled = proposals(10), proposals(3)
    assert random[:3] == modelled[:3]  # the same seeded random start
    assert random[3:] != modelled[3:]  # then TPE's own proposals
    assert load_config(tmp_path / "distillery.yaml").distill.search.startup_trials == 10
    with pytest.raises(Exception, match="startup_trials"):
        load_config(tmp_path / "distillery.yaml", {"distill.search.startup_trials": 0})


def test_the_configured_recipe_is_clamped_into_the_search_ranges(tmp_path: Path):
    import optuna

    (tmp_path / "distillery.yaml").write_text(
        "distill:\n  temperature: 4.0\n  kd_weight: 0.8\n  learning_rate: 2.0e-4\n  epochs: 12\n  feature_weight: 0.5\n"
        "  search:\n    trials: 4\n    temperature: [1.0, 3.0]\n")
    distill = load_config(tmp_path / "distillery.yaml").distill
    assert configured_trial(distill) == {"kd_weight": 0.8, "temperature": 3.0, "learning_rate": 2.0e-4, "epochs": 10}
    searched = load_config(tmp_path / "distillery.yaml", {"distill.search.feature_weight": [0.0, 0.25]}).distill
    assert configured_trial(searched)["feature_weight"] == 0.25
    study = optuna.create_study(direction="maximize", sampler=search_sampler(distill))
    study.enqueue_trial(configured_trial(distill))
    first = trial_candidate(study.ask(), distill)
    assert (first.temperature, first.kd_weight, first.ce_weight, first.learning_rate, first.epochs, first.trial) == (
        3.0, 0.8, 0.2, 2.0e-4, 10, 0)


def test_median_bars_follow_the_finished_trials():
    from distillery.models.selection import median_bars

    curves = [{1: 0.2, 2: 0.5, 3: 0.6}, {1: 0.4, 2: 0.7}, {1: 0.3, 2: 0.6, 3: 0.9, 4: 0.95}]
    assert median_bars(curves[:1], 4, startup=2, warmup=1) == ()  # too few finished trials: no pruning yet
    assert median_bars(curves, 4, startup=2, warmup=1) == (None, 0.6, 0.75, 0.95)
    assert median_bars(curves, 5, startup=1, warmup=0)[:2] == (0.3, 0.6) and median_bars(curves, 5, 1, 0)[4] is None


def test_search_through_the_flow_picks_the_best_trial(teacher_project: Path):
    result = run_command(teacher_project / "distillery.yaml", "distill", {
        "distill.search.trials": 3, "distill.search.parallel": 2, "distill.search.epochs": [2, 4],
        "distill.search.learning_rate": [1e-3, 5e-3]})
    client = mlflow.tracking.MlflowClient(f"sqlite:///{teacher_project / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}' and tags.candidate = 'distilled'")
    assert len(runs) == 3  # one nested run per trial
    scores = {r.data.params["candidate.trial"]: r.data.metrics["val_macro_f1"] for r in runs}
    for r in runs:
        assert 2 <= int(r.data.params["distill.epochs"]) <= 4 and r.data.metrics["best_epoch"] <= 4
        assert 1e-3 <= float(r.data.params["distill.learning_rate"]) <= 5e-3
    assert result.best.candidate.trial is not None
    assert result.best.val_macro_f1 == max(scores.values())
    # trial 0 is the configured recipe (T 2, kd 0.8, lr 3e-3), its 6 epochs clamped to the searched 2-4
    first = next(r for r in runs if r.data.params["candidate.trial"] == "0").data.params
    assert (float(first["candidate.temperature"]), float(first["candidate.kd_weight"]),
            float(first["distill.learning_rate"]), first["distill.epochs"]) == (2.0, 0.8, 3e-3, "4")
    params = client.get_run(result.run_id).data.params
    assert params["search.trials"] == "3" and float(client.get_run(result.run_id).data.metrics[
        "search.best_val_macro_f1"]) == pytest.approx(max(scores.values()))
    assert result.evaluation is not None and result.decision is not None


def test_search_prunes_trials_below_the_median_of_finished_ones(teacher_project: Path):
    """One trial at a time, pruning from the first finished trial on: each trial trained against the median of the
    curves of the trials finished before it, and stopped exactly where it fell below."""
    import numpy as np

    result = run_command(teacher_project / "distillery.yaml", "distill", {
        "distill.search.trials": 4, "distill.search.parallel": 1, "distill.search.epochs": [3, 3],
        "distill.search.learning_rate": [1e-4, 5e-3], "distill.search.prune_startup": 1,
        "distill.search.prune_warmup": 0, "distill.patience": 10, "tracking.student_name": "student-search"})
    client = mlflow.tracking.MlflowClient(f"sqlite:///{teacher_project / 'mlflow.db'}")
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}' and tags.candidate = 'distilled'")
    runs = sorted(runs, key=lambda r: int(r.data.params["candidate.trial"]))
    finished: list[dict] = []
    pruned = 0
    for run in runs:
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "curve.val_macro_f1")}
        bars = [float(np.median([c[e] for c in finished if e in c])) if finished else None for e in (1, 2, 3)]
        below = next((e for e in (1, 2) if bars[e - 1] is not None and curve[e] < bars[e - 1]), None)
        expected_stop = below or 3
        assert max(curve) == expected_stop, (curve, bars)
        assert run.data.metrics["pruned"] == float(below is not None)
        pruned += below is not None
        if below is None:
            finished.append(curve)
    assert pruned >= 1  # these seeded trials (learning rates 1e-4 to 5e-3) do not all keep up
    assert client.get_run(result.run_id).data.params["search.pruned"] == str(pruned)
    assert not result.best.pruned
