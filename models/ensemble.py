"""An ensemble teacher (pure numpy/scipy): its members' probabilities, each calibrated by a temperature fitted on
validation, averaged with weights given or chosen on validation (the weights minimising the mixture's negative
log-likelihood there).

The mixture's log-probabilities are its logits: softmax of them gives the averaged probabilities back, so every
consumer of teacher logits (soft labels, the Great Expectations suites, the harness) reads an ensemble like any
other teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp, softmax

from distillery.config import ENSEMBLE_MEMBER
from distillery.errors import DistilleryError
from distillery.models.calibration import fit_temperature


class EnsembleError(DistilleryError, ValueError):
    """An ensemble that cannot be built as configured (a member reference, weights, member outputs that differ)."""


@dataclass(frozen=True)
class MemberRef:
    """One member as the config names it: ``name@alias`` or ``name/version``."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_member(text: str) -> MemberRef:
    """``name@alias`` or ``name/version`` of a registered model; an EnsembleError for anything else."""
    found = ENSEMBLE_MEMBER.match(text.strip())
    if found is None:
        raise EnsembleError(f"ensemble member {text!r} is not a registered model as name@alias or name/version "
                            "(e.g. teacher-large@production, minilm-teacher/3)")
    return MemberRef(found["name"], found["alias"], found["version"])


@dataclass(frozen=True)
class Combination:
    """How the members' logits become the ensemble's: a temperature and a weight per member (weights sum to 1)."""

    temperatures: tuple[float, ...]
    weights: tuple[float, ...]
    chosen_on_validation: bool

    def to_dict(self) -> dict:
        return {"temperatures": list(self.temperatures), "weights": list(self.weights),
                "chosen_on_validation": self.chosen_on_validation}

    @classmethod
    def from_dict(cls, data: dict) -> "Combination":
        return cls(tuple(data["temperatures"]), tuple(data["weights"]), bool(data["chosen_on_validation"]))


def combine(logits: list[np.ndarray], combination: Combination) -> np.ndarray:
    """The ensemble's logits (rows, classes): log of the weighted mean of the members' calibrated probabilities."""
    if len(logits) != len(combination.weights):
        raise EnsembleError(f"{len(logits)} members' logits for {len(combination.weights)} weights")
    shapes = {np.shape(z) for z in logits}
    if len(shapes) != 1:
        raise EnsembleError(f"the members answer differently shaped logits {sorted(shapes)}: they must label the same "
                            "rows with the same label set")
    # (members, rows, classes) log-probabilities, each at its own temperature
    log_p = np.stack([log_softmax(np.asarray(z, dtype=np.float64) / t, axis=1)
                      for z, t in zip(logits, combination.temperatures)])
    log_w = np.log(np.maximum(np.asarray(combination.weights, dtype=np.float64), 1e-300))[:, None, None]
    return logsumexp(log_p + log_w, axis=0).astype(np.float32)


def _mixture_nll(log_p: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Mean negative log-likelihood of the gold labels under the mixture (``log_p``: members, rows, classes)."""
    gold = log_p[:, np.arange(len(labels)), labels]  # (members, rows)
    return float(-np.mean(logsumexp(gold + np.log(np.maximum(weights, 1e-300))[:, None], axis=0)))


def fit_combination(val_logits: list[np.ndarray], val_labels: np.ndarray, weights: list[float] | None = None,
                    calibrate: bool = True) -> Combination:
    """Temperatures (``calibrate``: fitted per member on validation, else 1) and weights (given, normalised; or,
    with ``weights`` None, the point of the simplex minimising the mixture's validation NLL, from equal weights)."""
    labels = np.asarray(val_labels, dtype=np.int64)
    if len(labels) == 0:
        raise EnsembleError("an ensemble is calibrated and weighted on validation rows, and there are none")
    temperatures = tuple(fit_temperature(z, labels) if calibrate else 1.0 for z in val_logits)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(val_logits) or (w < 0).any() or w.sum() <= 0:
            raise EnsembleError(f"teacher.ensemble.weights {list(weights)} must give each of the {len(val_logits)} "
                                "members a non-negative weight, not all 0")
        return Combination(temperatures, tuple(float(x) for x in w / w.sum()), chosen_on_validation=False)
    log_p = np.stack([log_softmax(np.asarray(z, dtype=np.float64) / t, axis=1)
                      for z, t in zip(val_logits, temperatures)])
    # weights as a softmax of free parameters: the simplex without constraints; equal weights to start
    result = minimize(lambda theta: _mixture_nll(log_p, labels, softmax(theta)), np.zeros(len(val_logits)),
                      method="L-BFGS-B")
    w = softmax(result.x)
    return Combination(temperatures, tuple(float(x) for x in w), chosen_on_validation=True)
