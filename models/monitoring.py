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
from pathlib import Path

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from distillery.config import MonitorThresholds


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


def label_distance(reference: list[str], window: list[str]) -> float:
    """Jensen-Shannon distance (base 2: 0 the same, 1 disjoint) between two sets of predicted label names."""
    names = sorted(set(reference) | set(window))
    index = {n: i for i, n in enumerate(names)}
    p = np.bincount([index[n] for n in reference], minlength=len(names)) + 1e-9
    q = np.bincount([index[n] for n in window], minlength=len(names)) + 1e-9
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def label_distance_noise(reference: list[str], n: int, seed: int = 0, draws: int = 50) -> float:
    """The 95th percentile of ``label_distance`` between ``reference`` and samples of ``n`` of its own labels: what
    a window of ``n`` texts from the same traffic shows by chance (with 77 labels, 200 texts are far from 0)."""
    rng = np.random.default_rng(seed)
    ref = np.asarray(reference, dtype=object)
    return float(np.quantile([label_distance(reference, list(rng.choice(ref, n, replace=True)))
                              for _ in range(draws)], 0.95))


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


def judge_window(measured: dict[str, float], baseline: dict[str, float], t: MonitorThresholds) -> DriftReport:
    """Compare a window's ``measured`` figures (``text_auc``, ``text_p_value``, ``length_ks``, ``unknown_share``,
    ``label_distance``, ``mean_confidence``, ``abstention_rate``, optionally ``length_p_value``,
    ``label_distance_noise`` and ``teacher_agreement``) with the champion's ``baseline`` (``unknown_share``,
    ``mean_confidence``, ``abstention_rate`` on test, ``teacher_agreement`` on test at promotion). A text-length or
    label shift counts when it is beyond chance too (its p-value under ``text_p_value``, the label distance over
    the noise of a window this size)."""
    report = DriftReport(measured=dict(measured))
    m, b = measured, baseline
    if m["text_p_value"] <= t.text_p_value and m["text_auc"] >= t.text_auc:
        report.reasons.append(f"input drift: a classifier tells the window from the training texts with ROC AUC "
                              f"{m['text_auc']:.3f} (p = {m['text_p_value']:.3g}; bar {t.text_auc})")
    if m["length_ks"] >= t.length_ks and m.get("length_p_value", 0.0) <= t.text_p_value:
        report.reasons.append(f"text length shifted: KS {m['length_ks']:.3f} (bar {t.length_ks})")
    if m["unknown_share"] - b.get("unknown_share", 0.0) >= t.unknown_share_increase:
        report.reasons.append(f"unknown word pieces {m['unknown_share']:.3f} against {b.get('unknown_share', 0.0):.3f}"
                              f" on test (bar +{t.unknown_share_increase})")
    excess = m["label_distance"] - m.get("label_distance_noise", 0.0)
    if excess >= t.label_distance:
        report.reasons.append(f"predicted labels shifted: Jensen-Shannon distance {m['label_distance']:.3f} against "
                              f"the test split's, {excess:.3f} over what a window this size shows by chance (bar "
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


def write_drift_report(folder: Path, report: DriftReport, baseline: dict[str, float], thresholds: MonitorThresholds,
                       window: dict, reference: dict, title: str) -> Path:
    """The drift report in ``folder``: ``drift.json``, three plots (predicted labels, text length, confidence; window
    against the test split) and ``drift_report.html``, one self-contained page (plots inlined) readable offline.
    ``window`` and ``reference`` hold ``labels``, ``lengths`` and ``confidences`` (lists)."""
    import base64
    import html
    import json

    from distillery.models.report import plot_drift

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "drift.json").write_text(json.dumps({**report.to_dict(), "baseline": baseline,
                                                   "thresholds": thresholds.model_dump()}, indent=1, sort_keys=True))
    plots = plot_drift(window, reference, folder)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td><td>{baseline[k]:.4g}</td></tr>"
                   if isinstance(baseline.get(k), (int, float)) else
                   f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td><td></td></tr>"
                   for k, v in report.measured.items())
    bars = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in thresholds.model_dump().items())
    verdict = "DRIFT" if report.drifted else "no drift"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.reasons) or "<li>every measure within its bar</li>"
    images = "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in plots)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
            ".drift{color:#b00}.calm{color:#070}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2 class='{'drift' if report.drifted else 'calm'}'>{verdict}</h2>"
            f"<ul>{reasons}</ul><h3>Measured (window) and at promotion (test split)</h3>"
            f"<table><tr><th>measure</th><th>window</th><th>baseline</th></tr>{rows}</table>"
            f"<h3>Bars (monitor.thresholds)</h3><table>{bars}</table>{images}</body></html>")
    out = folder / "drift_report.html"
    out.write_text(page)
    return out
