"""Drift measurements of a production window (pure): the domain classifier, length, unknown pieces, labels, and
the judgement against the champion's state at promotion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import make_frames


def texts_of(frame) -> list[str]:  # noqa: ANN001 - a fixture DataFrame
    return frame["text"].tolist()


def shifted(n: int) -> list[str]:
    """Texts of another domain (a home assistant's), none of the fixture's words."""
    rng = np.random.default_rng(3)
    verbs, things = ["play", "turn up", "set", "dim", "stop", "skip"], ["the jazz playlist", "the kitchen lights",
                                                                          "an alarm for seven", "the next song",
                                                                          "the living room heating", "the podcast"]
    return [f"{rng.choice(verbs)} {rng.choice(things)} please" for _ in range(n)]


def test_a_window_like_the_training_texts_shows_no_text_drift_and_another_domain_does():
    from distillery.models.monitoring import text_drift

    train, _ = make_frames(train_per_label=40, test_per_label=10)
    texts = texts_of(train.sample(frac=1.0, random_state=0))  # one distribution, split at random
    same = text_drift(texts[:80], texts[80:], seed=0, permutations=30)
    assert same.auc < 0.6 and same.p_value > 0.05, same
    other = text_drift(texts[:80], shifted(60), seed=0, permutations=30)
    assert other.auc > 0.9 and other.p_value <= 1 / 31 + 1e-9, other
    with pytest.raises(ValueError, match="at least 10 texts"):
        text_drift(texts_of(train), ["just one"], seed=0)


def test_length_unknown_pieces_and_label_distance_by_hand():
    from distillery.models.monitoring import label_distance, length_shift, unknown_share

    assert length_shift(["a b", "c d"], ["a b", "c d"])[0] == 0.0
    assert length_shift(["a"] * 20, ["a b c d e f"] * 20)[0] == 1.0
    assert unknown_share([[5, 1, 7], [1]], unknown_id=1) == 0.5 and unknown_share([[5]], None) == 0.0
    assert label_distance(["a", "b", "c"], ["c", "b", "a"]) == pytest.approx(0.0, abs=1e-6)
    assert label_distance(["a", "a"], ["b", "b"]) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < label_distance(["a", "b"], ["a", "a"]) < 1.0


def test_a_window_is_judged_against_the_state_at_promotion_with_every_reason():
    from distillery.config import MonitorThresholds as Thresholds
    from distillery.models.monitoring import judge_window

    baseline = {"unknown_share": 0.01, "mean_confidence": 0.9, "abstention_rate": 0.05, "teacher_agreement": 0.95}
    calm = {"text_auc": 0.55, "text_p_value": 0.3, "length_ks": 0.05, "unknown_share": 0.012, "label_distance": 0.05,
            "mean_confidence": 0.88, "abstention_rate": 0.06, "teacher_agreement": 0.94}
    assert not judge_window(calm, baseline, Thresholds()).drifted
    stormy = {**calm, "text_auc": 0.8, "text_p_value": 0.001, "mean_confidence": 0.6, "teacher_agreement": 0.7}
    report = judge_window(stormy, baseline, Thresholds())
    assert report.drifted and len(report.reasons) == 3
    assert [r.split(":")[0].split(" ")[0] for r in report.reasons] == ["input", "mean", "agreement"]
    # significant but small: a large window's negligible difference is no alarm
    assert not judge_window({**calm, "text_p_value": 0.001, "text_auc": 0.55}, baseline, Thresholds()).drifted
    assert report.to_dict()["drifted"] is True


def write_log(folder, texts: list[str], model: str = "student/1", texts_kept: str = "text") -> None:  # noqa: ANN001
    """A real prediction log: what the loader's PredictionLog writes for these answers."""
    import pandas as pd

    from distillery.integrations.served_model import PredictionLog

    log = PredictionLog(str(folder), model=model, texts=texts_kept, flush_s=3600)
    log.record(texts, pd.DataFrame({"label": ["a"] * len(texts), "confidence": [0.9] * len(texts),
                                    "top_k": [[{"label": "a", "probability": 0.9}]] * len(texts),
                                    "abstained": [False] * len(texts)}))
    log.close()
    assert log.written == len(texts)


def test_a_window_of_the_prediction_log_and_what_it_cannot_give(tmp_path):
    import datetime as dt

    from distillery.integrations.prediction_log import PredictionLogError, read_window, window_texts

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=1)
    with pytest.raises(PredictionLogError, match="no prediction log at"):
        read_window(str(tmp_path / "none"), start, end)
    write_log(tmp_path / "log", ["first text", "second text"])
    write_log(tmp_path / "log", ["from another version"], model="student/2")
    window = read_window(str(tmp_path / "log"), start, end, model="student/1")
    assert window["text"].tolist() == ["first text", "second text"] and window["top_k"][0][0]["label"] == "a"
    assert len(read_window(str(tmp_path / "log"), start, end)) == 3
    with pytest.raises(PredictionLogError, match="none of student/9"):
        read_window(str(tmp_path / "log"), start, end, model="student/9")
    with pytest.raises(PredictionLogError, match="no rows from"):
        read_window(str(tmp_path / "log"), start - dt.timedelta(days=3), start - dt.timedelta(days=2))
    write_log(tmp_path / "private", ["a secret"], texts_kept="digest")
    with pytest.raises(PredictionLogError, match="only text digests"):
        window_texts(read_window(str(tmp_path / "private"), start, end))
    day = next((tmp_path / "log").glob("date=*"))
    (day / "part-broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PredictionLogError, match="part-broken.parquet is not readable parquet"):
        read_window(str(tmp_path / "log"), start, end)


def test_production_texts_merge_without_held_out_texts_or_repeats_newest_kept():
    from distillery.models.data import merge_production, read_production, row_id

    empty = read_production(Path("/nonexistent"))
    kept, counts = merge_production(empty, ["a b", "c d", "a b", "test text", " "],
                                    ["2026-12-01T00:00:01", "2026-12-01T00:00:02", "2026-12-01T00:00:03",
                                     "2026-12-01T00:00:04", "2026-12-01T00:00:05"], held_out=["Test text"], cap=10)
    assert sorted(kept["text"]) == ["a b", "c d"] and counts == {"offered": 3, "held_out": 1, "added": 2, "kept": 2}
    assert kept.loc[kept["text"] == "a b", "logged_at"].item() == "2026-12-01T00:00:03"  # the newest sighting
    assert kept["id"].tolist() == sorted(kept["id"]) and kept["id"].tolist() == sorted(map(row_id, ["a b", "c d"]))
    more, counts = merge_production(kept, ["e f", "g h"], ["2026-12-02T00:00:00", "2026-12-02T00:00:01"], [], cap=3)
    assert sorted(more["text"]) == ["a b", "e f", "g h"] and counts["added"] == 2 and counts["kept"] == 3


def test_the_production_hold_out_is_a_stable_share_of_the_texts():
    """About the configured share, decided by each text alone: a text keeps its side however the set grows."""
    from distillery.models.data import in_production_holdout, row_id

    ids = pd.Series([row_id(f"text number {i}") for i in range(4000)])
    held = in_production_holdout(ids, 0.2)
    assert 0.17 < held.mean() < 0.23
    assert (in_production_holdout(ids[:100], 0.2) == held[:100]).all()  # the same texts in a smaller set
    assert not in_production_holdout(ids, 0.0).any()
    assert (held <= in_production_holdout(ids, 0.5)).all()  # a larger share only adds texts


def test_label_noise_grows_as_the_window_shrinks_and_the_report_reads_offline(tmp_path):
    from distillery.config import MonitorThresholds
    from distillery.models.monitoring import DriftReport, label_distance_noise, write_drift_report

    reference = [f"label{i % 40}" for i in range(4000)]
    assert label_distance_noise(reference, 50) > label_distance_noise(reference, 2000) > 0
    report = DriftReport(measured={"text_auc": 0.9, "mean_confidence": 0.5}, reasons=["input drift: <b>x</b>"])
    data = {"labels": ["a", "b"], "lengths": [3, 4], "confidences": [0.9, 0.8]}
    page = write_drift_report(tmp_path, report, {"mean_confidence": 0.9}, MonitorThresholds(), data, data, "t")
    html = page.read_text()
    assert "DRIFT" in html and "&lt;b&gt;x&lt;/b&gt;" in html and html.count("data:image/png;base64,") == 3
    assert "http" not in html.split("<body>")[1]  # nothing fetched: readable offline
    assert {p.name for p in tmp_path.iterdir()} == {"drift.json", "labels.png", "lengths.png", "confidence.png",
                                                   "drift_report.html"}
