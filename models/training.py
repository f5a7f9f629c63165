"""Training and inference loops for transformer classifiers: fine-tuning, distillation, prediction.

One loop serves the teacher fine-tune, the distilled student and the hard-label baseline; what differs is the
objective (a small nn.Module that runs the forward pass and returns the loss). The loop is seeded and
deterministic on CPU, validates every epoch, stops early on validation macro-F1, keeps the best weights and
checkpoints every epoch so a crashed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from distillery.models.losses import (
    IGNORE_INDEX,
    FeatureAligner,
    PooledAligner,
    even_layer_map,
    hard_label_ce,
    mean_pool,
    response_kd_loss,
)
from distillery.models.devices import CPU, Compute, model_device, to_device
from distillery.models.metrics import classification_metrics
from distillery.models.progress import progress_bar
from distillery.models.randomness import seeded

logger = logging.getLogger(__name__)


ENCODE_CHUNK = 10_000  # texts tokenised at once


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    max_length: int = 64
    patience: int = 2
    seed: int = 13
    max_steps: int | None = None
    group_by_length: bool = True  # batches of similar lengths (less padding); the batch order stays random


@dataclass
class Encoded:
    """Token ids of a text set (unpadded) in two arrays, hard labels (IGNORE_INDEX where unknown), optional teacher
    logits and teacher sentence features (mean-pooled last hidden state, for feature KD across tokenizers). Row ``i``
    is ``ids[offsets[i]:offsets[i + 1]]``: a million texts cost their tokens' int32s, not a Python list each."""

    ids: np.ndarray  # (tokens,) int32: every row's token ids, end to end
    offsets: np.ndarray  # (rows + 1,) int64
    labels: Tensor  # (rows,) int64
    teacher_logits: Tensor | None = None  # (rows, classes) float32
    teacher_features: Tensor | None = None  # (rows, teacher width) float32
    lengths: np.ndarray = field(init=False)  # (rows,) tokens per row

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], labels: Tensor, **teacher: Tensor | None) -> "Encoded":
        """From token-id lists (one per row)."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
        return cls(ids, np.concatenate([[0], np.cumsum(lengths)]), labels, **teacher)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    steps: int = 0
    pruned: bool = False  # stopped by ``prune_below`` (a search's median rule), not by patience


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
           labels: Sequence[int] | None = None, teacher_logits: np.ndarray | None = None,
           teacher_features: np.ndarray | None = None) -> Encoded:
    """Tokenise once (truncated, unpadded; ``ENCODE_CHUNK`` texts at a time, so only that many token lists exist at
    once); batches are padded dynamically later."""
    texts = list(texts)
    pieces, lengths = [np.zeros(0, dtype=np.int32)], [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(texts), ENCODE_CHUNK):
        rows = tokenizer(texts[start : start + ENCODE_CHUNK], truncation=True, max_length=max_length,
                         padding=False)["input_ids"]
        lengths.append(np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows)))
        pieces.append(np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths[-1].sum())))
    y = torch.tensor(list(labels) if labels is not None else [IGNORE_INDEX] * len(texts), dtype=torch.long)
    t = torch.as_tensor(np.asarray(teacher_logits, dtype=np.float32)) if teacher_logits is not None else None
    f = torch.as_tensor(np.asarray(teacher_features, dtype=np.float32)) if teacher_features is not None else None
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    return Encoded(np.concatenate(pieces), offsets, y, teacher_logits=t, teacher_features=f)


def collate(data: Encoded, index: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """The rows ``index`` as a batch padded to its longest row (input_ids, attention_mask, labels, and the teacher's
    logits and features when there are)."""
    index = np.asarray(index, dtype=np.int64)
    lengths = data.lengths[index]
    width = int(lengths.max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)  # (batch, seq)
    for k, i in enumerate(index):
        input_ids[k, : lengths[k]] = data.row(i)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
             "labels": data.labels[list(index)]}
    if data.teacher_logits is not None:
        batch["teacher_logits"] = data.teacher_logits[list(index)]
    if data.teacher_features is not None:
        batch["teacher_features"] = data.teacher_features[list(index)]
    return batch


class CrossEntropyObjective(nn.Module):
    """Plain fine-tuning on hard labels (teacher bootstrap, and the no-distillation baseline student)."""

    def forward(self, model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return hard_label_ce(logits.float(), batch["labels"])  # in float32 under mixed precision


class DistillationObjective(nn.Module):
    """Response-based KD on cached teacher logits, plus optional feature KD: ``feature_target="hidden"`` aligns
    mapped hidden states token by token with a live teacher (same tokenizer); ``"pooled"`` aligns the student's
    mean-pooled last hidden state with the teacher's cached one (``batch["teacher_features"]``; any tokenizer)."""

    def __init__(self, temperature: float, kd_weight: float, ce_weight: float, feature_weight: float = 0.0,
                 feature_loss: str = "mse", teacher: PreTrainedModel | None = None,
                 student: PreTrainedModel | None = None, layer_map: dict[int, int] | None = None,
                 feature_target: str = "hidden"):
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.feature_weight, self.feature_loss = feature_weight, feature_loss
        self.aligner: FeatureAligner | None = None
        self.pooler: PooledAligner | None = None
        self._teacher = [teacher]  # a list keeps the frozen teacher out of this module's parameters
        if feature_weight > 0:
            if teacher is None or student is None:
                raise ValueError("feature KD needs the teacher and the student")
            if feature_target == "pooled":
                self.pooler = PooledAligner(student.config.hidden_size, teacher.config.hidden_size)
            elif feature_target == "hidden":
                mapping = layer_map or even_layer_map(student.config.num_hidden_layers,
                                                      teacher.config.num_hidden_layers)
                self.aligner = FeatureAligner(student.config.hidden_size, teacher.config.hidden_size, mapping)
                teacher.eval()
            else:
                raise ValueError(f"unknown feature target {feature_target!r}: use 'hidden' or 'pooled'")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's: .to(device) moves the teacher too
        super()._apply(fn, recurse)
        if self._teacher[0] is not None:
            self._teacher[0]._apply(fn, recurse)
        return self

    def forward(self, model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
        want_states = self.aligner is not None or self.pooler is not None
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=want_states)
        loss = response_kd_loss(out.logits.float(), batch["teacher_logits"], batch["labels"],  # float32 under autocast
                                self.temperature, self.kd_weight, self.ce_weight)
        if self.pooler is not None:
            if "teacher_features" not in batch:
                raise ValueError("pooled feature KD needs the teacher's sentence features with the training rows")
            loss = loss + self.feature_weight * self.pooler(out.hidden_states[-1], batch["attention_mask"],
                                                            batch["teacher_features"], self.feature_loss)
        if self.aligner is not None:
            with torch.inference_mode():
                t_states = self._teacher[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            output_hidden_states=True).hidden_states
            t_states = tuple(s.clone() for s in t_states)
            loss = loss + self.feature_weight * self.aligner(out.hidden_states, t_states, batch["attention_mask"],
                                                             self.feature_loss)
        return loss


@torch.inference_mode()
def _predict_rows(model: PreTrainedModel, data: Encoded, pad_id: int, batch_size: int, width: int,
                  rows_of: Callable[[dict[str, Tensor]], Tensor], progress: bool, desc: str) -> np.ndarray:
    """(rows, width) float32 of ``rows_of(batch)`` for every row, in input order; rows length-sorted to pad little."""
    model.eval()
    device = model_device(model)  # where the caller put it (float32: accuracy passes are exact)
    order = np.argsort(data.lengths, kind="stable")
    out = np.zeros((len(data), width), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, desc=desc, disable=not progress, leave=False):
        index = order[start : start + batch_size]
        out[index] = rows_of(to_device(collate(data, index, pad_id), device)).float().cpu().numpy()
    return out


def predict_logits(model: PreTrainedModel, data: Encoded, pad_id: int, batch_size: int = 64,
                   progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Logits (rows, classes) float32 for every row, in input order."""
    return _predict_rows(model, data, pad_id, batch_size, model.config.num_labels,
                         lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                         progress, desc)


def predict_pooled(model: PreTrainedModel, data: Encoded, pad_id: int, batch_size: int = 64,
                   progress: bool = False, desc: str = "features") -> np.ndarray:
    """Sentence features (rows, hidden) float32: the mean-pooled last hidden state, in input order."""

    def pooled(b: dict[str, Tensor]) -> Tensor:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        return mean_pool(out.hidden_states[-1], b["attention_mask"])

    return _predict_rows(model, data, pad_id, batch_size, model.config.hidden_size, pooled, progress, desc)


def _fingerprint(settings: TrainSettings, extra: dict) -> str:
    return hashlib.sha256(json.dumps([asdict(settings), extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def epoch_batches(data: Encoded, batch_size: int, generator: torch.Generator, group_by_length: bool = True,
                  window: int = 50) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, then (``group_by_length``) sorted by length within windows of
    ``window`` batches so each batch pads little, and the batches shuffled again. Every row appears exactly once."""
    order = torch.randperm(len(data), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]  # longest first, ties in shuffled order (a stable descending sort)
        chunk = [chunk[k] for k in np.argsort(-data.lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_model(
    model: PreTrainedModel,
    objective: nn.Module,
    train: Encoded,
    validation: Encoded,
    settings: TrainSettings,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    fingerprint_extra: dict | None = None,
    prune_below: Sequence[float | None] = (),
    compute: Compute = CPU,
) -> TrainResult:
    """Train ``model`` in place with ``objective``; on return the model holds the best validation weights.

    With ``checkpoint_dir`` the full state (weights, optimiser, scheduler, RNG, history, best weights) is saved
    after every epoch and a later call with the same settings resumes after the last finished epoch. The run holds the
    process's RNG lock (``models.randomness``), so the same seed gives the same weights under any task runner.
    ``prune_below[e - 1]``: stop after epoch ``e`` when validation macro-F1 is below it (a search's pruning rule;
    ``None``: no bar at that epoch). ``compute``: the device (and mixed precision) to train on; the model is back on
    the CPU on return.
    """
    with seeded(settings.seed, compute.deterministic):
        model.to(compute.device)
        objective.to(compute.device)
        try:
            return _train(model, objective, train, validation, settings, pad_id, checkpoint_dir, on_epoch_end,
                          progress, desc, fingerprint_extra, tuple(prune_below), compute)
        finally:
            model.to("cpu")
            objective.to("cpu")


def _train(model: PreTrainedModel, objective: nn.Module, train: Encoded, validation: Encoded, settings: TrainSettings,
           pad_id: int, checkpoint_dir: Path | None, on_epoch_end: Callable[[int, dict], None] | None, progress: bool,
           desc: str, fingerprint_extra: dict | None, prune_below: tuple = (), compute: Compute = CPU) -> TrainResult:
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total = min(total, settings.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * settings.warmup_fraction), max(total, 1))
    fingerprint = _fingerprint(settings, {"rows": len(train), **(fingerprint_extra or {})})
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.scales_loss)
    parts = {"model": model, "objective": objective, "optimizer": optimizer, "scheduler": scheduler}
    result, best_state, bad_epochs, start_epoch = _resume(ckpt, fingerprint, parts, desc)
    finished = result.stopped_early or (settings.max_steps is not None and result.steps >= settings.max_steps)
    for epoch in range(start_epoch, settings.epochs + 1):
        if finished:
            break
        losses, finished = _train_epoch(model, objective, (optimizer, scheduler, scaler), params, train, settings,
                                        pad_id, epoch, result, progress, desc, compute)
        logits = predict_logits(model, validation, pad_id, batch_size=max(settings.batch_size, 64))
        m = classification_metrics(logits, validation.labels.numpy(), model.config.num_labels)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "steps": result.steps}
        result.history.append(row)
        logger.info("%s epoch %d: %s", desc, epoch, row)
        if m["macro_f1"] > result.best_score:
            result.best_score, result.best_epoch, bad_epochs = m["macro_f1"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= settings.patience:
                result.stopped_early = True
                finished = True
        bar_now = prune_below[epoch - 1] if epoch <= len(prune_below) else None
        if bar_now is not None and m["macro_f1"] < bar_now and epoch < settings.epochs:
            logger.info("%s: pruned after epoch %d (validation macro-F1 %.4f < %.4f)", desc, epoch, m["macro_f1"],
                        bar_now)
            result.stopped_early = result.pruned = True
            finished = True
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"fingerprint": fingerprint, **{k: v.state_dict() for k, v in parts.items()},
                          "rng": torch.get_rng_state(), "result": asdict(result), "best_state": best_state,
                          "bad_epochs": bad_epochs}, ckpt)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _resume(ckpt: Path | None, fingerprint: str, parts: dict[str, object],
            desc: str) -> tuple[TrainResult, dict | None, int, int]:
    """The state to go on from: a fresh start, or the checkpoint's when it was made with the same settings (its
    ``parts``' states and the RNG restored): (result so far, best weights, epochs without improvement, next epoch)."""
    if ckpt is None or not ckpt.is_file():
        return TrainResult(), None, 0, 1
    state = torch.load(ckpt, weights_only=True, map_location="cpu")  # loaded into weights wherever they are
    if state.get("fingerprint") != fingerprint:
        logger.info("%s: ignoring checkpoint %s made with other settings", desc, ckpt)
        return TrainResult(), None, 0, 1
    for name, part in parts.items():
        part.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])
    result = TrainResult(**state["result"])
    start_epoch = result.history[-1]["epoch"] + 1 if result.history else 1
    result.resumed_from_epoch = start_epoch - 1
    logger.info("%s: resuming after epoch %d from %s", desc, start_epoch - 1, ckpt)
    return result, state["best_state"], state["bad_epochs"], start_epoch


def _train_epoch(model: PreTrainedModel, objective: nn.Module, stepping: tuple, params: list, train: Encoded,
                 settings: TrainSettings, pad_id: int, epoch: int, result: TrainResult, progress: bool, desc: str,
                 compute: Compute = CPU) -> tuple[list[float], bool]:
    """One epoch of optimiser steps over seeded batches (``result.steps`` counts them) on ``compute``'s device,
    under its autocast (``stepping``: optimizer, scheduler and the loss scaler fp16 needs): (the batch losses,
    whether ``max_steps`` was reached)."""
    optimizer, scheduler, scaler = stepping
    model.train()
    objective.train()
    generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
    batches = epoch_batches(train, settings.batch_size, generator, settings.group_by_length)
    losses: list[float] = []
    left = settings.max_steps - result.steps if settings.max_steps is not None else len(batches)
    bar = progress_bar(batches, desc=f"{desc} epoch {epoch}/{settings.epochs}", disable=not progress, leave=False,
                       total=min(len(batches), left))  # its real length when max_steps stops the epoch early
    for index in bar:
        batch = to_device(collate(train, index, pad_id), compute.device)
        with torch.autocast(compute.device.type, dtype=compute.dtype, enabled=compute.dtype is not None):
            loss = objective(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {result.steps}: "
                                     "lower the learning rate or check the teacher logits")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        result.steps += 1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if settings.max_steps is not None and result.steps >= settings.max_steps:
            return losses, True
    return losses, False
