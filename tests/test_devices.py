"""runtime.device: where torch work runs, resolved once, with a clear error for a device that is not there."""

from __future__ import annotations

import pytest
import torch

from distillery.config import config_from_dict
from distillery.models.devices import CPU, compute_for, model_device, resolve_device, to_device
from distillery.models.folders import ModelError

pytestmark = pytest.mark.unit


def test_auto_is_a_gpu_when_torch_sees_one_and_the_cpu_otherwise():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == expected and str(resolve_device("cpu")) == "cpu"
    cpu = compute_for("cpu", mixed_precision=True)
    assert cpu == CPU and cpu.dtype is None and cpu.describe() == "cpu"  # the CPU always trains in float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_named_gpu_that_is_not_there_is_a_clear_error_and_a_bad_name_is_refused():
    with pytest.raises(ModelError, match=r"runtime.device cuda: torch sees 0 CUDA device\(s\)"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="cuda:3"):
        compute_for("cuda:3")
    with pytest.raises(ModelError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")
    with pytest.raises(Exception, match="runtime.device"):
        config_from_dict({"runtime": {"device": "gpu"}})
    # where it runs is not what it makes: the config digest (the champion's "up to date") ignores it
    assert config_from_dict({"runtime": {"device": "cpu"}}).digest() == config_from_dict({}).digest()


def test_batches_follow_the_model():
    model = torch.nn.Linear(2, 2)
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long)}
    assert model_device(model) == torch.device("cpu") and to_device(batch, model_device(model)) is batch
    assert model_device(object()) == torch.device("cpu")  # an ONNX Runtime session has no parameters
