"""Calibration and abstention (pure numpy/scipy): temperature scaling, a confidence threshold chosen on validation
for a target, out-of-scope metrics, and held-out intents for data that has no out-of-scope class.

An input is *out of scope* when it belongs to none of the known intents. The detector is the calibrated top-1
probability: below the threshold the model abstains (answers the out-of-scope label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from distillery.config import EvaluationConfig
from distillery.models.metrics import softmax

TARGETS = ("max_accuracy_cost", "oos_recall", "max_inscope_rejection")
SCORES = ("confidence", "energy")


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on in-scope rows."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("temperature scaling needs at least one labelled row")
    result = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def in_scope_score(logits: np.ndarray, temperature: float, score: str = "confidence") -> np.ndarray:
    """How in-scope each row looks (higher: more); the model abstains below a threshold on it.

    ``confidence``: the calibrated top-1 probability. ``energy``: the negative free energy
    ``T * logsumexp(logits / T)`` (Liu et al. 2020), which keeps the logits' scale that softmax throws away.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if score == "confidence":
        return calibrated(logits, temperature).max(axis=1)
    if score == "energy":
        return temperature * logsumexp(logits / temperature, axis=1) if len(logits) else np.zeros(0)
    raise ValueError(f"unknown abstention score {score!r}: one of {SCORES}")


def choose_threshold(confidence: np.ndarray, is_oos: np.ndarray | None, target: str, value: float,
                     correct: np.ndarray | None = None) -> float:
    """The abstention threshold (abstain when confidence < threshold) chosen on validation.

    ``max_accuracy_cost``: the largest threshold at which abstaining costs at most ``value`` of in-scope accuracy
    (correct in-scope answers turned into abstentions, as a share of in-scope rows; needs ``correct``, no
    out-of-scope rows); ``oos_recall``: the smallest threshold that rejects at least ``value`` of the out-of-scope
    rows (so it costs the least in-scope coverage); ``max_inscope_rejection``: the largest threshold that rejects at
    most ``value`` of the in-scope rows (needs no out-of-scope rows).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown threshold target {target!r}: one of {TARGETS}")
    confidence = np.asarray(confidence, dtype=np.float64)
    is_oos = np.zeros(len(confidence), bool) if is_oos is None else np.asarray(is_oos, bool)
    if target == "max_accuracy_cost":
        if correct is None:
            raise ValueError("target max_accuracy_cost needs which in-scope answers are correct")
        right = np.sort(confidence[~is_oos & np.asarray(correct, bool)])
        k = int(np.floor(value * int((~is_oos).sum()) + 1e-9))  # at most k correct answers fall below the threshold
        return float(right[k]) if k < len(right) else float(np.nextafter(right[-1], np.inf)) if len(right) else 0.0
    if target == "oos_recall":
        oos = np.sort(confidence[is_oos])
        if len(oos) == 0:
            raise ValueError("target oos_recall needs out-of-scope rows in the validation split")
        k = int(np.ceil(value * len(oos)))  # reject the k least confident out-of-scope rows
        return float(np.nextafter(oos[k - 1], np.inf)) if k > 0 else 0.0
    inscope = np.sort(confidence[~is_oos])
    k = int(np.floor(value * len(inscope)))  # at most k in-scope rows fall below the threshold
    return float(inscope[k]) if k < len(inscope) else float(np.nextafter(inscope[-1], np.inf))


@dataclass(frozen=True)
class OosMetrics:
    """In-scope accuracy counts an abstention as an error; recall/precision are of the abstentions as out-of-scope."""

    inscope_accuracy: float
    inscope_accuracy_no_abstention: float
    recall: float
    precision: float
    auroc: float
    abstention_rate: float

    def to_dict(self, prefix: str = "oos.") -> dict[str, float]:
        """The finite values, keyed ``oos.recall``, ``oos.auroc``, ... (NaN: not measurable without OOS rows)."""
        return {f"{prefix}{k}": v for k, v in self.__dict__.items() if np.isfinite(v)}


def accuracy_cost(metrics: dict) -> float:
    """In-scope accuracy that abstaining gave up, from logged ``oos.*`` metrics (``OosMetrics.to_dict``)."""
    return metrics["oos.inscope_accuracy_no_abstention"] - metrics["oos.inscope_accuracy"]


def tradeoff_curve(probs: np.ndarray, labels: np.ndarray, is_oos: np.ndarray, score: np.ndarray | None = None,
                   points: int = 101) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, in-scope accuracy, OOS recall) as the abstention threshold moves over the score's range."""
    score = np.asarray(probs).max(axis=1) if score is None else np.asarray(score, dtype=np.float64)
    thresholds = np.unique(np.quantile(score, np.linspace(0, 1, points)))
    rows = [oos_metrics(probs, labels, is_oos, t, score) for t in thresholds]
    return thresholds, np.array([r.inscope_accuracy for r in rows]), np.array([r.recall for r in rows])


def oos_metrics(probs: np.ndarray, labels: np.ndarray, is_oos: np.ndarray, threshold: float,
                score: np.ndarray | None = None) -> OosMetrics:
    """Out-of-scope behaviour at ``threshold`` on ``score`` (default: the top-1 of the calibrated ``probs``); labels
    of OOS rows are ignored."""
    probs, is_oos = np.asarray(probs), np.asarray(is_oos, bool)
    confidence = probs.max(axis=1) if score is None else np.asarray(score, dtype=np.float64)
    predicted = probs.argmax(axis=1)
    abstain = confidence < threshold
    inscope = ~is_oos
    correct = (predicted == np.asarray(labels)) & inscope
    n_in, n_oos, n_abstain = int(inscope.sum()), int(is_oos.sum()), int(abstain.sum())
    both = n_in > 0 and n_oos > 0
    return OosMetrics(
        inscope_accuracy=float((correct & ~abstain).sum() / n_in) if n_in else float("nan"),
        inscope_accuracy_no_abstention=float(correct.sum() / n_in) if n_in else float("nan"),
        recall=float((abstain & is_oos).sum() / n_oos) if n_oos else float("nan"),
        precision=float((abstain & is_oos).sum() / n_abstain) if n_abstain else float("nan"),
        auroc=float(roc_auc_score(is_oos, -confidence)) if both else float("nan"),
        abstention_rate=float(abstain.mean()) if len(abstain) else float("nan"),
    )


def abstention(val_logits: np.ndarray, val_labels: np.ndarray, val_oos_logits: np.ndarray, test_logits: np.ndarray,
               test_labels: np.ndarray, test_oos_logits: np.ndarray, temperature: float, target: str,
               value: float, score: str = "confidence") -> tuple[float, OosMetrics, tuple]:
    """Choose the abstention threshold on ``score`` on validation (in-scope + out-of-scope rows) and measure it on
    test: (threshold, test metrics, (test probabilities, labels, is-OOS, scores) for the trade-off curve)."""

    def stack(inscope: np.ndarray, labels: np.ndarray, oos: np.ndarray):
        logits = np.concatenate([inscope, oos.reshape(-1, inscope.shape[1])])
        gold = np.concatenate([np.asarray(labels, dtype=np.int64), np.full(len(oos), -1)])
        return calibrated(logits, temperature), gold, gold < 0, in_scope_score(logits, temperature, score)

    probs, gold, is_oos, scores = stack(val_logits, val_labels, val_oos_logits)
    threshold = choose_threshold(scores, is_oos, target, value, probs.argmax(1) == gold)
    test = stack(test_logits, test_labels, test_oos_logits)
    return threshold, oos_metrics(*test[:3], threshold, test[3]), test


def served_calibration(e: EvaluationConfig, oos_label: str | None, metrics: dict) -> dict | None:
    """What the registered model applies to its confidences, from what the harness fitted on validation: the
    calibration temperature, and the abstention threshold with the label it answers below it (``oos_label``, else
    ``evaluation.oos_label``)."""
    calibration = {k: metrics[k] for k in ("calibration_temperature",) if k in metrics}
    if "abstain_threshold" in metrics:
        calibration.update(abstain_below=metrics["abstain_threshold"], abstain_score=e.abstain_score,
                           oos_label=oos_label or e.oos_label)
    return calibration or None
