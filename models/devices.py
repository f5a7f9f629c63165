"""Where torch work runs: ``runtime.device`` resolved to a torch device, with the mixed precision it allows.

``auto`` is the first CUDA GPU when torch sees one, else the CPU (Apple's ``mps`` only when named). Mixed precision
(``runtime.mixed_precision``) applies on CUDA only: bf16 where the GPU supports it, else fp16 with loss scaling; the
CPU always trains in float32, so a seed there still gives bit-identical weights. With ``runtime.deterministic`` a GPU
uses deterministic algorithms (torch's, warning where an op has none) and cuBLAS's fixed workspace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from distillery.config import DEVICE_PATTERN
from distillery.models.folders import ModelError


@dataclass(frozen=True)
class Compute:
    """A device, the autocast dtype of training on it (None: float32) and whether it uses deterministic algorithms
    (always on the CPU)."""

    device: torch.device
    dtype: torch.dtype | None = None
    deterministic: bool = True

    @property
    def scales_loss(self) -> bool:
        """fp16 needs its loss scaled so small gradients do not underflow (bf16 does not)."""
        return self.dtype == torch.float16

    def describe(self) -> str:
        """As recorded on runs and in the lineage: ``cpu``, ``cuda:0 bf16``, ``cuda:0 bf16 nondeterministic``."""
        precision = {torch.bfloat16: " bf16", torch.float16: " fp16"}.get(self.dtype, "") if self.dtype else ""
        return f"{self.device}{precision}{'' if self.deterministic else ' nondeterministic'}"


CPU = Compute(torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    """``runtime.device`` as a torch device; ModelError when the named one is not there."""
    if not re.match(DEVICE_PATTERN, name):
        raise ModelError(f"runtime.device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ModelError(f"runtime.device {name}: torch sees {count} CUDA device(s) (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use auto or cpu")
        return torch.device(f"cuda:{index}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("runtime.device mps: torch sees no Apple GPU (MPS); use auto or cpu")
    return torch.device(name)


def spread_devices(device: str, jobs: int, gpus: int | None = None) -> list[str]:
    """The device of each of ``jobs`` trainings that run side by side: with ``auto`` or ``cuda`` and several CUDA
    GPUs (``gpus``: how many torch sees here, by default), one GPU each in turn; otherwise ``device`` for all."""
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device not in ("auto", "cuda") or gpus < 2:
        return [device] * jobs
    return [f"cuda:{n % gpus}" for n in range(jobs)]


def compute_for(device: str, mixed_precision: bool = False, deterministic: bool = True) -> Compute:
    """Where and in what precision to train under these settings (CUDA's deterministic mode set on the way)."""
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return Compute(resolved)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS first runs
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # train_model sets it again for its run
    if not mixed_precision:
        return Compute(resolved, None, deterministic)
    return Compute(resolved, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, deterministic)


def _quantised(model: torch.nn.Module) -> bool:
    """Torch dynamic INT8 (its kernels are the CPU's)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


@contextmanager
def placed_for_quality(model: object, device: torch.device | None) -> Iterator[object]:
    """``model`` on ``device`` for its accuracy passes (a torch float model on a GPU) and back on the CPU after, where
    its latency is measured; an ONNX Runtime session, a torch INT8 model, or no device other than the CPU: as it is."""
    movable = device is not None and device.type != "cpu" and isinstance(model, torch.nn.Module)
    if not movable or _quantised(model):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (no copy when it is there already)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_device(model: object) -> torch.device:
    """Where a model's weights are (the CPU for one without parameters, or an ONNX Runtime session)."""
    parameters = getattr(model, "parameters", None)
    return next((p.device for p in parameters()), torch.device("cpu")) if callable(parameters) else torch.device("cpu")
