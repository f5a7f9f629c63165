"""Reading, checking and splitting in-domain text classification data (pure pandas, no I/O side effects)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from distillery.config import DataConfig
from distillery.errors import DistilleryError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
OOS_SPLITS = {"train": "oos_train", "validation": "oos_validation", "test": "oos_test"}
SCOPE_FILE = "scope.json"
# texts the champion was asked in production (``distillery monitor`` -> a re-distil on drift): unlabelled, part of
# the DVC-versioned snapshot, labelled by the teacher as transfer data (split ``production``)
PRODUCTION_FILE = "production.parquet"
# the part of them the gate judges on (``gate.production_holdout``): labelled by the teacher, never trained on
PRODUCTION_HOLDOUT = "production_holdout"
SNAPSHOT_COLUMNS = ["id", "text", "label", "label_id"]


class DataError(DistilleryError, ValueError):
    """The input data cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class RawData:
    """Source data as read: train and test (and, when the source has one, validation) frames with `text`/`label`
    columns, and the ordered label set."""

    train: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    validation: pd.DataFrame | None = None


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


SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}
TABLE_FORMATS = {".csv": "CSV", ".tsv": "TSV", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "JSON lines",
                 ".ndjson": "JSON lines", ".json": "JSON"}
HF_MARKERS = ("dataset_dict.json", "state.json")


@dataclass(frozen=True)
class SourceLayout:
    """Where the rows of a data source are: one table per split, one table with (or without) a split column, or a
    Hugging Face ``datasets`` folder. Found from names and headers alone, so path and format errors come first."""

    kind: str  # "split-files" | "single-table" | "hf-datasets"
    files: dict[str, Path]  # split -> file (split-files); {"all": file} (single-table); split -> folder (hf-datasets)
    columns: list[str]
    categories: Path | None = None

    def describe(self) -> str:
        parts = ", ".join(f"{k}={v.name}" for k, v in self.files.items())
        return f"{self.kind} ({parts})"


def _table_format(path: Path) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(TABLE_FORMATS)} files, a "
                        f"folder of them, or a Hugging Face datasets folder (save_to_disk)")
    return fmt


def sniff_format(head: bytes) -> str | None:
    """What a file's first bytes say it is, for the formats that say so: parquet, compressed or zipped files, JSON
    lines or records; None for plain text (CSV, TSV) or when the bytes do not tell."""
    if head.startswith(b"PAR1"):
        return "parquet"
    for magic, name in ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "zip archive (e.g. an Excel workbook)"),
                        (b"(\xb5/\xfd", "zstd-compressed"), (b"BZh", "bzip2-compressed"), (b"ARROW1", "Arrow")):
        if head.startswith(magic):
            return name
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "JSON"
    if first == b"{":
        return "JSON lines" if head.lstrip().split(b"\n", 1)[0].rstrip().endswith(b"}") else "JSON"
    return None


def read_table(path: Path, nrows: int | None = None) -> pd.DataFrame:
    """A CSV/TSV, parquet or JSON (lines or records) file as a frame; ``nrows`` reads only the head. A file whose
    content is another format than its suffix says is a DataError naming what it is."""
    path = Path(path)
    fmt = _table_format(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    with open(path, "rb") as fh:
        actual = sniff_format(fh.read(4096))
    expected = {"CSV": None, "TSV": None, "parquet": "parquet", "JSON lines": ("JSON lines", "JSON"),
                "JSON": ("JSON", "JSON lines")}[fmt]
    if actual is not None and actual not in (expected if isinstance(expected, tuple) else (expected,)):
        raise DataError(f"{path} is named {path.suffix} but holds a {actual} file: rename it to the suffix of its "
                        f"format ({', '.join(sorted(TABLE_FORMATS))})")
    if actual is None and fmt in ("parquet", "JSON lines", "JSON") and path.stat().st_size:
        raise DataError(f"{path} is named {path.suffix} but is not {fmt}: it looks like plain text (CSV/TSV?); "
                        f"rename it to the suffix of its format")
    try:
        if fmt in ("CSV", "TSV"):
            return pd.read_csv(path, dtype=str, keep_default_na=False, nrows=nrows, sep="\t" if fmt == "TSV" else ",")
        if fmt == "parquet":
            if nrows == 0:
                import pyarrow.parquet as pq

                return pd.DataFrame(columns=pq.read_schema(path).names)
            return pd.read_parquet(path)
        lines = fmt == "JSON lines" or path.read_bytes()[:1].strip() != b"["
        if not lines:
            return pd.read_json(path, dtype=False)
        head = None if nrows is None else max(nrows, 1)  # the columns of JSON lines come from a first row
        df = pd.read_json(path, lines=True, dtype=False, nrows=head)
        return df if nrows is None else df.head(nrows)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a readable {fmt} file: {first}") from None


def _hf_split_folders(folder: Path) -> dict[str, Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return {s: folder / s for s in splits}
    return {"all": folder}


def _hf_features(split_folder: Path) -> dict:
    info = split_folder / "dataset_info.json"
    return json.loads(info.read_text()).get("features", {}) if info.is_file() else {}


def read_hf_split(split_folder: Path) -> pd.DataFrame:
    """One split of a ``datasets`` ``save_to_disk`` folder (Arrow stream files), with ClassLabel ids as names."""
    import pyarrow as pa

    state = json.loads((split_folder / "state.json").read_text())
    tables = []
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(split_folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    if not tables:
        raise DataError(f"{split_folder} holds no data files (state.json lists none)")
    df = pa.concat_tables(tables).to_pandas()
    for name, feature in _hf_features(split_folder).items():
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and name in df.columns:
            names = feature.get("names") or []
            df[name] = [names[i] if isinstance(i, (int, np.integer)) and 0 <= i < len(names) else "" for i in df[name]]
    return df


def locate_source(source: Path, text_column: str = "text", label_column: str = "category",
                  split_column: str = "split") -> SourceLayout:
    """Find the data's layout and check its columns from headers only (no full read): fails in one line."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"data source {source} not found (data.source)")
    categories = None
    if source.is_dir():
        categories = source / "categories.json" if (source / "categories.json").is_file() else None
        if any((source / m).is_file() for m in HF_MARKERS):
            splits = _hf_split_folders(source)
            features = _hf_features(next(iter(splits.values())))
            if not features:
                raise DataError(f"{source}: Hugging Face datasets folder without dataset_info.json features")
            layout = SourceLayout("hf-datasets", splits, list(features), categories)
        else:
            tables = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in TABLE_FORMATS
                            and p.name != "categories.json")
            per_split: dict[str, Path] = {}
            for p in tables:
                split = SPLIT_ALIASES.get(p.stem.lower())
                if split:
                    if split in per_split:
                        raise DataError(f"{source} has two {split} files: {per_split[split].name} and {p.name}")
                    per_split[split] = p
            if per_split:
                if "train" not in per_split:
                    raise DataError(f"{source} has {sorted(per_split)} files but no train file (train.csv, "
                                    f"train.parquet, train.jsonl, ...)")
                layout = SourceLayout("split-files", per_split, list(read_table(per_split["train"], 0).columns),
                                      categories)
            elif len(tables) == 1:
                layout = SourceLayout("single-table", {"all": tables[0]}, list(read_table(tables[0], 0).columns),
                                      categories)
            else:
                raise DataError(f"data source {source} holds {len(tables) or 'no'} data files "
                                f"{[p.name for p in tables][:6]}: give train/test files (any of "
                                f"{sorted(TABLE_FORMATS)}), one file with a `{split_column}` column, or a Hugging "
                                f"Face datasets folder")
    else:
        layout = SourceLayout("single-table", {"all": source}, list(read_table(source, 0).columns))
    missing = [c for c in (text_column, label_column) if c not in layout.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {layout.columns}. Set data.text_column / "
                        f"data.label_column to the right names.")
    return layout


def _carve(df: pd.DataFrame, fraction: float, seed: int, by: str = "label") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``df`` into (rest, carved): a seeded ``fraction`` of each ``by`` class (>= 1 row of a class with >= 2).

    Rows are taken in text-id order first, so the same rows in any order give the same split.
    """
    rng = np.random.default_rng(seed)
    df = df.assign(_key=df["text"].map(row_id)).sort_values("_key", kind="stable").drop(columns="_key")
    carved = []
    for label in sorted(df[by].unique()):
        idx = df.index[df[by] == label].to_numpy()
        n = int(round(len(idx) * fraction))
        n = min(max(n, 1), len(idx) - 1) if len(idx) >= 2 else 0
        carved.append(rng.permutation(idx)[:n])
    picked = np.sort(np.concatenate(carved)) if carved else np.array([], dtype=int)
    is_carved = df.index.isin(picked)
    return df[~is_carved], df[is_carved]


def read_source(source: Path, text_column: str = "text", label_column: str = "category", split_column: str = "split",
                test_fraction: float = 0.1, seed: int = 13) -> RawData:
    """Read a data source in any supported layout into train/test (and validation when the source has one).

    A single table with a ``split_column`` is split by its values (train/test/validation and common aliases); one
    without it has its test split carved like validation (stratified, seeded, ``test_fraction``). The label list is
    ``categories.json`` when present, else the names of a ClassLabel feature, else the sorted labels of train.
    """
    layout = locate_source(source, text_column, label_column, split_column)
    if layout.kind == "hf-datasets":
        frames = {k: read_hf_split(v) for k, v in layout.files.items()}
    else:
        frames = {k: read_table(v) for k, v in layout.files.items()}
    if "all" in frames:
        whole = frames.pop("all")
        if split_column in whole.columns:
            split = whole[split_column].astype(str).str.strip().str.lower().map(SPLIT_ALIASES)
            unknown = sorted(set(whole.loc[split.isna(), split_column].astype(str)))
            if unknown:
                raise DataError(f"{source}: column {split_column!r} has value(s) {unknown[:5]}; expected train, test "
                                f"or validation")
            frames = {s: whole[split == s] for s in ("train", "test", "validation") if (split == s).any()}
        else:
            frames = {"train": whole}
    else:
        frames = {SPLIT_ALIASES.get(k.lower(), k): v for k, v in frames.items()}
    if "train" not in frames:
        raise DataError(f"{source} has no train split (found {sorted(frames)})")
    frames = {k: v[[text_column, label_column]].rename(columns={text_column: "text", label_column: "label"})
              .astype(str).reset_index(drop=True) for k, v in frames.items() if k in ("train", "test", "validation")}
    labels = _label_list(layout, frames["train"], source)
    if "test" not in frames:
        rest, carved = _carve(frames["train"][frames["train"]["label"].isin(labels)], test_fraction, seed + 1)
        unknown = frames["train"][~frames["train"]["label"].isin(labels)]  # kept so the checks report them
        frames["train"], frames["test"] = pd.concat([rest, unknown]), carved
        logger.info("%s has no test split: carved %d rows (data.test_fraction=%s)", source, len(carved), test_fraction)
    return RawData(train=frames["train"].reset_index(drop=True), test=frames["test"].reset_index(drop=True),
                   labels=labels, validation=frames["validation"].reset_index(drop=True)
                   if "validation" in frames else None)


def _label_list(layout: SourceLayout, train: pd.DataFrame, source: Path) -> list[str]:
    if layout.categories is not None:
        try:
            labels = json.loads(layout.categories.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{layout.categories} is not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
            raise DataError(f"{layout.categories} must be a JSON list of distinct label names")
        return labels
    if layout.kind == "hf-datasets":
        for name, feature in _hf_features(next(iter(layout.files.values()))).items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                return list(feature["names"])
    labels = sorted(set(train["label"]) - {""})
    logger.info("no categories.json for %s: using the %d labels seen in train", source, len(labels))
    return labels


def read_texts(path: Path | None, column: str = "text", stdin_text: str | None = None) -> list[str]:
    """Texts to predict: a table file's ``column``, or one text per line of a plain file (or of ``stdin_text``)."""
    if path is None or str(path) == "-":
        raw = stdin_text or ""
        return [line.strip() for line in raw.splitlines() if line.strip()]
    path = Path(path)
    if path.suffix.lower() in TABLE_FORMATS:
        df = read_table(path)
        if column not in df.columns:
            raise DataError(f"{path} has no {column!r} column (found {list(df.columns)}): pass --column NAME")
        return df[column].astype(str).tolist()
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`, or give a CSV/parquet/JSON lines file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_data(raw: RawData, max_drop_fraction: float,
               out_of_scope: frozenset[str] = frozenset()) -> tuple[dict[str, pd.DataFrame], CheckReport]:
    """Drop and report bad rows; fail with a DataError when the damage is larger than ``max_drop_fraction``.

    Checks: empty texts, labels outside the known set, duplicate texts within a split (conflicting labels
    included), and texts that occur in a later split (leakage: a train text also in validation or test loses its
    train copy; a validation text also in test loses its validation copy). Returns the cleaned splits by name.
    """
    if len(raw.labels) < 2:
        raise DataError(f"need at least 2 labels, found {len(raw.labels)}")
    report = CheckReport()
    known = set(raw.labels)
    cleaned = {}
    given = [("train", raw.train), ("test", raw.test)]
    if raw.validation is not None:
        given.append(("validation", raw.validation))
    for split, df in given:
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
    for split, later in (("train", "test"), ("train", "validation"), ("validation", "test")):
        if split not in cleaned or later not in cleaned:
            continue
        later_keys = set(cleaned[later]["text"].map(normalise_text))
        leak = cleaned[split]["text"].map(normalise_text).isin(later_keys)
        report.drop(split, f"leaks_into_{later}", cleaned[split].loc[leak, "text"].tolist())
        cleaned[split] = cleaned[split][~leak]

    for split in cleaned:
        n_in = report.input_rows[split]
        n_drop = sum(report.dropped.get(split, {}).values())
        if n_in and n_drop / n_in > max_drop_fraction:
            reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped[split].items())
            examples = "; ".join(f"{k}: {v[:2]}" for k, v in report.examples.items())
            raise DataError(
                f"{split}: {n_drop} of {n_in} rows ({n_drop / n_in:.1%}) fail the data checks ({reasons}), more than "
                f"data.max_drop_fraction={max_drop_fraction:.1%}. Fix the source data (e.g. {examples}) or raise the limit."
            )
    missing = sorted(known - set(out_of_scope) - set(cleaned["train"]["label"]))
    if missing:
        raise DataError(f"train has no rows for label(s) {missing[:10]}: every label needs training examples")
    if report.total_dropped:
        logger.warning("data checks dropped %d rows: %s", report.total_dropped, report.dropped)
    return cleaned, report


def _finish(df: pd.DataFrame, labels: list[str] | None) -> pd.DataFrame:
    """Snapshot rows sorted by id; ``labels=None``: out-of-scope rows, whose label belongs to no class (id -1)."""
    index = {name: i for i, name in enumerate(labels or [])}
    out = pd.DataFrame(
        {
            "id": df["text"].map(row_id).astype(str),
            "text": df["text"].astype(str),
            "label": df["label"].astype(str),
            "label_id": df["label"].map(index).astype("int64") if labels is not None else -1,
        }
    )
    return out.sort_values("id", kind="stable").reset_index(drop=True)


def split_snapshot(
    cleaned: dict[str, pd.DataFrame],
    labels: list[str],
    validation_fraction: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Carve a stratified, seeded validation split from train (unless the source has one); the source test split
    stays the test split.

    Deterministic: the same input rows (in any order) give the same three frames.
    """
    train = _finish(cleaned["train"], labels)
    test = cleaned["test"]
    if cleaned.get("validation") is not None:
        return {"train": train, "validation": _finish(cleaned["validation"], labels), "test": _finish(test, labels)}
    rest, validation = _carve(train, validation_fraction, seed, by="label_id")
    return {
        "train": rest.reset_index(drop=True),
        "validation": validation.reset_index(drop=True),
        "test": _finish(test, labels),
    }


@dataclass(frozen=True)
class Scope:
    """Which rows are out of scope: those labelled ``oos_label`` in the source, and those of ``held_out`` intents
    (chosen with ``seed``) that the models never train on and that count as out of scope at evaluation."""

    oos_label: str | None = None
    held_out: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def active(self) -> bool:
        return self.oos_label is not None or bool(self.held_out)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.held_out) | ({self.oos_label} if self.oos_label is not None else set())

    def to_dict(self) -> dict:
        return {"oos_label": self.oos_label, "held_out_intents": list(self.held_out), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Scope":
        return cls(d.get("oos_label"), tuple(d.get("held_out_intents") or ()), d.get("seed"))


def choose_scope(labels: list[str], oos_label: str | None, holdout_intents: int, seed: int) -> Scope:
    """The out-of-scope setting of a source whose label list is ``labels`` (``oos_label`` may be one of them)."""
    intents = [name for name in labels if name != oos_label]
    held = tuple(held_out_intents(intents, holdout_intents, seed)) if holdout_intents else ()
    return Scope(oos_label, held, seed if held else None)


def scoped(raw: RawData, scope: Scope) -> RawData:
    """``raw`` with the out-of-scope label added to its label set (so the checks keep those rows) and checked."""
    if scope.oos_label is None or scope.oos_label in raw.labels:
        labels = raw.labels
    else:
        labels = [*raw.labels, scope.oos_label]
    if scope.oos_label is not None:
        frames = [raw.train, raw.test] + ([raw.validation] if raw.validation is not None else [])
        if not any((df["label"] == scope.oos_label).any() for df in frames):
            raise DataError(f"data.oos_label={scope.oos_label!r} occurs in no split; labels seen: {labels[:8]}...")
    if len([name for name in labels if name not in scope.names]) < 2:
        raise DataError(f"out-of-scope settings leave fewer than 2 in-scope labels of {len(labels)}")
    return RawData(train=raw.train, test=raw.test, labels=labels, validation=raw.validation)


def split_out_of_scope(cleaned: dict[str, pd.DataFrame], scope: Scope, validation_fraction: float,
                       seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Separate the out-of-scope rows of checked splits: (in-scope splits, out-of-scope frames by OOS split name).

    Out-of-scope train rows give ``oos_validation`` the share validation gets (when the source has no validation
    split); the rest stay as ``oos_train`` only for rows labelled ``oos_label`` (the teacher's soft labels on them
    teach the student what "no intent" looks like). Held-out intents' train rows are dropped: the models never see
    them, which is the point of holding them out.
    """
    names = scope.names
    inscope = {k: df[~df["label"].isin(names)] for k, df in cleaned.items()}
    oos = {k: df[df["label"].isin(names)] for k, df in cleaned.items()}
    train = oos["train"]
    if cleaned.get("validation") is None:
        train, carved = _carve(train, validation_fraction, seed, by="label") if len(train) else (train, train)
        oos["validation"] = carved
    oos["train"] = train[train["label"] == scope.oos_label] if scope.oos_label is not None else train.iloc[:0]
    return inscope, {OOS_SPLITS[split]: _finish(df, None) for split, df in oos.items()}


def write_snapshot(splits: dict[str, pd.DataFrame], labels: list[str], report: CheckReport, folder: Path,
                   scope: Scope | None = None) -> None:
    """Write the snapshot files (parquet per split, labels.json, checks.json; with an out-of-scope setting also the
    ``oos_*`` splits and scope.json) byte-for-byte deterministically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, df in splits.items():
        df[SNAPSHOT_COLUMNS].to_parquet(folder / f"{split}.parquet", index=False, engine="pyarrow", compression="zstd")
    (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (folder / "checks.json").write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n")
    if scope is not None and scope.active:
        (folder / SCOPE_FILE).write_text(json.dumps(scope.to_dict(), indent=1) + "\n")


def held_out_intents(labels: list[str], count: int, seed: int) -> list[str]:
    """A seeded choice of ``count`` intents to hold out as unseen (out-of-scope at test time), in label order."""
    if not 0 < count < len(labels) - 1:
        raise ValueError(f"can hold out 1..{len(labels) - 2} of {len(labels)} intents, not {count}")
    picked = set(np.random.default_rng(seed).choice(len(labels), size=count, replace=False).tolist())
    return [name for i, name in enumerate(labels) if i in picked]


def read_out_of_scope(folder: Path) -> tuple[Scope, dict[str, pd.DataFrame]]:
    """The snapshot's out-of-scope setting and rows (``oos_train``/``oos_validation``/``oos_test``); an inactive
    setting and no frames for a snapshot without them."""
    folder = Path(folder)
    if not (folder / SCOPE_FILE).is_file():
        return Scope(), {}
    scope = Scope.from_dict(json.loads((folder / SCOPE_FILE).read_text()))
    return scope, {name: _read_frame(folder / f"{name}.parquet") for name in OOS_SPLITS.values()
                   if (folder / f"{name}.parquet").is_file()}


def read_snapshot(folder: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Read a snapshot written by ``write_snapshot``; a clear DataError when it is missing or incomplete."""
    folder = Path(folder)
    missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").is_file()]
    if missing or not (folder / "labels.json").is_file():
        raise DataError(f"no complete data snapshot in {folder} (missing {missing or ['labels.json']}): run `distillery ingest`")
    labels = json.loads((folder / "labels.json").read_text())
    return {s: _read_frame(folder / f"{s}.parquet") for s in SPLITS}, labels


def _read_frame(path: Path) -> pd.DataFrame:
    """A snapshot file, read once per process while its bytes stay the same (every task of a run reads the
    snapshot; a re-ingest writes new files, which are read afresh); each caller gets its own copy."""
    stat = path.stat()
    return _cached_frame(str(path), stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=16)
def _cached_frame(path: str, mtime_ns: int, size: int) -> pd.DataFrame:  # noqa: ARG001 - the stat is the key
    return pd.read_parquet(path)


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


def held_out_rows(folder: Path) -> pd.DataFrame:
    """The snapshot's rows no generated, transfer or production text may be: validation and test, in and out of
    scope."""
    splits, _ = read_snapshot(folder)
    _, oos = read_out_of_scope(folder)
    return pd.concat([splits["validation"], splits["test"],
                      *[oos[name] for name in ("oos_validation", "oos_test") if name in oos]])


def read_production(folder: Path) -> pd.DataFrame:
    """The snapshot's production texts (``id``, ``text``, ``logged_at``); empty when it has none."""
    path = Path(folder) / PRODUCTION_FILE
    if not path.is_file():
        return pd.DataFrame({"id": pd.Series(dtype=str), "text": pd.Series(dtype=str),
                             "logged_at": pd.Series(dtype=str)})
    return _read_frame(path)


def merge_production(existing: pd.DataFrame, texts: list[str], times: list[str], held_out: list[str],
                     cap: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """``existing`` production texts with newly logged ``texts`` (logged at ``times``, ISO) added: empty and repeated
    texts once (the newest sighting kept), never a validation or test text (``held_out``, by row id), and only the
    ``cap`` most recently logged. Returns the frame (sorted by id: its bytes depend only on its content) and counts."""
    new = pd.DataFrame({"text": [str(t) for t in texts], "logged_at": [str(t) for t in times]})
    new = new[new["text"].str.strip() != ""]
    new["id"] = new["text"].map(row_id)
    banned = {row_id(t) for t in held_out}
    offered = new["id"].nunique()
    new = new[~new["id"].isin(banned)]
    merged = pd.concat([existing[["id", "text", "logged_at"]], new[["id", "text", "logged_at"]]], ignore_index=True)
    merged = merged.sort_values(["logged_at", "id"], kind="stable").drop_duplicates("id", keep="last")
    kept = merged.tail(cap).sort_values("id", kind="stable").reset_index(drop=True)
    counts = {"offered": int(offered), "held_out": int(offered - new["id"].nunique()),
              "added": int(len(set(kept["id"]) - set(existing["id"]))), "kept": int(len(kept))}
    return kept, counts


def in_production_holdout(ids: pd.Series, share: float) -> np.ndarray:
    """Which production texts (by row id, a hex digest of the text) the gate holds out: the first 32 bits of the id
    below ``share`` of their range. A text keeps its side as the set grows, so a held-out text is never trained on
    by a later re-distillation either."""
    return np.array([int(i[:8], 16) < share * 16 ** 8 for i in ids], dtype=bool)


def write_production(frame: pd.DataFrame, folder: Path) -> None:
    frame[["id", "text", "logged_at"]].to_parquet(Path(folder) / PRODUCTION_FILE, index=False, engine="pyarrow",
                                                  compression="zstd")


@dataclass(frozen=True)
class PreparedData:
    """A source read, checked and split: the in-scope splits, the out-of-scope ones (``oos_*``), the labels, the
    check report and the out-of-scope setting."""

    splits: dict[str, pd.DataFrame]
    oos: dict[str, pd.DataFrame]
    labels: list[str]
    report: CheckReport
    scope: Scope

    @property
    def rows(self) -> dict[str, int]:
        return {name: len(df) for name, df in {**self.splits, **self.oos}.items()}


def prepare_data(source: Path, d: DataConfig) -> PreparedData:
    """Read ``source`` as ``data`` configures, choose the out-of-scope setting, drop and report bad rows (or fail
    above ``max_drop_fraction``), separate out-of-scope rows and split the rest (stratified, seeded)."""
    raw = read_source(source, d.text_column, d.label_column, d.split_column, d.test_fraction, d.seed)
    scope = choose_scope(raw.labels, d.oos_label, d.holdout_intents, d.seed)
    raw = scoped(raw, scope)
    cleaned, report = check_data(raw, d.max_drop_fraction, scope.names)
    labels = [name for name in raw.labels if name not in scope.names]
    oos: dict = {}
    if scope.active:
        cleaned, oos = split_out_of_scope(cleaned, scope, d.validation_fraction, d.seed)
    return PreparedData(split_snapshot(cleaned, labels, d.validation_fraction, d.seed), oos, labels, report, scope)
