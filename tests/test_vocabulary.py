"""Vocabulary pruning: in-domain texts read and score exactly as before, unseen pieces become [UNK]."""

from __future__ import annotations

import numpy as np
import torch

from distillery.models.modeling import count_parameters, load_classifier, load_tokenizer, save_classifier
from distillery.models.vocabulary import choose_pieces, prune_vocabulary
from tests.helpers import make_frames


def test_pruned_student_reads_in_domain_text_as_before(tiny_teacher_dir, tmp_path):
    train, test = make_frames()
    model, tokenizer = load_classifier(tiny_teacher_dir).eval(), load_tokenizer(tiny_teacher_dir)
    texts = train["text"].tolist()[:60]  # part of the data: the rest has pieces these texts never use
    with torch.inference_mode():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        before = model(**enc).logits.numpy()
    size_before, pieces_before = count_parameters(model), [tokenizer.tokenize(t) for t in texts]
    pruned_model, pruned = prune_vocabulary(model, tokenizer, texts)
    assert len(pruned) < len(tokenizer) and count_parameters(pruned_model) < size_before
    assert [pruned.tokenize(t) for t in texts] == pieces_before  # round trip: the same pieces
    with torch.inference_mode():
        after = pruned_model(**pruned(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(after, before, atol=1e-5)  # and the same answers
    # a piece the texts never used is now [UNK]
    unseen = next(w for w in tokenizer.get_vocab() if w.isalpha() and w not in pruned.get_vocab())
    assert pruned.tokenize(unseen) == [pruned.unk_token]
    # it saves and loads as an ordinary classifier folder
    folder = save_classifier(pruned_model, pruned, tmp_path / "pruned")
    reloaded = load_classifier(folder).eval()
    assert reloaded.config.vocab_size == len(pruned) and len(load_tokenizer(folder)) == len(pruned)
    with torch.inference_mode():
        again = reloaded(**load_tokenizer(folder)(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(again, before, atol=1e-5)


def test_reserve_keeps_the_shortest_pieces_too(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    texts = ["card"]
    bare, reserved = choose_pieces(tokenizer, texts), choose_pieces(tokenizer, texts, reserve=5)
    assert set(bare.kept_ids) < set(reserved.kept_ids) and reserved.size == bare.size + 5
    assert set(tokenizer.all_special_ids) <= set(bare.kept_ids)
    extra = tokenizer.convert_ids_to_tokens(sorted(set(reserved.kept_ids) - set(bare.kept_ids)))
    longest_kept = max(len(p.removeprefix("##")) for p in extra)
    assert all(len(p.removeprefix("##")) >= longest_kept for p in tokenizer.get_vocab()
               if tokenizer.convert_tokens_to_ids(p) not in reserved.kept_ids and not p.startswith("[unused"))
