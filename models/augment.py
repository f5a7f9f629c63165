"""A transfer set the pipeline makes itself: augmented variants of the training texts for the teacher to label.

Distillation learns from the teacher's answers, so more in-domain inputs, even imperfect ones, carry more of its
knowledge (Tang et al. 2019, "Distilling task-specific knowledge from BERT into simple neural networks"). No model
hub is needed: every method rewrites words of a training text.

- ``mask``: each word is replaced by the tokenizer's mask token with probability ``p_mask``;
- ``drop``: each word is dropped with probability ``p_drop`` (never all of them);
- ``swap``: each neighbouring pair of words is swapped with probability ``p_swap``;
- ``ngram``: a random contiguous n-gram (n from 1 to the text's length) of the text;
- ``vocab``: each word is replaced by a random word of the training vocabulary with probability ``p_vocab``.

Variants are deterministic for a seed, unique, and never a text (case- and space-insensitively) of the train,
validation or test split: a variant that equals a held-out text would leak it. Nor is a variant within
``near_copy_words`` word edits (a word inserted, dropped, replaced, or two swapped) of a validation or test text:
the teacher's answer on a near-copy of a held-out text would teach the distilled student that text, and only it
(the baseline never sees the transfer set), which makes validation and test optimistic for it alone. Measured with the
default recipe (x1, mask/drop/swap/ngram): on HWU64 9.6% of variants were one word from a validation text and 10.0%
from a test text (mostly n-gram crops of short commands); on BANKING77 0.7% and 2.8%. Opt-in (``1``) until its
effect on accuracy is measured on both data sets. Their hash and recipe go into
the lineage; they carry no hard label (the teacher's soft labels only).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from distillery.models.data import normalise_text, row_id

METHODS = ("mask", "drop", "swap", "ngram", "vocab")


@dataclass(frozen=True)
class Recipe:
    multiple: float = 0.0  # variants per training text (0: no transfer set is made)
    methods: tuple[str, ...] = ("mask", "drop", "swap", "ngram")
    p_mask: float = 0.1
    p_drop: float = 0.1
    p_swap: float = 0.1
    p_vocab: float = 0.1
    seed: int = 13
    mask_token: str = "[MASK]"
    near_copy_words: int = 0  # no variant within this many word edits of a held-out text (0: only exact copies)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown augmentation method(s) {unknown}: use {list(METHODS)}")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _variant(words: list[str], method: str, recipe: Recipe, rng: np.random.Generator, vocabulary: list[str]) -> str:
    if method == "mask":
        words = [recipe.mask_token if rng.random() < recipe.p_mask else w for w in words]
    elif method == "drop":
        kept = [w for w in words if rng.random() >= recipe.p_drop]
        words = kept or [words[int(rng.integers(len(words)))]]
    elif method == "swap":
        words = list(words)
        for i in range(len(words) - 1):
            if rng.random() < recipe.p_swap:
                words[i], words[i + 1] = words[i + 1], words[i]
    elif method == "ngram":
        n = int(rng.integers(1, len(words) + 1))
        start = int(rng.integers(0, len(words) - n + 1))
        words = words[start:start + n]
    elif method == "vocab":
        words = [vocabulary[int(rng.integers(len(vocabulary)))] if rng.random() < recipe.p_vocab else w for w in words]
    return " ".join(words)


def word_key(text: str) -> tuple[str, ...]:
    """A text as the words that matter for a near copy: lower case, punctuation and spacing gone."""
    return tuple(re.findall(r"[\w']+", normalise_text(text)))


def _deletions(words: tuple[str, ...], k: int) -> set[tuple[str, ...]]:
    out = {words}
    for r in range(1, min(k, len(words)) + 1):
        for gone in itertools.combinations(range(len(words)), r):
            out.add(tuple(w for i, w in enumerate(words) if i not in gone))
    return out


class NearCopies:
    """Which texts are within ``k`` word edits of any of ``texts`` (symmetric deletion: two texts are that close when
    removing at most ``k`` words from each makes them equal; it finds every insertion, deletion and replacement, and
    a swap of neighbours too)."""

    def __init__(self, texts: list[str], k: int):
        self.k = k
        self.index = set().union(*(_deletions(word_key(t), k) for t in texts)) if texts else set()

    def near(self, text: str) -> bool:
        return bool(_deletions(word_key(text), self.k) & self.index)


def make_transfer_set(train_texts: list[str], held_out_texts: list[str], recipe: Recipe) -> pd.DataFrame:
    """Augmented variants (columns ``id``, ``text``, ``method``, ``source_id``), sorted by id; none equal to a train,
    validation or test text. Deterministic: the same texts and recipe give the same rows, in any input order."""
    if recipe.multiple <= 0 or not train_texts:
        return pd.DataFrame(columns=["id", "text", "method", "source_id"])
    ordered = sorted(set(train_texts), key=row_id)
    rng = np.random.default_rng(recipe.seed)
    vocabulary = sorted({w for t in ordered for w in t.split()})
    taken = {normalise_text(t) for t in ordered} | {normalise_text(t) for t in held_out_texts}
    close = NearCopies(held_out_texts, recipe.near_copy_words) if recipe.near_copy_words else None
    wanted = int(round(recipe.multiple * len(ordered)))
    rows, attempts = [], 0
    while len(rows) < wanted and attempts < 5 * wanted:
        source = ordered[attempts % len(ordered)]
        # methods take turns along the texts and shift every pass, so each method reaches every text in the end
        method = recipe.methods[(attempts + attempts // len(ordered)) % len(recipe.methods)]
        attempts += 1
        words = source.split()
        if not words:
            continue
        text = _variant(words, method, recipe, rng, vocabulary)
        key = normalise_text(text)
        if not key or key in taken:  # a duplicate, the source itself, or a held-out text: never added
            continue
        if close is not None and close.near(text):  # a near copy of a held-out text: never added either
            taken.add(key)
            continue
        taken.add(key)
        rows.append((row_id(text), text, method, row_id(source)))
    df = pd.DataFrame(rows, columns=["id", "text", "method", "source_id"])
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def content_hash(df: pd.DataFrame) -> str:
    """A hash of the generated rows (ids and texts), for the lineage."""
    return hashlib.sha256("\n".join(df["id"] + "\t" + df["text"]).encode()).hexdigest()[:16]
