"""Data checks on small broken fixtures: each damage is dropped and reported, or fails with a clear error."""

from __future__ import annotations

import pandas as pd
import pytest

from distillery.models.data import DataError, check_data, read_source, row_id, split_snapshot, write_snapshot, read_snapshot
from tests.helpers import LABELS, make_frames, write_source


def _raw(tmp_path, train=None, test=None, labels=None):
    return read_source(write_source(tmp_path / "src", train, test, labels))


def _pair(checked):
    cleaned, report = checked
    return (cleaned["train"], cleaned["test"]), report


def test_clean_data_passes_untouched(tmp_path):
    raw = _raw(tmp_path)
    (train, test), report = _pair(check_data(raw, max_drop_fraction=0.0))
    assert len(train) == len(raw.train) and len(test) == len(raw.test)
    assert report.total_dropped == 0


def test_missing_column_is_a_clear_error(tmp_path):
    train, test = make_frames()
    with pytest.raises(DataError, match=r"missing column\(s\) \['category'\].*data.label_column"):
        _raw(tmp_path, train.rename(columns={"category": "intent"}), test)


def test_missing_train_file_is_a_clear_error(tmp_path):
    folder = write_source(tmp_path / "src")
    (folder / "train.csv").unlink()
    with pytest.raises(DataError, match=r"\['test'\] files but no train file"):
        read_source(folder)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda df: df.assign(text=df["text"].where(df.index != 3, "   ")), "empty_text"),
        (lambda df: df.assign(category=df["category"].where(df.index != 5, "mortgage")), "unknown_label"),
        (lambda df: pd.concat([df, df.iloc[[0]].assign(text=df["text"].iloc[0].upper() + "  ")]), "duplicate_text"),
    ],
)
def test_a_little_damage_is_dropped_and_reported(tmp_path, damage, reason):
    train, test = make_frames()
    raw = _raw(tmp_path, damage(train.copy()), test)
    (cleaned, _), report = _pair(check_data(raw, max_drop_fraction=0.05))
    assert report.dropped["train"] == {reason: 1}
    assert len(cleaned) == len(make_frames()[0]) - (0 if reason == "duplicate_text" else 1)


def test_leaked_test_texts_are_dropped_from_train(tmp_path):
    train, test = make_frames()
    leaky = pd.concat([train, test.iloc[:2]], ignore_index=True)
    (cleaned, kept_test), report = _pair(check_data(_raw(tmp_path, leaky, test), max_drop_fraction=0.05))
    assert report.dropped["train"] == {"leaks_into_test": 2}
    assert not set(cleaned["text"]) & set(kept_test["text"])


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda df: df.assign(text=""), "empty_text"),
        (lambda df: df.assign(category="mortgage"), "unknown_label"),
        (lambda df: pd.concat([df] * 2), "duplicate_text"),
    ],
)
def test_large_damage_fails_with_reasons(tmp_path, damage, words):
    train, test = make_frames()
    with pytest.raises(DataError, match=f"fail the data checks.*{words}.*max_drop_fraction"):
        check_data(_raw(tmp_path, damage(train.copy()), test), max_drop_fraction=0.05)


def test_large_leakage_fails(tmp_path):
    train, test = make_frames()
    with pytest.raises(DataError, match="leaks_into_test"):
        check_data(_raw(tmp_path, pd.concat([train, test]), test), max_drop_fraction=0.05)


def test_label_without_training_rows_fails(tmp_path):
    train, test = make_frames()
    raw = _raw(tmp_path, train[train["category"] != "top_up"], test)
    with pytest.raises(DataError, match="no rows for label"):
        check_data(raw, max_drop_fraction=0.5)


def test_split_is_stratified_deterministic_and_order_free(tmp_path):
    raw = _raw(tmp_path)
    (train, test), _ = _pair(check_data(raw, 0.0))
    a = split_snapshot({"train": train, "test": test}, LABELS, 0.25, seed=1)
    b = split_snapshot({"train": train.sample(frac=1.0, random_state=7), "test": test}, LABELS, 0.25, seed=1)
    for split in a:
        pd.testing.assert_frame_equal(a[split], b[split])
    assert a["validation"]["label"].value_counts().to_dict() == {label: 10 for label in LABELS}
    assert not set(a["validation"]["id"]) & set(a["train"]["id"])
    assert list(a["train"]["id"]) == [row_id(t) for t in a["train"]["text"]]


def test_snapshot_files_are_byte_identical_on_rewrite(tmp_path):
    raw = _raw(tmp_path)
    cleaned, report = check_data(raw, 0.0)
    splits = split_snapshot(cleaned, LABELS, 0.2, seed=3)
    write_snapshot(splits, LABELS, report, tmp_path / "a")
    write_snapshot(splits, LABELS, report, tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    frames, labels = read_snapshot(tmp_path / "a")
    assert labels == LABELS and len(frames["test"]) == len(cleaned["test"])


def test_a_snapshot_is_read_once_until_its_files_change(tmp_path):
    from distillery.models.data import _cached_frame

    cleaned, report = check_data(_raw(tmp_path), 0.0)
    splits = split_snapshot(cleaned, LABELS, 0.2, seed=3)
    write_snapshot(splits, LABELS, report, tmp_path / "s")
    first, _ = read_snapshot(tmp_path / "s")
    first["train"].loc[:, "text"] = "changed by a caller"  # each caller has its own copy
    misses = _cached_frame.cache_info().misses
    again, _ = read_snapshot(tmp_path / "s")
    assert _cached_frame.cache_info().misses == misses  # every split came from memory
    assert again["train"]["text"].tolist() == splits["train"]["text"].tolist()
    write_snapshot(split_snapshot(cleaned, LABELS, 0.3, seed=4), LABELS, report, tmp_path / "s")  # re-ingested
    fresh, _ = read_snapshot(tmp_path / "s")
    assert _cached_frame.cache_info().misses > misses and len(fresh["validation"]) != len(again["validation"])


def test_missing_snapshot_tells_to_ingest(tmp_path):
    with pytest.raises(DataError, match="distillery ingest"):
        read_snapshot(tmp_path)
