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


def test_a_gpu_run_may_drop_deterministic_algorithms_and_says_so_while_the_cpu_always_repeats():
    from transformers import BertConfig, BertForSequenceClassification

    from distillery.models.devices import Compute
    from distillery.models.randomness import seeded
    from distillery.models.training import CrossEntropyObjective, Encoded, TrainSettings, train_model

    assert compute_for("cpu", deterministic=False).deterministic  # the CPU's kernels repeat anyway
    fast = Compute(torch.device("cuda:0"), torch.bfloat16, deterministic=False)
    assert fast.describe() == "cuda:0 bf16 nondeterministic"  # recorded on the run and in the lineage
    assert Compute(torch.device("cuda:0"), torch.bfloat16).describe() == "cuda:0 bf16"  # tags made before stay
    try:
        with seeded(0, deterministic=False):
            assert not torch.are_deterministic_algorithms_enabled()
        # a training sets torch's process-wide switch to its own compute's: on for the CPU
        model = BertForSequenceClassification(BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=1, intermediate_size=8, num_labels=2))
        rows = Encoded.from_rows([[1, 2], [3]], torch.tensor([0, 1]))
        settings = TrainSettings(epochs=1, batch_size=2, learning_rate=1e-3, max_steps=1)
        result = train_model(model, CrossEntropyObjective(), rows, rows, settings, 0, progress=False)
        assert result.steps == 1 and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)


def test_batches_follow_the_model():
    model = torch.nn.Linear(2, 2)
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long)}
    assert model_device(model) == torch.device("cpu") and to_device(batch, model_device(model)) is batch
    assert model_device(object()) == torch.device("cpu")  # an ONNX Runtime session has no parameters


def test_trainings_side_by_side_take_one_gpu_each_in_turn_where_there_are_several():
    from distillery.flows.runners import spread_over_gpus
    from distillery.models.devices import spread_devices

    assert spread_devices("auto", 3, gpus=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert spread_devices("cuda", 2, gpus=4) == ["cuda:0", "cuda:1"]
    # one GPU, none, or a device named outright: every training where it was configured
    assert spread_devices("auto", 3, gpus=1) == ["auto"] * 3
    assert spread_devices("cuda:1", 2, gpus=4) == ["cuda:1"] * 2 and spread_devices("cpu", 2, gpus=4) == ["cpu"] * 2
    # a local Dask cluster here (no GPU, or one), threads (one training at a time), a remote cluster (its workers
    # resolve it among their own GPUs): the configuration itself for each
    for raw in ({"task_runner": "dask"}, {}, {"task_runner": "dask", "dask_address": "tcp://gpu-host:8786"}):
        cfg = config_from_dict({"runtime": raw})
        assert all(c is cfg for c in spread_over_gpus(cfg, 3))
    moved = cfg.on_device("cuda:1")  # the device is operational, never in the digest
    assert moved.runtime.device == "cuda:1" and moved.digest() == cfg.digest() and cfg.runtime.device == "auto"


def test_the_harness_moves_a_float_model_for_its_accuracy_passes_and_leaves_quantised_forms_where_they_run():
    from distillery.models.devices import placed_for_quality

    class Moves(torch.nn.Sequential):  # no GPU here: a float model that records where it is sent
        def to(self, device):  # noqa: ANN001, ANN202
            self.sent = [*getattr(self, "sent", []), str(device)]
            return self

    float_model = Moves(torch.nn.Linear(4, 2))
    int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 2)), {torch.nn.Linear},
                                                  dtype=torch.qint8)
    gpu = torch.device("cuda:1")
    with placed_for_quality(float_model, gpu) as placed:
        assert placed is float_model and float_model.sent == ["cuda:1"]
    assert float_model.sent == ["cuda:1", "cpu"]  # back on the CPU, where its latency is measured
    with placed_for_quality(int8, gpu) as placed:
        assert placed is int8  # torch INT8 runs the CPU's kernels: left there (moving it would fail)
    onnx_like = object()
    with placed_for_quality(onnx_like, gpu) as placed:
        assert placed is onnx_like
    for nowhere in (None, torch.device("cpu")):
        with placed_for_quality(float_model, nowhere):
            pass
    assert float_model.sent == ["cuda:1", "cpu"]  # never moved without a device other than the CPU
