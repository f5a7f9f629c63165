"""Knowledge-distillation losses: pure functions on tensors.

Response-based KD (Hinton et al., 2015): ``kd_weight * T^2 * KL(p_teacher^T || p_student^T) + ce_weight * CE``.
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
Feature-based KD (FitNets-style): hidden states of mapped layers aligned by MSE or cosine distance, through a
learned linear projection when the student is narrower than the teacher. Across tokenizers (a pretrained student
with its own word pieces) tokens do not line up, so the sentence is the unit instead: the student's mean-pooled last
hidden state, projected to the teacher's width, is aligned with the teacher's mean-pooled one (cached per text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T), averaged over the batch (not scaled by T^2). Shapes: (batch, classes)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def hard_label_ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on the hard labels; rows labelled IGNORE_INDEX (unlabelled transfer texts) count nothing."""
    if (labels != IGNORE_INDEX).sum() == 0:
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)


def response_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
) -> Tensor:
    """``kd_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(student, labels)``."""
    loss = student_logits.new_zeros(())
    if kd_weight:
        loss = loss + kd_weight * temperature**2 * soft_target_kl(student_logits, teacher_logits, temperature)
    if ce_weight:
        loss = loss + ce_weight * hard_label_ce(student_logits, labels)
    return loss


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor, kind: str = "mse") -> Tensor:
    """Distance between (batch, seq, hidden) states over real (unpadded) tokens: mean MSE or mean 1 - cosine."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden.dtype)  # (batch, seq, 1)
    tokens = mask.sum().clamp(min=1.0)
    if kind == "mse":
        return (((student_hidden - teacher_hidden) ** 2) * mask).sum() / (tokens * student_hidden.shape[-1])
    if kind == "cosine":
        cos = F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)  # (batch, seq)
        return ((1.0 - cos) * mask.squeeze(-1)).sum() / tokens
    raise ValueError(f"unknown feature loss {kind!r}: use 'mse' or 'cosine'")


def even_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Map each student layer to a teacher layer, evenly spaced, last to last (1-based hidden-state indices)."""
    return {s: round(s * teacher_layers / student_layers) for s in range(1, student_layers + 1)}


class FeatureAligner(nn.Module):
    """Learned projections from student to teacher width for the mapped hidden states (identity when equal)."""

    def __init__(self, student_width: int, teacher_width: int, layer_map: dict[int, int]):
        super().__init__()
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        self.projections = nn.ModuleDict(
            {
                str(s): (nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width))
                for s in self.layer_map
            }
        )

    def forward(self, student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...],
                attention_mask: Tensor, kind: str = "mse") -> Tensor:
        """Mean hidden-state loss over mapped layers; hidden-state tuples include the embeddings at index 0."""
        losses = [
            hidden_state_loss(self.projections[str(s)](student_states[s]), teacher_states[t], attention_mask, kind)
            for s, t in self.layer_map.items()
        ]
        return torch.stack(losses).mean()


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(batch, seq, hidden) -> (batch, hidden): the mean over real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pooled_feature_loss(student_pooled: Tensor, teacher_pooled: Tensor, kind: str = "mse") -> Tensor:
    """Distance between (batch, width) sentence features: mean MSE or mean 1 - cosine (each text a one-token
    sequence for ``hidden_state_loss``)."""
    ones = student_pooled.new_ones(student_pooled.shape[0], 1)  # (batch, 1): every "token" is real
    return hidden_state_loss(student_pooled.unsqueeze(1), teacher_pooled.unsqueeze(1), ones, kind)


class PooledAligner(nn.Module):
    """Sentence-level feature KD: a learned projection of the student's mean-pooled last hidden state to the
    teacher's width (identity when equal), aligned with the teacher's mean-pooled last hidden state. Needs no token
    correspondence, so it works when student and teacher tokenise differently (e.g. MiniLM 384 -> MPNet 768)."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.projection = nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)

    def forward(self, student_last: Tensor, attention_mask: Tensor, teacher_pooled: Tensor, kind: str = "mse") -> Tensor:
        """student_last: (batch, seq, student width); teacher_pooled: (batch, teacher width)."""
        return pooled_feature_loss(self.projection(mean_pool(student_last, attention_mask)), teacher_pooled, kind)
