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

OUTPUT_COLUMNS = ["id", "text", "split", "label_id", "logits", "probs", "predicted_label", "max_prob", "entropy",
                  "answered"]
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


def merge_logits(digests: np.ndarray, fresh: np.ndarray, found: dict[str, np.ndarray], classes: int) -> np.ndarray:
    """(rows, classes) logits in row order: a row whose text digest is in ``found`` takes those logits, the others
    take the rows of ``fresh`` in turn (labelled now, in row order)."""
    logits = np.zeros((len(digests), classes), dtype=np.float32)
    missing = [n for n, d in enumerate(digests.tolist()) if d not in found]
    if len(missing) != len(fresh):
        raise ValueError(f"{len(fresh)} fresh logits for {len(missing)} rows without earlier ones")
    if missing:
        logits[missing] = fresh
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


def build_outputs(ids: list[str], texts: list[str], splits: list[str], label_ids: list[int], logits: np.ndarray,
                  labels: list[str], answered: np.ndarray | None = None) -> pd.DataFrame:
    """The teacher-outputs table: row id, its text, split, gold label id (-1 when unlabelled), logits, probs,
    summaries and whether the teacher answered the row (always, for a white box): everything a student trains on,
    so no later step rebuilds the rows the teacher labelled."""
    probs = softmax(logits).astype(np.float32)
    answered = np.ones(len(ids), dtype=bool) if answered is None else np.asarray(answered, dtype=bool)
    pred = probs.argmax(axis=1)
    return pd.DataFrame({
        "id": list(ids),
        "text": list(texts),
        "split": list(splits),
        "label_id": np.asarray(label_ids, dtype=np.int64),
        "logits": list(np.asarray(logits, dtype=np.float32)),
        "probs": list(probs),
        "predicted_label": [labels[i] for i in pred],
        "max_prob": probs.max(axis=1).astype(np.float64),
        "entropy": entropy(probs),
        "answered": answered,
    })


def write_outputs(df: pd.DataFrame, path) -> None:  # noqa: ANN001 - str or Path
    """Parquet with logits/probs as fixed-size float32 lists (one value per class)."""
    classes = len(df["logits"].iloc[0]) if len(df) else 0
    table = pa.table({
        "id": pa.array(df["id"], pa.string()),
        "text": pa.array(df["text"], pa.string()),
        "split": pa.array(df["split"], pa.string()),
        "label_id": pa.array(df["label_id"], pa.int64()),
        "logits": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(list(df["logits"])).astype(np.float32) if classes else [], pa.float32()), classes),
        "probs": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(list(df["probs"])).astype(np.float32) if classes else [], pa.float32()), classes),
        "predicted_label": pa.array(df["predicted_label"], pa.string()),
        "max_prob": pa.array(df["max_prob"], pa.float64()),
        "entropy": pa.array(df["entropy"], pa.float64()),
        "answered": pa.array(df["answered"] if "answered" in df else [True] * len(df), pa.bool_()),
    })
    pq.write_table(table, path, compression="zstd")


def read_outputs(path) -> pd.DataFrame:  # noqa: ANN001 - str or Path
    df = pq.read_table(path).to_pandas()
    for col in ("logits", "probs"):
        df[col] = [np.asarray(v, dtype=np.float32) for v in df[col]]
    if "answered" not in df:  # an entry of format 2 (a white-box teacher answers every row)
        df["answered"] = True
    return df


def validation_tables(df: pd.DataFrame, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scalar views of the outputs for Great Expectations.

    rows: one row per output with its finiteness, probability range and sum, ``val_correct`` (1/0 on labelled
    validation rows, NaN elsewhere, so its mean is the teacher's validation accuracy) and ``answered`` (1/0: its
    mean is the share of rows a black-box teacher answered with a label of the set).
    classes: one row per class with how often it is predicted and its validation F1 (mean = macro-F1).
    """
    logits = np.stack(df["logits"].to_list()) if len(df) else np.zeros((0, len(labels)))
    probs = np.stack(df["probs"].to_list()) if len(df) else np.zeros((0, len(labels)))
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
        logits = np.stack(read_outputs(folder / OUTPUTS_FILE)["logits"].to_numpy())
        if logits.shape != (len(theirs), len(labels)):
            continue
        found.update({theirs[n]: logits[n] for n in hits})
        sources.append(folder.name)
        if len(found) == len(wanted):
            break
    missing = tuple(t for t, d in zip(texts, digests.tolist()) if d not in found)
    return ReusedLogits(digests=digests, found=found, sources=tuple(sources), missing_texts=missing)
