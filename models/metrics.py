"""Classification metrics on numpy arrays: accuracy, macro-F1, per-class F1, calibration, agreement."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of (rows, classes) logits, computed in float64 for stability."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of a (rows, classes) probability matrix."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def per_class_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 of each class (0 where a class is neither predicted nor present)."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    f1 = np.zeros(num_classes)
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        denom = 2 * tp + fp + fn
        f1[c] = 2 * tp / denom if denom else 0.0
    return f1


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-weighted gap between confidence and accuracy over equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (mean confidence, accuracy, share of rows) for a reliability diagram; NaN for empty bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    mean_conf, acc, share = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            mean_conf[i], acc[i], share[i] = conf[in_bin].mean(), correct[in_bin].mean(), in_bin.mean()
    return mean_conf, acc, share


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    reference_pred: np.ndarray | None = None,
    bins: int = 15,
) -> dict:
    """Accuracy, macro-F1, ECE, per-class F1 and (with ``reference_pred``, e.g. the teacher's) agreement."""
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    labels = np.asarray(labels)
    f1 = per_class_f1(pred, labels, num_classes)
    present = np.isin(np.arange(num_classes), labels) | np.isin(np.arange(num_classes), pred)
    out = {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "ece": expected_calibration_error(probs, labels, bins),
        "per_class_f1": f1,
    }
    if reference_pred is not None:
        out["agreement"] = float((pred == np.asarray(reference_pred)).mean())
    return out


def label_agreement(predicted: list[str], teacher_logits: np.ndarray, labels: list[str]) -> float:
    """The share of texts on which a model's top label (``predicted``, by name: the model's label set may be
    another snapshot's) is the teacher's (``teacher_logits`` over ``labels``)."""
    teacher = [labels[int(i)] for i in np.asarray(teacher_logits).argmax(1)]
    return float(np.mean([a == b for a, b in zip(predicted, teacher)])) if teacher else float("nan")
