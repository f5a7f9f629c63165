"""Slow tier: the packaged all-MiniLM-L6-v2 weights load offline and cut into the default student."""

from __future__ import annotations

import pytest
import torch

from distillery.models.modeling import build_student, count_parameters, load_classifier, load_tokenizer, resolve_base_model

pytestmark = pytest.mark.slow


def test_minilm_loads_offline_and_cuts_into_the_default_student(tmp_path):
    folder = resolve_base_model("minilm", tmp_path)
    labels = [f"intent_{i}" for i in range(77)]
    teacher = load_classifier(folder, labels).eval()
    tokenizer = load_tokenizer(folder)
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384
    assert 22_000_000 < count_parameters(teacher) < 23_000_000
    student = build_student(teacher, "cut", [0, 5], 0, 0, 0, 0).eval()
    assert 15_000_000 < count_parameters(student) < 16_000_000
    batch = tokenizer(["my card has not arrived", "what is the exchange rate"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert student(**batch).logits.shape == (2, 77)
        # the cut keeps layer 5 of the teacher as the student's second (last) layer
        assert torch.equal(student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[5].output.dense.weight)


def test_mpnet_without_its_packages_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    from distillery.models.modeling import ModelError

    with pytest.raises(ModelError, match="make large-model"):
        resolve_base_model("mpnet", tmp_path)
