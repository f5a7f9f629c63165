"""What a window of the champion's production traffic says against its training data and its promotion (pure:
scikit-learn and scipy tests, no I/O).

- Input drift: a domain classifier (TF-IDF word and character n-grams, logistic regression) told to separate the
  reference texts from the window's; its cross-validated ROC AUC is compared with the same classifier's on shuffled
  origins (scikit-learn's ``permutation_test_score``), the approach of Evidently's text-drift test. Drift needs both a
  significant p-value and an AUC over a floor (a large window makes a negligible difference significant). Beside it,
  text length (two-sample Kolmogorov-Smirnov) and the share of word pieces the champion's vocabulary does not know.
- Output drift: the distribution of predicted labels (Jensen-Shannon distance), the mean confidence and the
  abstention rate against those measured on the test split at promotion.
- Disagreement with the teacher: the share of a sample of the window on which the champion and its teacher agree,
  against the agreement measured on test at promotion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp


@dataclass(frozen=True)
class TextDrift:
    auc: float  # cross-validated ROC AUC of the domain classifier (0.5: the window reads like the reference)
    p_value: float  # of that AUC under shuffled origins
    reference_texts: int
    window_texts: int


def text_drift(reference: list[str], window: list[str], seed: int = 0, permutations: int = 50,
               max_texts: int = 2000) -> TextDrift:
    """Can a classifier tell the window's texts from the reference's? Each side sampled to at most ``max_texts``
    (seeded), balanced to the smaller one."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from sklearn.pipeline import make_pipeline, make_union

    rng = np.random.default_rng(seed)
    n = min(len(reference), len(window), max_texts)
    if n < 10:
        raise ValueError(f"text drift needs at least 10 texts on each side; the window has {len(window)}, the "
                         f"reference {len(reference)}")
    ref = [reference[i] for i in rng.choice(len(reference), n, replace=False)]
    cur = [window[i] for i in rng.choice(len(window), n, replace=False)]
    texts, origin = ref + cur, np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
    features = make_union(TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 4), min_df=2, sublinear_tf=True))
    classifier = make_pipeline(features, LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    auc, _, p_value = permutation_test_score(classifier, np.asarray(texts, dtype=object), origin, scoring="roc_auc",
                                             cv=cv, n_permutations=permutations, random_state=seed)
    return TextDrift(auc=float(auc), p_value=float(p_value), reference_texts=n, window_texts=n)


def length_shift(reference: list[str], window: list[str]) -> tuple[float, float]:
    """(KS statistic, p-value) of the texts' word counts."""
    result = ks_2samp([len(t.split()) for t in reference], [len(t.split()) for t in window])
    return float(result.statistic), float(result.pvalue)


def unknown_share(token_ids: list[list[int]], unknown_id: int | None) -> float:
    """The share of word pieces that are the tokenizer's unknown token (0 when it has none)."""
    total = sum(len(ids) for ids in token_ids)
    if unknown_id is None or total == 0:
        return 0.0
    return float(sum(ids.count(unknown_id) for ids in token_ids) / total)


def label_distance(reference: np.ndarray, window: np.ndarray, classes: int) -> float:
    """Jensen-Shannon distance (base 2: 0 the same, 1 disjoint) between two sets of predicted label ids."""
    p = np.bincount(np.asarray(reference, dtype=int), minlength=classes) + 1e-9
    q = np.bincount(np.asarray(window, dtype=int), minlength=classes) + 1e-9
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


@dataclass(frozen=True)
class Thresholds:
    """When a window counts as drifted (the monitor flow that will read them from the config is not written yet)."""

    text_p_value: float = 0.01
    text_auc: float = 0.6
    length_ks: float = 0.2
    unknown_share_increase: float = 0.02
    label_distance: float = 0.2
    confidence_drop: float = 0.1
    abstention_increase: float = 0.1
    agreement_drop: float = 0.05


@dataclass
class DriftReport:
    """Each measurement of a window beside its bar, and the reasons it crossed any."""

    measured: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "drifted": self.drifted}


def judge_window(measured: dict[str, float], baseline: dict[str, float], t: Thresholds) -> DriftReport:
    """Compare a window's ``measured`` figures (``text_auc``, ``text_p_value``, ``length_ks``, ``unknown_share``,
    ``label_distance``, ``mean_confidence``, ``abstention_rate``, optionally ``teacher_agreement``) with the
    champion's ``baseline`` at promotion (``unknown_share``, ``mean_confidence``, ``abstention_rate``,
    ``teacher_agreement`` on test)."""
    report = DriftReport(measured=dict(measured))
    m, b = measured, baseline
    if m["text_p_value"] <= t.text_p_value and m["text_auc"] >= t.text_auc:
        report.reasons.append(f"input drift: a classifier tells the window from the training texts with ROC AUC "
                              f"{m['text_auc']:.3f} (p = {m['text_p_value']:.3g}; bar {t.text_auc})")
    if m["length_ks"] >= t.length_ks:
        report.reasons.append(f"text length shifted: KS {m['length_ks']:.3f} (bar {t.length_ks})")
    if m["unknown_share"] - b.get("unknown_share", 0.0) >= t.unknown_share_increase:
        report.reasons.append(f"unknown word pieces {m['unknown_share']:.3f} against {b.get('unknown_share', 0.0):.3f}"
                              f" on test (bar +{t.unknown_share_increase})")
    if m["label_distance"] >= t.label_distance:
        report.reasons.append(f"predicted labels shifted: Jensen-Shannon distance {m['label_distance']:.3f} (bar "
                              f"{t.label_distance})")
    if b["mean_confidence"] - m["mean_confidence"] >= t.confidence_drop:
        report.reasons.append(f"mean confidence {m['mean_confidence']:.3f} against {b['mean_confidence']:.3f} on test "
                              f"(bar -{t.confidence_drop})")
    if m["abstention_rate"] - b["abstention_rate"] >= t.abstention_increase:
        report.reasons.append(f"abstention rate {m['abstention_rate']:.3f} against {b['abstention_rate']:.3f} on test "
                              f"(bar +{t.abstention_increase})")
    if "teacher_agreement" in m and b.get("teacher_agreement") is not None:
        if b["teacher_agreement"] - m["teacher_agreement"] >= t.agreement_drop:
            report.reasons.append(f"agreement with the teacher {m['teacher_agreement']:.3f} against "
                                  f"{b['teacher_agreement']:.3f} on test (bar -{t.agreement_drop})")
    return report
