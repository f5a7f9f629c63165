"""ONNX Runtime as an extra deployment target: export a classifier, quantise it to INT8, run it like a torch model.

``OnnxClassifier`` answers ``model(input_ids=..., attention_mask=...).logits`` with a torch tensor, so the one
evaluation harness (quality, latency, throughput) measures it exactly as it measures the torch candidates.
onnxruntime is imported lazily: the rest of the project does not need it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from distillery.models.modeling import ModelError

INPUTS = ("input_ids", "attention_mask")
OPSET = 17
INT8_FILE = "model-int8.onnx"  # inside a classifier folder: the ONNX Runtime INT8 form that is measured and served


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("the ONNX Runtime target needs onnxruntime and onnx: pip install onnxruntime onnx") from None
    return onnxruntime


def export_onnx(model: PreTrainedModel, path: Path, opset: int = OPSET) -> Path:
    """Export ``model`` (inputs input_ids, attention_mask; output logits) with dynamic batch and sequence axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.tensor([[model.config.pad_token_id or 0] * 8])
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["logits"] = {0: "batch"}
    tmp = path.with_suffix(".partial")
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: fast, and one self-contained file for a model of any size that fits in 2 GB
        torch.onnx.export(model, (), str(tmp), kwargs={"input_ids": example, "attention_mask": torch.ones_like(example)},
                          input_names=list(INPUTS), output_names=["logits"], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    tmp.replace(path)
    return path


class _QuantizerChatter(logging.Filter):
    """Drops what onnxruntime.quantization logs on the root logger below ERROR: a line per tensor it leaves alone
    and advice to pre-process (about 190 lines for the MPNet teacher). Attached to the root logger itself, it sees
    only records logged through it, never those of named loggers propagating up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        parts = Path(record.pathname).parts  # once per record: every record logged through root passes here
        return not ("onnxruntime" in parts and "quantization" in parts)


_QUIET = _QuantizerChatter()


def quantize_onnx_int8(source: Path, target: Path) -> Path:
    """Dynamic INT8 quantisation of the MatMul/Gemm weights (activations quantised on the fly), as for torch."""
    _onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().addFilter(_QUIET)  # once: a filter already there is not added again
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


STATIC_OPS = ("MatMul", "Gemm")  # static QDQ of every op breaks a transformer (measured: 1.5% accuracy on BANKING77)


def quantize_onnx_static(source: Path, target: Path, batches: list[dict], op_types: tuple[str, ...] | None = STATIC_OPS,
                         ) -> Path:
    """Static INT8 (QDQ) of ``source``'s ``op_types`` (None: every op), activations calibrated (min-max) on
    ``batches`` of encoded inputs (``{input_ids, attention_mask}`` as int64 arrays, e.g. training rows read with the
    model's own tokenizer). Written whole or not at all."""
    _onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not batches:
        raise ModelError("static INT8 needs calibration rows: none given")

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.rows, None)

    logging.getLogger().addFilter(_QUIET)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prepared, partial = target.with_name(f"{target.stem}-pre.onnx"), target.with_suffix(".partial")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(partial), Calibration(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types else None)
    finally:
        prepared.unlink(missing_ok=True)
    return partial.replace(target)


def calibration_batches(tokenizer, texts: list[str], max_length: int, size: int = 16) -> list[dict]:  # noqa: ANN001
    """``texts`` read with the model's own ``tokenizer``, in batches of ``size``, as the ONNX inputs static INT8 is
    calibrated on."""
    import numpy as np

    batches = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        batches.append({k: enc[k].astype(np.int64) for k in INPUTS})
    return batches


@dataclass
class _Output:
    logits: torch.Tensor


class _Config:
    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels


class OnnxClassifier:
    """An ONNX Runtime session behind the call signature of a transformers sequence classifier."""

    def __init__(self, path: Path, num_labels: int, threads: int = 1) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no ONNX model at {path}")
        self.path = path
        self.config = _Config(num_labels)
        self._sessions: dict[int, object] = {}
        self.use_threads(threads)
        names = {i.name for i in self.session.get_inputs()}
        if names != set(INPUTS):
            raise ModelError(f"{path} takes inputs {sorted(names)}, expected {list(INPUTS)}")

    def use_threads(self, threads: int) -> None:
        """Run on ``threads`` intra-op threads from now on (a session per thread count, made once): the harness
        times batch 1 on one thread and batch 32 on all cores."""
        if threads not in self._sessions:
            ort = _onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[threads] = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.session = self._sessions[threads]

    def eval(self) -> "OnnxClassifier":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Output:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.numpy(),
                                                  "attention_mask": attention_mask.numpy()})
        return _Output(torch.from_numpy(logits))

    def size_bytes(self) -> int:
        return self.path.stat().st_size


def export_onnx_int8(model: PreTrainedModel, target: Path, calibration: list[dict] | None = None) -> Path:
    """Export ``model`` and quantise it to INT8 at ``target`` (written whole or not at all): dynamically, or
    statically on ``calibration`` batches (``quantize_onnx_static``); the FP32 export is removed again."""
    target = Path(target)
    fp32 = export_onnx(model, target.with_name(f"{target.stem}-fp32.onnx"))
    try:
        if calibration is not None:
            return quantize_onnx_static(fp32, target, calibration)
        return quantize_onnx_int8(fp32, target.with_suffix(".partial")).replace(target)
    finally:
        fp32.unlink(missing_ok=True)


def onnx_int8(model: PreTrainedModel, folder: Path, name: str, threads: int = 1) -> OnnxClassifier:
    """Export ``model``, quantise it to ``folder/<name>-int8.onnx`` and open the INT8 session."""
    return OnnxClassifier(export_onnx_int8(model, Path(folder) / f"{name}-int8.onnx"), model.config.num_labels, threads)


def folder_onnx_int8(model: PreTrainedModel, folder: Path, threads: int = 1) -> OnnxClassifier:
    """The INT8 ONNX form kept in the classifier's own ``folder`` (``model-int8.onnx``), made once: the file the
    harness measures is the file registered and served with the folder."""
    path = Path(folder) / INT8_FILE
    if not path.is_file():
        export_onnx_int8(model, path)
    return OnnxClassifier(path, model.config.num_labels, threads)
