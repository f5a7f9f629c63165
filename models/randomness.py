"""Seeded randomness that holds under any task runner.

torch's default generator is process-wide: dropout and random initialisation in one thread change what another
thread draws, so two trainings run side by side in threads with the same seed give different weights. Everything that
draws from it (building a student with a new head, a training run) does so inside ``seeded``, which holds one
process-wide lock: in threads, candidates then train one after another and each seed means one result; process-based
runners (Dask workers, one task each) still train them side by side.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

RNG_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int, deterministic: bool = True) -> Iterator[None]:
    """Hold the process's RNG lock and seed torch and numpy; torch's deterministic algorithms on (CPU results repeat)
    unless ``deterministic`` is false (a GPU's ``runtime.deterministic: false``: faster kernels, no exact repeat)."""
    with RNG_LOCK:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        yield
