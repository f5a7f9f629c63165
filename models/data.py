"""Reading, checking and splitting in-domain text classification data (pure pandas, no I/O side effects)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SNAPSHOT_COLUMNS = ["id", "text", "label", "label_id"]


class DataError(ValueError):
    """The input data cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class RawData:
    """Source data as read: train and test frames with `text`/`label` columns and the ordered label set."""

    train: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]


@dataclass
class CheckReport:
    """What the checks dropped, per reason and split, so a run can report it."""

    input_rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, split: str, reason: str, texts: list[str]) -> None:
        if not texts:
            return
        self.dropped.setdefault(split, {})
        self.dropped[split][reason] = self.dropped[split].get(reason, 0) + len(texts)
        key = f"{split}:{reason}"
        self.examples.setdefault(key, [])
        self.examples[key].extend(texts[: max(0, 3 - len(self.examples[key]))])

    @property
    def total_dropped(self) -> int:
        return sum(n for per in self.dropped.values() for n in per.values())

    def to_dict(self) -> dict:
        return {"input_rows": self.input_rows, "dropped": self.dropped, "examples": self.examples}


def normalise_text(text: str) -> str:
    """The key used to find duplicates and leaks: case- and whitespace-insensitive."""
    return " ".join(str(text).lower().split())


def row_id(text: str) -> str:
    """A stable row id derived from the text, so outputs join back to the snapshot across re-ingests."""
    return hashlib.sha1(normalise_text(text).encode()).hexdigest()[:16]


def read_source(source: Path, text_column: str = "text", label_column: str = "category") -> RawData:
    """Read ``train.csv`` and ``test.csv`` (and ``categories.json`` when present) from a source folder."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"data source {source} is not a folder: set data.source to a folder with train.csv and test.csv")
    frames = {}
    for split in ("train", "test"):
        file = source / f"{split}.csv"
        if not file.is_file():
            raise DataError(f"data source {source} has no {split}.csv")
        try:
            df = pd.read_csv(file, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{file} is not a readable CSV file: {exc}") from None
        missing = [c for c in (text_column, label_column) if c not in df.columns]
        if missing:
            raise DataError(
                f"{file} is missing column(s) {missing}; found {list(df.columns)}. "
                f"Set data.text_column / data.label_column to the right names."
            )
        frames[split] = df[[text_column, label_column]].rename(columns={text_column: "text", label_column: "label"})
    categories = source / "categories.json"
    if categories.is_file():
        try:
            labels = json.loads(categories.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{categories} is not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
            raise DataError(f"{categories} must be a JSON list of distinct label names")
    else:
        labels = sorted(set(frames["train"]["label"]) - {""})
        logger.info("no categories.json in %s: using the %d labels seen in train.csv", source, len(labels))
    return RawData(train=frames["train"], test=frames["test"], labels=list(labels))


def check_data(raw: RawData, max_drop_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, CheckReport]:
    """Drop and report bad rows; fail with a DataError when the damage is larger than ``max_drop_fraction``.

    Checks: empty texts, labels outside the known set, duplicate texts within a split (conflicting labels
    included), and train texts that also occur in test (leakage; the train copy is dropped).
    """
    if len(raw.labels) < 2:
        raise DataError(f"need at least 2 labels, found {len(raw.labels)}")
    report = CheckReport()
    known = set(raw.labels)
    cleaned = {}
    for split, df in (("train", raw.train), ("test", raw.test)):
        report.input_rows[split] = len(df)
        if df.empty:
            raise DataError(f"the {split} split is empty")
        df = df.copy()
        df["text"] = df["text"].astype(str)
        empty = df["text"].str.strip() == ""
        report.drop(split, "empty_text", df.loc[empty, "text"].tolist())
        df = df[~empty]
        unknown = ~df["label"].isin(known)
        report.drop(split, "unknown_label", df.loc[unknown, "label"].astype(str).tolist())
        df = df[~unknown]
        key = df["text"].map(normalise_text)
        dup = key.duplicated(keep="first")
        report.drop(split, "duplicate_text", df.loc[dup, "text"].tolist())
        df = df[~dup]
        cleaned[split] = df
    test_keys = set(cleaned["test"]["text"].map(normalise_text))
    leak = cleaned["train"]["text"].map(normalise_text).isin(test_keys)
    report.drop("train", "leaks_into_test", cleaned["train"].loc[leak, "text"].tolist())
    cleaned["train"] = cleaned["train"][~leak]

    for split in ("train", "test"):
        n_in = report.input_rows[split]
        n_drop = sum(report.dropped.get(split, {}).values())
        if n_in and n_drop / n_in > max_drop_fraction:
            reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped[split].items())
            examples = "; ".join(f"{k}: {v[:2]}" for k, v in report.examples.items())
            raise DataError(
                f"{split}: {n_drop} of {n_in} rows ({n_drop / n_in:.1%}) fail the data checks ({reasons}), more than "
                f"data.max_drop_fraction={max_drop_fraction:.1%}. Fix the source data (e.g. {examples}) or raise the limit."
            )
    missing = sorted(known - set(cleaned["train"]["label"]))
    if missing:
        raise DataError(f"train has no rows for label(s) {missing[:10]}: every label needs training examples")
    if report.total_dropped:
        logger.warning("data checks dropped %d rows: %s", report.total_dropped, report.dropped)
    return cleaned["train"], cleaned["test"], report


def _finish(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    index = {name: i for i, name in enumerate(labels)}
    out = pd.DataFrame(
        {
            "id": df["text"].map(row_id).astype(str),
            "text": df["text"].astype(str),
            "label": df["label"].astype(str),
            "label_id": df["label"].map(index).astype("int64"),
        }
    )
    return out.sort_values("id", kind="stable").reset_index(drop=True)


def split_snapshot(
    train: pd.DataFrame,
    test: pd.DataFrame,
    labels: list[str],
    validation_fraction: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Carve a stratified, seeded validation split from train; the source test split stays the test split.

    Deterministic: the same input rows (in any order) give the same three frames.
    """
    train = _finish(train, labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label_id in sorted(train["label_id"].unique()):
        idx = train.index[train["label_id"] == label_id].to_numpy()
        n_val = int(round(len(idx) * validation_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val_parts.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=int)
    is_val = train.index.isin(val_idx)
    return {
        "train": train[~is_val].reset_index(drop=True),
        "validation": train[is_val].reset_index(drop=True),
        "test": _finish(test, labels),
    }


def write_snapshot(splits: dict[str, pd.DataFrame], labels: list[str], report: CheckReport, folder: Path) -> None:
    """Write the snapshot files (parquet per split, labels.json, checks.json) byte-for-byte deterministically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, df in splits.items():
        df[SNAPSHOT_COLUMNS].to_parquet(folder / f"{split}.parquet", index=False, engine="pyarrow", compression="zstd")
    (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (folder / "checks.json").write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n")


def read_snapshot(folder: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Read a snapshot written by ``write_snapshot``; a clear DataError when it is missing or incomplete."""
    folder = Path(folder)
    missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").is_file()]
    if missing or not (folder / "labels.json").is_file():
        raise DataError(f"no complete data snapshot in {folder} (missing {missing or ['labels.json']}): run `distillery ingest`")
    labels = json.loads((folder / "labels.json").read_text())
    return {s: pd.read_parquet(folder / f"{s}.parquet") for s in SPLITS}, labels


def read_transfer_set(path: Path) -> pd.DataFrame:
    """Extra unlabelled in-domain texts (CSV or parquet with a `text` column), de-duplicated, with row ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"transfer set {path} not found (data.transfer_set)")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    if "text" not in df.columns:
        raise DataError(f"transfer set {path} needs a `text` column; found {list(df.columns)}")
    texts = df["text"].astype(str)
    texts = texts[texts.str.strip() != ""]
    out = pd.DataFrame({"id": texts.map(row_id), "text": texts}).drop_duplicates("id")
    return out.sort_values("id", kind="stable").reset_index(drop=True)
