"""The ONNX Runtime deployment target: export, INT8 quantisation and the shared evaluation harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.models.evaluation import TimingSettings, evaluate_model
from distillery.models.modeling import ModelError, count_parameters, load_classifier, load_tokenizer
from distillery.models.onnx_runtime import OnnxClassifier, export_onnx, onnx_int8
from distillery.models.training import collate, encode, predict_logits
from tests.helpers import LABELS, make_frames

pytest.importorskip("onnxruntime")


def _test_split(tokenizer):
    _, test = make_frames()
    return encode(tokenizer, test["text"], 16, test["category"].map(LABELS.index))


def test_exported_model_matches_torch_on_padded_batches(tiny_teacher_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    model = load_classifier(tiny_teacher_dir).eval()
    data = _test_split(tokenizer)
    session = OnnxClassifier(export_onnx(model, tmp_path / "teacher.onnx"), len(LABELS))
    batch = collate(data, list(range(min(8, len(data)))), tokenizer.pad_token_id)  # rows of unequal length
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    got = session(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(predict_logits(session, data, tokenizer.pad_token_id),
                               predict_logits(model, data, tokenizer.pad_token_id), atol=1e-4)


def test_int8_session_runs_through_the_harness(tiny_teacher_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    model = load_classifier(tiny_teacher_dir).eval()
    data = _test_split(tokenizer)
    int8 = onnx_int8(model, tmp_path, "student")
    assert not (tmp_path / "student.onnx").exists() and (tmp_path / "student-int8.onnx").is_file()
    assert int8.size_bytes() < export_onnx(model, tmp_path / "fp32" / "student.onnx").stat().st_size
    timing = TimingSettings(repeats=3, warmup=1, throughput_batches=1)
    reference, logits = evaluate_model(model, data, tokenizer.pad_token_id, len(LABELS), None, timing)
    m, _ = evaluate_model(int8, data, tokenizer.pad_token_id, len(LABELS), logits.argmax(1), timing,
                          parameters=count_parameters(model), size_bytes=int8.size_bytes())
    assert m["parameters"] == reference["parameters"] and m["size_mb"] == int8.size_bytes() / 1e6
    assert m["agreement"] >= 0.9 and m["latency_p95_ms"] >= m["latency_p50_ms"] > 0 and m["throughput_rps"] > 0


def test_missing_or_foreign_model_is_a_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(ModelError, match="no ONNX model"):
        OnnxClassifier(tmp_path / "absent.onnx", 3)
    # a model that is not a classifier export: one input named x
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(ModelError, match=r"takes inputs \['x'\]"):
        OnnxClassifier(foreign, 3)
