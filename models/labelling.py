"""Teacher soft labels: batched inference over texts and the outputs table that the GX suite checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.models.metrics import entropy, per_class_f1, softmax
from distillery.models.training import encode, predict_logits, predict_pooled

# a cache entry of teacher outputs: its files
OUTPUTS_FILE = "outputs.parquet"
META_FILE = "meta.json"
FEATURES_FILE = "pooled-features.npz"  # the teacher's sentence features, beside the soft labels they go with
DIGESTS_FILE = "text-digests.npz"  # a digest of each row's exact text, in row order: lets other row sets reuse them

# 2: each row carries its text (what the students train on); 3: and whether the teacher answered it (a black box may
# not, or name a label outside the set: such a row is uniform and no student learns from it). Part of the cache key
OUTPUTS_FORMAT = 3


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges that cover ``rows`` in at most ``shards`` near-equal parts."""
    shards = max(1, min(shards, rows)) if rows else 1
    edges = np.linspace(0, rows, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def text_digests(texts: list[str]) -> np.ndarray:
    """A digest of each exact text (the teacher's logits depend on nothing else, for one teacher and max_length):
    what lets a new set of rows reuse the logits an earlier one already has, without storing the texts."""
    return np.asarray([hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts], dtype="<U32")


def merge_logits(digests: np.ndarray, fresh: list[np.ndarray], found: dict[str, np.ndarray],
                 classes: int) -> np.ndarray:
    """(rows, classes) logits in row order: a row whose text digest is in ``found`` takes those logits, the others
    take the rows of the ``fresh`` blocks in turn (labelled now, in row order; never joined into one more array)."""
    logits = np.zeros((len(digests), classes), dtype=np.float32)
    missing = np.asarray([n for n, d in enumerate(digests.tolist()) if d not in found], dtype=np.int64)
    labelled = sum(len(b) for b in fresh)
    if len(missing) != labelled:
        raise ValueError(f"{labelled} fresh logits for {len(missing)} rows without earlier ones")
    start = 0
    for block in fresh:
        logits[missing[start:start + len(block)]] = block
        start += len(block)
    for n, d in enumerate(digests.tolist()):
        if d in found:
            logits[n] = found[d]
    return logits


def teacher_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                   max_length: int, batch_size: int, progress: bool = True, desc: str = "label") -> np.ndarray:
    """(rows, classes) float32 logits of the teacher, batched under ``torch.inference_mode``."""
    data = encode(tokenizer, texts, max_length)
    return predict_logits(model, data, tokenizer.pad_token_id, batch_size=batch_size, progress=progress, desc=desc)


def teacher_pooled(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                   max_length: int, batch_size: int, progress: bool = True, desc: str = "features") -> np.ndarray:
    """(rows, hidden) float32 sentence features of the teacher: its mean-pooled last hidden state per text."""
    data = encode(tokenizer, texts, max_length)
    return predict_pooled(model, data, tokenizer.pad_token_id, batch_size=batch_size, progress=progress, desc=desc)


# rows per parquet row group: the outputs are written and summarised a chunk at a time, so labelling a million
# texts never holds a second copy of all logits, nor a Python object per row and class
WRITE_CHUNK_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Teacher outputs in memory: one row per labelled text in ``frame`` (id, text, split, gold label id (-1 when
    unlabelled), predicted label, max probability, entropy, whether the teacher answered it) and the soft labels as
    (rows, classes) float32 arrays beside it (``probs`` only when asked for), never a Python object per row."""

    frame: pd.DataFrame
    logits: np.ndarray
    probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def where(self, mask) -> Outputs:  # noqa: ANN001 - a boolean array or Series over the rows
        """The rows where ``mask`` holds, in order."""
        keep = np.asarray(mask, dtype=bool)
        return Outputs(self.frame[keep].reset_index(drop=True), self.logits[keep],
                       None if self.probs is None else self.probs[keep])


def build_outputs(ids: list[str], texts: list[str], splits: list[str], label_ids: list[int], logits: np.ndarray,
                  labels: list[str], answered: np.ndarray | None = None) -> Outputs:
    """The teacher-outputs table: row id, its text, split, gold label id (-1 when unlabelled), logits, probs,
    summaries and whether the teacher answered the row (always, for a white box): everything a student trains on,
    so no later step rebuilds the rows the teacher labelled."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(logits).astype(np.float32)
    answered = np.ones(len(ids), dtype=bool) if answered is None else np.asarray(answered, dtype=bool)
    pred = probs.argmax(axis=1)
    frame = pd.DataFrame({
        "id": list(ids),
        "text": list(texts),
        "split": list(splits),
        "label_id": np.asarray(label_ids, dtype=np.int64),
        "predicted_label": np.asarray(labels, dtype=object)[pred],
        "max_prob": probs.max(axis=1).astype(np.float64),
        "entropy": entropy(probs),
        "answered": answered,
    })
    return Outputs(frame, logits, probs)


def _class_matrix(values: np.ndarray, classes: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), classes)


def _arrow(outputs: Outputs, classes: int) -> pa.Table:
    f = outputs.frame
    return pa.table({
        "id": pa.array(f["id"], pa.string()),
        "text": pa.array(f["text"], pa.string()),
        "split": pa.array(f["split"], pa.string()),
        "label_id": pa.array(f["label_id"], pa.int64()),
        "logits": _class_matrix(outputs.logits, classes),
        "probs": _class_matrix(outputs.probs, classes),
        "predicted_label": pa.array(f["predicted_label"], pa.string()),
        "max_prob": pa.array(f["max_prob"], pa.float64()),
        "entropy": pa.array(f["entropy"], pa.float64()),
        "answered": pa.array(f["answered"], pa.bool_()),
    })


def write_outputs(path, rows: pd.DataFrame, blocks: list[np.ndarray], labels: list[str],  # noqa: ANN001
                  answered: np.ndarray | None = None, chunk_rows: int = WRITE_CHUNK_ROWS) -> None:
    """Parquet (``path``: str or Path) of the teacher's outputs on ``rows`` (their id, text, split, label_id), from
    ``blocks`` of logits that cover the rows in order (one per labelled shard: never joined into one more array),
    built and written WRITE_CHUNK_ROWS at a time; logits and probs as fixed-size float32 lists (one per class)."""
    total = sum(len(b) for b in blocks)
    if total != len(rows):
        raise ValueError(f"teacher produced {total} rows of logits for {len(rows)} texts")
    answered = np.ones(len(rows), dtype=bool) if answered is None else np.asarray(answered, dtype=bool)
    classes = len(labels)
    writer, start = None, 0
    try:
        for block in blocks:
            if block.ndim != 2 or block.shape[1] != classes:
                raise ValueError(f"teacher produced logits of shape {block.shape}, expected (rows, {classes}): "
                                 "does the teacher's label set match the snapshot's?")
            for a in range(0, len(block), chunk_rows):
                part = block[a:a + chunk_rows]
                r = rows.iloc[start:start + len(part)]
                built = build_outputs(r["id"].tolist(), r["text"].tolist(), r["split"].tolist(),
                                      r["label_id"].tolist(), part, labels, answered[start:start + len(part)])
                table = _arrow(built, classes)
                writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
                writer.write_table(table)
                start += len(part)
        if writer is None:  # no rows: an empty table with the schema
            empty = build_outputs([], [], [], [], np.zeros((0, classes), np.float32), labels)
            pq.write_table(_arrow(empty, classes), path, compression="zstd")
    finally:
        if writer is not None:
            writer.close()


def _class_array(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size list column as one (rows, classes) float32 array."""
    col = table.column(column).combine_chunks()
    classes = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, classes)


def read_outputs(path, probs: bool = False) -> Outputs:  # noqa: ANN001 - str or Path
    """An outputs parquet as arrays: the logits (and, with ``probs``, the stored probabilities) as (rows, classes)
    float32, the other columns as a frame."""
    parquet = pq.ParquetFile(path)  # its footer read once: the column names, then the columns wanted
    table = parquet.read(columns=None if probs else [c for c in parquet.schema_arrow.names if c != "probs"])
    logits = _class_array(table, "logits")
    stored = _class_array(table, "probs") if probs else None
    frame = table.drop_columns([c for c in ("logits", "probs") if c in table.column_names]).to_pandas()
    if "answered" not in frame:  # an entry of format 2 (a white-box teacher answers every row)
        frame["answered"] = True
    return Outputs(frame, logits, stored)


def read_logits(path) -> np.ndarray:  # noqa: ANN001 - str or Path
    """Only the logits of an outputs parquet, (rows, classes) float32."""
    return _class_array(pq.read_table(path, columns=["logits"]), "logits")


def validation_tables(outputs: Outputs, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scalar views of the outputs for Great Expectations.

    rows: one row per output with its finiteness, probability range and sum, ``val_correct`` (1/0 on labelled
    validation rows, NaN elsewhere, so its mean is the teacher's validation accuracy) and ``answered`` (1/0: its
    mean is the share of rows a black-box teacher answered with a label of the set).
    classes: one row per class with how often it is predicted and its validation F1 (mean = macro-F1).
    """
    df, logits = outputs.frame, outputs.logits
    probs = outputs.probs if outputs.probs is not None else softmax(logits)  # the stored ones, when read
    is_val = (df["split"] == "validation").to_numpy() & (df["label_id"] >= 0).to_numpy()
    pred_id = pd.Series(df["predicted_label"]).map({n: i for i, n in enumerate(labels)}).to_numpy()
    with np.errstate(invalid="ignore"):
        correct = np.where(is_val, (pred_id == df["label_id"].to_numpy()).astype(float), np.nan)
    rows = pd.DataFrame({
        "id": df["id"].to_numpy(),
        "split": df["split"].to_numpy(),
        "predicted_label": df["predicted_label"].to_numpy(),
        "all_finite": np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1),
        "prob_min": probs.min(axis=1) if len(df) else [],
        "prob_max": probs.max(axis=1) if len(df) else [],
        "prob_sum": probs.sum(axis=1) if len(df) else [],
        "max_prob": df["max_prob"].to_numpy(),
        "entropy_fraction": df["entropy"].to_numpy() / np.log(len(labels)),
        "val_correct": correct,
        "answered": df["answered"].to_numpy(dtype=float) if "answered" in df else np.ones(len(df)),
    })
    counts = pd.Series(df["predicted_label"]).value_counts()
    val = df[is_val]
    val_pred = pd.Series(val["predicted_label"]).map({n: i for i, n in enumerate(labels)}).fillna(-1).to_numpy()
    f1 = per_class_f1(val_pred, val["label_id"].to_numpy(), len(labels)) if len(val) else np.zeros(len(labels))
    # classes neither present nor predicted in validation have no F1 (NaN: left out of the macro mean)
    seen = np.isin(np.arange(len(labels)), val["label_id"].to_numpy()) | np.isin(np.arange(len(labels)), val_pred)
    f1 = np.where(seen, f1, np.nan)
    classes = pd.DataFrame({
        "label": labels,
        "predicted_count": [int(counts.get(name, 0)) for name in labels],
        "val_f1": f1,
    })
    return rows, classes


@dataclasses.dataclass(frozen=True)
class ReusedLogits:
    """What an earlier labelling of this teacher already answers for a set of rows: the digests of the rows' texts,
    the logits found per digest, the cache entries they came from, and the texts still to label (in row order)."""

    digests: np.ndarray
    found: dict[str, np.ndarray]
    sources: tuple[str, ...]
    missing_texts: tuple[str, ...]

    @property
    def rows(self) -> int:
        """How many of the rows are answered by earlier outputs."""
        return len(self.digests) - len(self.missing_texts)


def reusable_logits(cache_dir: Path | None, texts: list[str], teacher: dict, max_length: int,
                    labels: list[str]) -> ReusedLogits:
    """What complete cache entries in ``cache_dir`` already answer for ``texts``: entries of the same ``teacher``
    (name, version, run), max length and labels, matched by a digest of each exact text. ``cache_dir`` None looks
    nowhere (every text is missing); an unreadable or partial entry is skipped, never trusted."""
    digests = text_digests(texts)
    wanted, found, sources = set(digests.tolist()), {}, []
    for meta_file in sorted(Path(cache_dir).glob(f"*/{META_FILE}")) if cache_dir is not None else []:
        folder = meta_file.parent
        if folder.name.endswith(".partial") or not (folder / DIGESTS_FILE).is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        same = {k: meta.get("teacher", {}).get(k) for k in ("name", "version", "run_id")} == teacher
        if not same or meta.get("max_length") != max_length or meta.get("labels") != list(labels):
            continue
        with np.load(folder / DIGESTS_FILE, allow_pickle=False) as stored:
            theirs = stored["digests"].tolist()
        hits = [n for n, d in enumerate(theirs) if d in wanted and d not in found]
        if not hits:
            continue
        logits = read_logits(folder / OUTPUTS_FILE)
        if logits.shape != (len(theirs), len(labels)):
            continue
        found.update({theirs[n]: logits[n] for n in hits})
        sources.append(folder.name)
        if len(found) == len(wanted):
            break
    missing = tuple(t for t, d in zip(texts, digests.tolist()) if d not in found)
    return ReusedLogits(digests=digests, found=found, sources=tuple(sources), missing_texts=missing)
