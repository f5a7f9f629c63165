"""The ONNX Runtime deployment target: export, INT8 quantisation and the shared evaluation harness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.models.evaluation import TimingSettings, evaluate_model
from distillery.models.modeling import ModelError, count_parameters, load_classifier, load_tokenizer
from distillery.models.onnx_runtime import (OnnxClassifier, calibration_batches, export_onnx, export_onnx_int8,
                                            onnx_int8, quantize_onnx_static)
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
    assert [p.name for p in tmp_path.iterdir()] == ["student-int8.onnx"]  # no FP32 export or partial file left
    assert int8.size_bytes() < export_onnx(model, tmp_path / "fp32" / "student.onnx").stat().st_size
    timing = TimingSettings(repeats=3, warmup=1, throughput_batches=1)
    reference, logits = evaluate_model(model, data, tokenizer.pad_token_id, len(LABELS), None, timing)
    m, _ = evaluate_model(int8, data, tokenizer.pad_token_id, len(LABELS), logits.argmax(1), timing,
                          parameters=count_parameters(model), size_bytes=int8.size_bytes())
    assert m["parameters"] == reference["parameters"] and m["size_mb"] == int8.size_bytes() / 1e6
    assert m["agreement"] >= 0.9 and m["latency_p95_ms"] >= m["latency_p50_ms"] > 0 and m["throughput_rps"] > 0


def test_static_int8_is_calibrated_on_rows_and_keeps_the_answers(tiny_teacher_dir, tmp_path):
    """Static INT8 (the quantisation variant benchmarks/run.py measures beside the served dynamic INT8): MatMul
    weights and activations quantised with scales calibrated on encoded rows; the answers stay the torch model's."""
    import onnx

    tokenizer = load_tokenizer(tiny_teacher_dir)
    model = load_classifier(tiny_teacher_dir).eval()
    data = _test_split(tokenizer)
    train, _ = make_frames()
    batches = calibration_batches(tokenizer, train["text"].tolist(), 16, size=4)
    assert {k: v.dtype for k, v in batches[0].items()} == {"input_ids": np.int64, "attention_mask": np.int64}
    static = OnnxClassifier(export_onnx_int8(model, tmp_path / "static.onnx", calibration=batches), len(LABELS))
    assert [p.name for p in tmp_path.iterdir()] == ["static.onnx"]  # no FP32 export, pre-processed or partial file
    ops = {node.op_type for node in onnx.load(str(tmp_path / "static.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops
    expected = predict_logits(model, data, tokenizer.pad_token_id)
    got = predict_logits(static, data, tokenizer.pad_token_id)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert not np.allclose(got, expected, atol=1e-6)  # it is quantised, not the FP32 graph
    with pytest.raises(ModelError, match="calibration rows"):
        quantize_onnx_static(export_onnx(model, tmp_path / "fp32.onnx"), tmp_path / "none.onnx", [])
    assert not (tmp_path / "none.onnx").exists()


def test_quantising_keeps_the_log_readable(tiny_teacher_dir, tmp_path, caplog):
    """onnxruntime.quantization logs a line per tensor on the root logger (about 190 for MPNet): none reach the
    run's log, while the root logger's other records and the named loggers' still do."""
    import logging

    model = load_classifier(tiny_teacher_dir).eval()
    with caplog.at_level(logging.INFO):
        onnx_int8(model, tmp_path, "student")
        logging.info("a root record from elsewhere")
        logging.getLogger("distillery.test").info("a named record")
    assert not [r for r in caplog.records if "onnxruntime" in Path(r.pathname).parts], \
        [r.getMessage() for r in caplog.records][:5]
    assert {r.getMessage() for r in caplog.records} >= {"a root record from elsewhere", "a named record"}


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


def test_onnx_int8_form_is_served_as_measured(tiny_teacher_dir, tmp_path):
    """student.deploy: onnx-int8: the INT8 file the harness measured is the file registered and served (same
    sha256), with the same answers; INT8 agrees with FP32 within a stated tolerance on this tiny model."""
    import hashlib
    import shutil

    import mlflow

    from distillery.integrations.served_model import ONNX_INT8_FILE
    from distillery.models.onnx_runtime import INT8_FILE, folder_onnx_int8

    assert INT8_FILE == ONNX_INT8_FILE  # two names (the served loader imports nothing of distillery), one file
    folder = tmp_path / "student"
    shutil.copytree(tiny_teacher_dir, folder)
    model, tokenizer = load_classifier(folder).eval(), load_tokenizer(folder)
    session = folder_onnx_int8(model, folder)
    digest = hashlib.sha256((folder / INT8_FILE).read_bytes()).hexdigest()
    assert folder_onnx_int8(model, folder).path == session.path  # made once, then reused as it is
    assert hashlib.sha256((folder / INT8_FILE).read_bytes()).hexdigest() == digest
    _, test = make_frames()
    texts = test["text"].tolist()
    data = encode(tokenizer, texts, 16, test["category"].map(LABELS.index))
    harness = predict_logits(session, data, tokenizer.pad_token_id)
    fp32 = predict_logits(model, data, tokenizer.pad_token_id)
    assert (harness.argmax(1) == fp32.argmax(1)).mean() >= 0.95  # INT8 vs FP32: >= 95% same answers
    np.testing.assert_allclose(harness, fp32, atol=0.1)  # and logits within 0.1
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        _check_served_onnx(folder, texts, harness, digest, tiny_teacher_dir, tmp_path / "artifacts")
    finally:
        mlflow.set_tracking_uri(previous_uri)


def _check_served_onnx(folder, texts, harness, digest, tiny_teacher_dir, artifacts) -> None:  # noqa: ANN001
    import hashlib
    import json

    import mlflow

    from distillery.integrations import registry
    from distillery.integrations.served_model import SERVING_FILE
    from distillery.models.onnx_runtime import INT8_FILE

    # an experiment of this store, artifacts in the test's folder: an earlier test may have left another store's
    # experiment active, and a SQLite store's default artifact root is ./mlruns
    experiment = mlflow.create_experiment("onnx-served", artifact_location=Path(artifacts).as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = registry.log_classifier(folder, quantize="onnx-int8", max_length=16)
    served = mlflow.pyfunc.load_model(info.model_uri)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "artifacts" / "classifier"
    assert json.loads((local / SERVING_FILE).read_text())["onnx_sha256"] == digest
    assert hashlib.sha256((local / INT8_FILE).read_bytes()).hexdigest() == digest
    requirements = (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements
    out = served.predict(texts)
    probs = torch.softmax(torch.from_numpy(harness), -1).numpy()
    assert list(out["label"]) == [LABELS[i] for i in harness.argmax(1)]
    np.testing.assert_allclose(out["confidence"].to_numpy(), probs.max(1), atol=2e-3)
    with pytest.raises(Exception, match="has no model-int8.onnx"):
        with mlflow.start_run(experiment_id=experiment):
            registry.log_classifier(tiny_teacher_dir, quantize="onnx-int8", max_length=16)


def test_onnx_int8_deploy_form_through_the_pipeline(teacher_project):
    """The harness measures teacher and student as ONNX Runtime INT8, the gate compares the student with the
    teacher's ONNX INT8 form (like for like), and the registered champion answers from that same file; here with a
    pruned vocabulary too (the two together: the export and the served loader read the pruned tokenizer)."""
    import hashlib
    import json

    import mlflow

    from distillery.integrations.registry import load_served_model
    from distillery.integrations.served_model import SERVING_FILE
    from tests.helpers import run_command

    result = run_command(teacher_project / "distillery.yaml", "distill",
                         {"student.deploy": "onnx-int8", "student.prune_vocab": True})
    assert result.decision.passed, result.decision.reasons
    # the student (and the baseline) read through a pruned vocabulary: smaller than the teacher's, exported as is
    teacher_vocab = len(load_tokenizer(Path(result.teacher.folder)))
    for trained in (result.best, result.baseline):
        assert len(load_tokenizer(Path(trained.folder))) < teacher_vocab
        assert load_classifier(Path(trained.folder)).config.vocab_size == len(load_tokenizer(Path(trained.folder)))
    metrics = result.evaluation.metrics
    assert {"teacher_int8_onnx", "student_int8_onnx"} <= set(metrics)
    served_form = metrics["student_int8_onnx"]  # timed end to end through the served loader, and paired
    assert served_form["served_latency_p50_ms"] > 0 and served_form["latency_ratio_paired"] > 0
    assert result.evaluation.ratios["served_path_over_bare_forward_latency"] == pytest.approx(
        served_form["served_latency_p50_ms"] / served_form["latency_p50_ms"])
    assert "interleaved" in {c["name"]: c["rule"] for c in result.decision.criteria}["latency_vs_int8_teacher"]
    rules = {c["name"]: c["rule"] for c in result.decision.criteria}
    assert "teacher_int8_onnx" in rules["latency_vs_int8_teacher"]
    assert "teacher_int8_onnx" in rules["accuracy_vs_int8_teacher"]
    accuracy = next(c for c in result.decision.criteria if c["name"] == "accuracy_vs_int8_teacher")
    assert accuracy["observed"] == pytest.approx(metrics["student_int8_onnx"]["accuracy"])
    harness_file = Path(result.best.folder) / "model-int8.onnx"
    assert metrics["student_int8_onnx"]["size_mb"] == pytest.approx(harness_file.stat().st_size / 1e6)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{teacher_project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("student", "champion")
    assert version.tags["deploy.form"] == "onnx-int8"
    model = load_served_model("models:/student@champion")
    served = model.unwrap_python_model().classifier
    assert served.session is not None and served.model is None  # ONNX Runtime, no torch model behind it
    local = Path(mlflow.artifacts.download_artifacts(f"models:/student/{version.version}")) / "artifacts"
    settings = json.loads((local / "classifier" / SERVING_FILE).read_text())
    assert settings["onnx_sha256"] == hashlib.sha256(harness_file.read_bytes()).hexdigest()
    _, test = make_frames()
    out = model.predict(test["text"].tolist())
    accuracy = (out["label"] == test["category"]).mean()
    assert accuracy == pytest.approx(metrics["student_int8_onnx"]["accuracy"], abs=0.03)
