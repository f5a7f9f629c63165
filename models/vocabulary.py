"""Vocabulary pruning: a student that keeps only the word pieces its in-domain data uses.

Most of a small BERT-style student's parameters can be its embedding table (11.7M of the default cut student's
15.6M), and most of those rows are word pieces the domain never produces. Pruning keeps the pieces the training texts
tokenise to, the special tokens and a configurable reserve of the shortest pieces (single characters and their ``##``
forms, so an unseen word can still be spelt out), in their original order; everything else maps to ``[UNK]``.

WordPiece matches greedily, longest piece first: every piece the data's texts produced is kept and every other piece
is one the greedy match did not choose, so those texts tokenise to the same pieces after pruning and the model's
answers on them do not change (tested).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distillery.models.folders import ModelError

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class PrunedVocabulary:
    kept_ids: list[int]  # original ids, ascending; row i of the new table is row kept_ids[i] of the old one
    original_size: int

    @property
    def size(self) -> int:
        return len(self.kept_ids)


def piece_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int) -> Iterator[list[int]]:
    """Each text's piece ids (truncated to ``max_length``), tokenised 1,024 texts at a time."""
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        yield from tokenizer(texts[start:start + 1024], truncation=True, max_length=max_length)["input_ids"]


def choose_pieces(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], reserve: int = 0,
                  max_length: int = 512) -> PrunedVocabulary:
    """The pieces to keep: those ``texts`` tokenise to, the special tokens, and ``reserve`` more of the shortest."""
    vocab = tokenizer.get_vocab()
    used = set(tokenizer.all_special_ids)
    for ids in piece_ids(tokenizer, texts, max_length):
        used.update(ids)
    if reserve:
        by_length = sorted((i for piece, i in vocab.items() if i not in used and not piece.startswith("[unused")),
                           key=lambda i: (len(tokenizer.convert_ids_to_tokens(i).removeprefix("##")), i))
        used.update(by_length[:reserve])
    return PrunedVocabulary(sorted(used), len(vocab))


def prune_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Iterable[str],
                     reserve: int = 0, max_length: int = 512) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model`` (in place) and a new tokenizer that keep only the chosen pieces; a ModelError for a tokenizer that
    is not WordPiece (no vocab.txt)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(str(folder))
        spec_file = folder / TOKENIZER_FILE
        spec = json.loads(spec_file.read_text(encoding="utf-8")) if spec_file.is_file() else {}
        if spec.get("model", {}).get("type") != "WordPiece":
            raise ModelError(f"vocabulary pruning needs a WordPiece tokenizer (BERT, MiniLM, MPNet); "
                             f"{type(tokenizer).__name__} is not one: set student.prune_vocab: false")
        plan = choose_pieces(tokenizer, texts, reserve, max_length)
        new_id = {old: new for new, old in enumerate(plan.kept_ids)}
        pieces = tokenizer.convert_ids_to_tokens(plan.kept_ids)
        spec["model"]["vocab"] = {piece: i for i, piece in enumerate(pieces)}
        for token in spec.get("added_tokens", []):
            token["id"] = new_id[token["id"]]  # special tokens are always kept
        post = spec.get("post_processor") or {}
        for special in post.get("special_tokens", {}).values():  # TemplateProcessing (BERT)
            special["ids"] = [new_id[i] for i in special["ids"]]
        for key in ("cls", "sep"):  # RobertaProcessing / BertProcessing (MPNet): [token, id]
            if isinstance(post.get(key), list):
                post[key][1] = new_id[post[key][1]]
        if spec.get("padding"):
            spec["padding"]["pad_id"] = new_id.get(spec["padding"].get("pad_id", 0), 0)
        spec_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        pruned = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    old = model.get_input_embeddings()
    index = torch.tensor(plan.kept_ids, dtype=torch.long)
    new_pad = pruned.pad_token_id
    table = nn.Embedding(plan.size, old.embedding_dim, padding_idx=new_pad)
    with torch.no_grad():
        table.weight.copy_(old.weight[index])
    model.set_input_embeddings(table)
    model.config.vocab_size = plan.size
    model.config.pad_token_id = new_pad
    return model, pruned
