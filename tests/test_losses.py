"""KD losses checked against values a person can work out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.models.losses import (
    IGNORE_INDEX,
    FeatureAligner,
    PooledAligner,
    even_layer_map,
    hidden_state_loss,
    mean_pool,
    pooled_feature_loss,
    response_kd_loss,
    soft_target_kl,
)


def test_identical_logits_give_zero_kl():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert soft_target_kl(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_matches_a_hand_computed_value():
    # teacher p = softmax([ln 3, 0]) = [0.75, 0.25]; student q = [0.5, 0.5] at T = 1
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert soft_target_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_weight_zero_is_plain_cross_entropy():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    loss = response_kd_loss(student, teacher, labels, temperature=4.0, kd_weight=0.0, ce_weight=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)


def test_t_squared_scaling():
    student = torch.tensor([[0.3, -0.2, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0]])
    labels = torch.tensor([2])
    for t in (1.0, 2.0, 4.0):
        loss = response_kd_loss(student, teacher, labels, temperature=t, kd_weight=1.0, ce_weight=0.0)
        assert loss.item() == pytest.approx(t * t * soft_target_kl(student, teacher, t).item(), rel=1e-6)


def test_weights_combine_linearly_and_unlabelled_rows_skip_ce():
    student = torch.tensor([[0.3, -0.2], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, IGNORE_INDEX])
    kd = response_kd_loss(student, teacher, labels, 2.0, 1.0, 0.0).item()
    ce = F.cross_entropy(student[:1], labels[:1]).item()  # only the labelled row
    assert response_kd_loss(student, teacher, labels, 2.0, 0.7, 0.3).item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-6)
    all_unlabelled = torch.full((2,), IGNORE_INDEX)
    assert response_kd_loss(student, teacher, all_unlabelled, 2.0, 0.0, 1.0).item() == 0.0


def test_hidden_state_losses_ignore_padding():
    a = torch.zeros(1, 3, 2)
    b = torch.zeros(1, 3, 2)
    b[0, 2] = 10.0  # differs only at a padded position
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_state_loss(a, b, mask, "mse").item() == 0.0
    b[0, 0] = torch.tensor([1.0, 1.0])  # one real token off by 1 in both dims: mean over 2 tokens x 2 dims
    assert hidden_state_loss(a, b, mask, "mse").item() == pytest.approx(2 / 4)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])  # cosine 1 and 0 -> mean(1 - cos) = 0.5
    assert hidden_state_loss(x, y, torch.ones(1, 2), "cosine").item() == pytest.approx(0.5)


def test_feature_aligner_projects_when_widths_differ():
    mapping = even_layer_map(2, 6)
    assert mapping == {1: 3, 2: 6}
    aligner = FeatureAligner(4, 8, mapping)
    student_states = tuple(torch.randn(2, 3, 4) for _ in range(3))
    teacher_states = tuple(torch.randn(2, 3, 8) for _ in range(7))
    loss = aligner(student_states, teacher_states, torch.ones(2, 3))
    loss.backward()
    assert loss.item() > 0 and aligner.projections["1"].weight.grad is not None
    same = FeatureAligner(8, 8, {1: 1})
    states = tuple(torch.randn(1, 2, 8) for _ in range(2))
    assert same(states, states, torch.ones(1, 2)).item() == 0.0


def test_mean_pool_counts_only_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); the last token is padding
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_pooled_feature_losses_by_hand():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    assert pooled_feature_loss(a, b, "mse").item() == pytest.approx(4 / 2)  # (1-3)^2 and 0, over 2 values
    assert pooled_feature_loss(a, b, "cosine").item() == pytest.approx(0.0)  # same direction
    assert pooled_feature_loss(a, torch.tensor([[0.0, 5.0]]), "cosine").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown feature loss"):
        pooled_feature_loss(a, b, "l1")


def test_pooled_aligner_projects_across_widths_and_learns():
    """Student width 4 against a teacher width 8: the projection is trained and the identity needs none."""
    torch.manual_seed(0)
    aligner = PooledAligner(4, 8)
    student_last = torch.randn(3, 5, 4)  # (batch, seq, student width): tokens of the student's own tokenizer
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    target = torch.randn(3, 8)  # (batch, teacher width): one sentence feature per text, whatever its tokens
    optimiser = torch.optim.SGD(aligner.parameters(), lr=0.5)
    first = aligner(student_last, mask, target).item()
    for _ in range(50):
        optimiser.zero_grad()
        loss = aligner(student_last, mask, target)
        loss.backward()
        optimiser.step()
    assert loss.item() < first / 2
    same = PooledAligner(8, 8)
    assert list(same.parameters()) == []
    states = torch.randn(2, 4, 8)
    assert same(states, torch.ones(2, 4), mean_pool(states, torch.ones(2, 4))).item() == pytest.approx(0.0)
