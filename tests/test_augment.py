"""The generated transfer set: deterministic per seed, never a held-out text, hashed, and labelled into KD."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from distillery.models.augment import Recipe, content_hash, make_transfer_set
from distillery.models.data import normalise_text
from tests.helpers import make_frames, run_command

TRAIN, TEST = make_frames()


def test_same_seed_same_rows_in_any_order_another_seed_other_rows():
    texts = TRAIN["text"].tolist()
    recipe = Recipe(multiple=2.0, methods=("mask", "drop", "swap", "ngram", "vocab"), seed=3)
    a = make_transfer_set(texts, [], recipe)
    assert len(a) == 2 * len(texts) and a["id"].is_unique
    pd.testing.assert_frame_equal(a, make_transfer_set(list(reversed(texts)), [], recipe))
    b = make_transfer_set(texts, [], Recipe(multiple=2.0, methods=recipe.methods, seed=4))
    assert set(a["text"]) != set(b["text"])
    assert set(a["method"]) == set(recipe.methods)  # every method contributes
    assert "[MASK]" in " ".join(a.loc[a["method"] == "mask", "text"])


def test_no_variant_is_a_train_validation_or_test_text():
    texts = ["please help card delivery today", "hello pin locked now", "can you tell me euro rate"]
    # every n-gram and every one-word-dropped form of the train texts is a held-out text here
    held_out = []
    for t in texts:
        words = t.split()
        held_out += [" ".join(words[i:j]) for i, j in itertools.combinations(range(len(words) + 1), 2)]
        held_out += [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    made = make_transfer_set(texts, held_out, Recipe(multiple=3.0, methods=("ngram", "drop", "swap"), seed=0,
                                                     near_copy_words=0))
    keys = set(made["text"].map(normalise_text))
    assert not keys & {normalise_text(t) for t in held_out + texts}
    assert len(made) > 0  # swaps still make new texts


def test_no_variant_is_one_word_from_a_validation_or_test_text():
    """A near copy of a held-out text (a word dropped, added, replaced or two swapped) would teach the distilled
    student that text: with near_copy_words 1 none is made; with 0 (the default until measured) they were there."""
    from distillery.models.augment import NearCopies, word_key

    close = NearCopies(["how do I top up my card?"], 1)
    assert close.near("how do i top up my card") and close.near("how I top up my card")  # same / one dropped
    assert close.near("how do I top up my new card") and close.near("how do I top up this card")  # added / replaced
    assert close.near("do how I top up my card") and not close.near("how do I top up")  # swapped / two away
    texts = TRAIN["text"].tolist()
    held_out = [" ".join(t.split()[1:]) for t in texts[::3]]  # held-out texts one word from train texts
    before = make_transfer_set(texts, held_out, Recipe(multiple=2.0, seed=5, near_copy_words=0))
    after = make_transfer_set(texts, held_out, Recipe(multiple=2.0, seed=5, near_copy_words=1))
    index = NearCopies(held_out, 1)
    assert sum(index.near(t) for t in before["text"]) > 0
    assert not any(index.near(t) for t in after["text"]) and len(after) > 0
    assert word_key("Top-up, please!") == ("top", "up", "please")


def test_recipe_and_content_hash_change_with_the_recipe():
    texts = TRAIN["text"].tolist()
    base = Recipe(multiple=1.0, seed=1)
    other = Recipe(multiple=1.0, seed=1, p_drop=0.3)
    assert base.digest() != other.digest() and base.digest() == Recipe(multiple=1.0, seed=1).digest()
    assert content_hash(make_transfer_set(texts, [], base)) != content_hash(make_transfer_set(texts, [], other))
    with pytest.raises(ValueError, match="unknown augmentation"):
        Recipe(methods=("backtranslate",))


def test_generated_rows_are_labelled_and_reach_distillation_only(teacher_project: Path):
    """data.augment.multiple: 1 -> the teacher labels one variant per train text (GX-checked with the rest), the
    distilled student trains on them (soft labels only), the baseline does not, and the recipe is in the lineage."""
    from distillery.models.labelling import read_outputs

    result = run_command(teacher_project / "distillery.yaml", "distill",
                         {"data.augment.multiple": 1, "distill.sweep.temperature": []})
    outputs = read_outputs(result.outputs.path).frame
    made = outputs[outputs["split"] == "augmented"]
    n_train = int((outputs["split"] == "train").sum())
    assert len(made) == n_train and (made["label_id"] == -1).all()
    assert result.outputs.validation.success
    client = mlflow.tracking.MlflowClient(f"sqlite:///{teacher_project / 'mlflow.db'}")
    student = client.get_run(result.best.run_id).data.params
    baseline = client.get_run(result.baseline.run_id).data.params
    assert int(student["train_rows"]) == n_train + len(made) and int(baseline["train_rows"]) == n_train
    label_params = client.get_run(result.outputs.run_id).data.params
    assert label_params["transfer.rows"] == str(len(made)) and len(label_params["transfer.recipe_hash"]) == 16
