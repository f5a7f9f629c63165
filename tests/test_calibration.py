"""Calibration and abstention building blocks on synthetic data (issue 15's pure layer)."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.models.metrics import expected_calibration_error, softmax
from distillery.models.data import held_out_intents
from distillery.models.calibration import (
    abstention,
    calibrated,
    choose_threshold,
    fit_temperature,
    in_scope_score,
    oos_metrics,
)


def ece_before_after(logits: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[float, float]:
    """ECE of the raw and of the temperature-scaled probabilities."""
    return (expected_calibration_error(softmax(np.asarray(logits, dtype=np.float64)), labels),
            expected_calibration_error(calibrated(logits, temperature), labels))


def _overconfident(n: int = 4000, classes: int = 5, seed: int = 0):
    """Overconfident logits: x ~ N(0, 1) + 1.5 on the true class has the Bayes posterior softmax(1.5 x), so logits
    4 x are calibrated at T = 4 / 1.5."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), labels] += 1.5
    return logits * 4.0, labels


def test_temperature_scaling_lowers_ece_on_a_miscalibrated_set():
    logits, labels = _overconfident()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4 / 1.5, rel=0.05)
    before, after = ece_before_after(logits, labels, temperature)
    assert after < before / 3 and after < 0.03
    # a scaled model keeps its argmax: accuracy is unchanged
    assert (calibrated(logits, temperature).argmax(1) == logits.argmax(1)).all()


def test_threshold_meets_its_target_on_validation():
    rng = np.random.default_rng(1)
    confidence = np.concatenate([rng.beta(8, 2, 900), rng.beta(2, 3, 100)])  # in-scope high, OOS low
    is_oos = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    thr = choose_threshold(confidence, is_oos, "oos_recall", 0.6)
    assert (confidence[is_oos] < thr).mean() >= 0.6
    assert (confidence[is_oos] < np.nextafter(thr, 0) - 1e-9).mean() < 0.6 + 1e-9  # the smallest such threshold
    thr = choose_threshold(confidence, is_oos, "max_inscope_rejection", 0.01)
    assert (confidence[~is_oos] < thr).mean() <= 0.01
    with pytest.raises(ValueError, match="needs out-of-scope rows"):
        choose_threshold(confidence[~is_oos], None, "oos_recall", 0.6)
    # max_accuracy_cost: the highest threshold that turns at most 1% of in-scope rows from right to abstained
    correct = np.r_[rng.random(900) < 0.9, np.zeros(100, bool)]
    thr = choose_threshold(confidence, is_oos, "max_accuracy_cost", 0.01, correct)
    lost = (confidence < thr) & correct & ~is_oos
    assert lost.sum() <= 9
    assert ((confidence <= thr) & correct & ~is_oos).sum() > 9  # any higher threshold would lose one more
    assert (confidence[is_oos] < thr).mean() > 0.5  # and on this separable set it still catches most OOS rows
    with pytest.raises(ValueError, match="needs which in-scope answers"):
        choose_threshold(confidence, is_oos, "max_accuracy_cost", 0.01)


def test_oos_metrics_count_abstentions():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    is_oos = np.array([False, False, True, False])
    m = oos_metrics(probs, labels, is_oos, threshold=0.58)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.inscope_accuracy == pytest.approx(1.0) and m.abstention_rate == 0.25
    m = oos_metrics(probs, labels, is_oos, threshold=0.7)  # now the in-scope 0.6 row is rejected too
    assert m.inscope_accuracy == pytest.approx(2 / 3) and m.precision == 0.5
    assert m.auroc == pytest.approx(1.0)


def test_held_out_intents_are_seeded_and_in_label_order():
    labels = [f"intent_{i:02d}" for i in range(77)]
    a, b = held_out_intents(labels, 10, seed=3), held_out_intents(labels, 10, seed=3)
    assert a == b and len(set(a)) == 10 and a == sorted(a)
    assert held_out_intents(labels, 10, seed=4) != a
    with pytest.raises(ValueError):
        held_out_intents(labels[:3], 2, seed=0)


@pytest.mark.parametrize("score", ["confidence", "energy"])
def test_abstention_without_out_of_scope_rows_costs_at_most_its_target(score):
    """`evaluation.abstain: on` on data without out-of-scope rows: a threshold from in-scope validation alone, no
    recall/AUROC (nothing to measure them on), an abstention rate on test; for either score."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 600)
    logits = rng.normal(0, 1, (600, 4))
    logits[np.arange(600), labels] += 2.5
    none = np.zeros((0, 4))
    threshold, m, (probs, gold, is_oos, scores) = abstention(
        logits[:300], labels[:300], none, logits[300:], labels[300:], none, 1.3, "max_accuracy_cost", 0.02, score)
    assert not is_oos.any() and len(probs) == len(scores) == 300
    np.testing.assert_allclose(scores, in_scope_score(logits[300:], 1.3, score))
    val = in_scope_score(logits[:300], 1.3, score)
    assert ((val < threshold) & (logits[:300].argmax(1) == labels[:300])).mean() <= 0.02
    d = m.to_dict()
    assert "oos.recall" not in d and "oos.auroc" not in d and 0 < d["oos.abstention_rate"] < 1
    assert d["oos.inscope_accuracy"] < d["oos.inscope_accuracy_no_abstention"]


def test_energy_score_sees_the_scale_softmax_drops():
    """Two rows with the same softmax, one with every logit 10 higher: equal confidence, energy 10 higher."""
    a, b = np.array([[1.0, 0.0, -1.0]]), np.array([[11.0, 10.0, 9.0]])  # same softmax, logits shifted by 10
    assert in_scope_score(a, 1.0) == pytest.approx(in_scope_score(b, 1.0))
    assert in_scope_score(b, 1.0, "energy")[0] == pytest.approx(in_scope_score(a, 1.0, "energy")[0] + 10)
    with pytest.raises(ValueError, match="unknown abstention score"):
        in_scope_score(a, 1.0, "margin")
