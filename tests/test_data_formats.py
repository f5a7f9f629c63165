"""Data in the formats people have: CSV/TSV, parquet, JSON lines, one table with or without a split column, and a
Hugging Face `datasets` folder written by `save_to_disk`; path and format errors in one line, before any server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from distillery.models.data import DataError, check_data, locate_source, read_source, read_texts, split_snapshot
from tests.helpers import LABELS, make_frames, run_command, write_config

TRAIN, TEST = make_frames()


def _renamed(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns={"text": "utterance", "category": "intent"})


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _split_files(root: Path, suffix: str) -> Path:
    _write(_renamed(TRAIN), root / f"train{suffix}")
    _write(_renamed(TEST), root / f"test{suffix}")
    return root


def _single(root: Path, suffix: str, with_split: bool) -> Path:
    both = pd.concat([TRAIN.assign(split="train"), TEST.assign(split="test")], ignore_index=True)
    return _write(_renamed(both if with_split else both.drop(columns="split")), root / f"all{suffix}")


def _hf(root: Path, class_label: bool) -> Path:
    import datasets

    def one(df: pd.DataFrame) -> datasets.Dataset:
        features = datasets.Features({"utterance": datasets.Value("string"),
                                      "intent": datasets.ClassLabel(names=LABELS) if class_label
                                      else datasets.Value("string")})
        data = {"utterance": list(df["text"]),
                "intent": [LABELS.index(x) for x in df["category"]] if class_label else list(df["category"])}
        return datasets.Dataset.from_dict(data, features=features)

    datasets.DatasetDict({"train": one(TRAIN), "test": one(TEST)}).save_to_disk(str(root / "hf"))
    return root / "hf"


LAYOUTS = {
    "csv folder": lambda r: _split_files(r, ".csv"),
    "tsv folder": lambda r: _split_files(r, ".tsv"),
    "parquet folder": lambda r: _split_files(r, ".parquet"),
    "jsonl folder": lambda r: _split_files(r, ".jsonl"),
    "one csv with a split column": lambda r: _single(r, ".csv", True),
    "one jsonl with a split column": lambda r: _single(r, ".jsonl", True),
    "hf datasets, ClassLabel": lambda r: _hf(r, True),
    "hf datasets, string labels": lambda r: _hf(r, False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_rows(tmp_path, layout):
    source = LAYOUTS[layout](tmp_path)
    raw = read_source(source, text_column="utterance", label_column="intent")
    assert raw.labels == LABELS  # inferred (sorted, or the ClassLabel names): no categories.json anywhere
    assert sorted(raw.train["text"]) == sorted(TRAIN["text"]) and sorted(raw.test["text"]) == sorted(TEST["text"])
    assert dict(zip(raw.train["text"], raw.train["label"])) == dict(zip(TRAIN["text"], TRAIN["category"]))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_without_split_column_gets_a_carved_stratified_test_split(tmp_path, suffix):
    source = _single(tmp_path, suffix, with_split=False)
    raw = read_source(source, "utterance", "intent", test_fraction=0.2, seed=5)
    assert len(raw.test) == round(0.2 * (len(TRAIN) + len(TEST)))
    assert raw.test["label"].value_counts().to_dict() == {label: 10 for label in LABELS}
    assert not set(raw.test["text"]) & set(raw.train["text"])
    shuffled = _write(_renamed(pd.concat([TRAIN, TEST]).sample(frac=1.0, random_state=3)), tmp_path / "b" / f"x{suffix}")
    again = read_source(shuffled, "utterance", "intent", test_fraction=0.2, seed=5)
    assert sorted(again.test["text"]) == sorted(raw.test["text"])  # row order does not change the carve


def test_a_given_validation_split_is_used_and_kept_apart_from_train(tmp_path):
    root = _split_files(tmp_path, ".csv")
    validation = TRAIN.groupby("category").head(5)
    _write(_renamed(validation), root / "validation.csv")  # also still in train: leaks, dropped from train
    raw = read_source(root, "utterance", "intent")
    cleaned, report = check_data(raw, max_drop_fraction=0.2)
    assert report.dropped["train"] == {"leaks_into_validation": len(validation)}
    splits = split_snapshot(cleaned, raw.labels, 0.1, seed=1)
    assert sorted(splits["validation"]["text"]) == sorted(validation["text"])
    assert not set(splits["validation"]["text"]) & set(splits["train"]["text"])


@pytest.mark.parametrize("make, message", [
    (lambda r: r / "nowhere", r"data source .*nowhere not found \(data.source\)"),
    (lambda r: _write(TRAIN, r / "data.xlsx"), r"unknown data format '.xlsx'"),
    (lambda r: (_write(TRAIN, r / "d" / "a.csv"), _write(TRAIN, r / "d" / "b.csv"))[0].parent,
     r"holds 2 data files \['a.csv', 'b.csv'\]"),
    (lambda r: _write(TEST, r / "e" / "test.csv").parent, r"has \['test'\] files but no train file"),
    (lambda r: _write(TRAIN.assign(split="holdout"), r / "s.csv"), r"column 'split' has value\(s\) \['holdout'\]"),
    (lambda r: (r / "broken.jsonl").write_text('{"text": "a", "category"\n') and r / "broken.jsonl",
     r"broken.jsonl is not a readable JSON lines file"),
    # a file whose content is another format than its suffix is named as what it is
    (lambda r: _renamed_file(_write(TRAIN, r / "t.parquet"), "all.csv"), r"all.csv is named .csv but holds a parquet"),
    (lambda r: _renamed_file(_write(TRAIN, r / "t.jsonl"), "all.csv"), r"all.csv is named .csv but holds a JSON lines"),
    (lambda r: _renamed_file(_write(TRAIN, r / "t.csv"), "all.parquet"),
     r"all.parquet is named .parquet but is not parquet: it looks like plain text"),
])
def test_format_and_path_errors_are_one_clear_line(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        read_source(make(tmp_path))
    assert "\n" not in str(info.value)


def _renamed_file(path: Path, name: str) -> Path:
    return path.rename(path.with_name(name))


def test_predict_says_in_one_line_that_a_file_is_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 card arrival\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        read_texts(tmp_path / "latin1.txt")
    write_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "distillery", "predict", "latin1.txt"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "is not UTF-8 text" in out.stderr


def test_wrong_column_names_are_found_from_the_header(tmp_path):
    source = _split_files(tmp_path, ".parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text', 'category'\]; found \['utterance', 'intent'\]"):
        locate_source(source)


def test_cli_reports_a_bad_source_before_any_server_starts(tmp_path):
    write_config(tmp_path, data={"source": "missing.parquet"})
    out = subprocess.run([sys.executable, "-m", "distillery", "ingest"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    assert "DataError: data source" in out.stderr and "missing.parquet not found" in out.stderr
    assert "temporary server" not in out.stderr + out.stdout  # Prefect never started


def test_ingest_reads_a_single_parquet_file_with_custom_columns(tmp_path, prefect_harness):
    """The whole ingest flow (checks, snapshot, DVC) on a one-file parquet source without a split column."""
    _single(tmp_path, ".parquet", with_split=False)
    config = write_config(tmp_path, data={"source": "all.parquet", "text_column": "utterance",
                                          "label_column": "intent", "validation_fraction": 0.2})
    result = run_command(config, "ingest")
    snapshot = Path(result.snapshot.path)
    assert json.loads((snapshot / "labels.json").read_text()) == LABELS
    sizes = {s: len(pd.read_parquet(snapshot / f"{s}.parquet")) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == len(TRAIN) + len(TEST) and sizes["test"] == 20


def test_predict_reads_texts_from_tables_plain_files_and_stdin(tmp_path):
    _write(_renamed(TEST), tmp_path / "in.parquet")
    assert read_texts(tmp_path / "in.parquet", "utterance") == list(TEST["text"])
    (tmp_path / "in.txt").write_text("first text\n\n  second text \n")
    assert read_texts(tmp_path / "in.txt") == ["first text", "second text"]
    assert read_texts(None, stdin_text="a\nb\n") == ["a", "b"]
    with pytest.raises(DataError, match=r"no 'text' column \(found \['utterance', 'intent'\]\): pass --column"):
        read_texts(tmp_path / "in.parquet")
