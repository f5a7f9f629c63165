"""The registered model in its served form: self-contained, the harness's predictions, any input shape, top-k."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import LABELS, free_port, make_frames, wait_http

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["please help card delivery today", "hello pin locked now", "quick question euro rate asap",
         "i need to know balance money again", "something else entirely"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_teacher_dir):
    """The tiny classifier logged and registered as distillery logs a student (INT8 served form, max length 16)."""
    import mlflow

    from distillery.integrations import registry

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("served", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = registry.log_classifier(tiny_teacher_dir, quantize="int8", max_length=16)
    version = mlflow.register_model(info.model_uri, "student")
    mlflow.MlflowClient().set_registered_model_alias("student", "champion", version.version)
    return {"uri": uri, "model_uri": info.model_uri, "store": store}


def test_model_travels_with_its_loader_and_declares_what_it_needs(logged):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel  # models-from-code: the loader file is inside the model
    code = next(local.rglob("served_model.py")).read_text()
    imported = {n.split(".")[0] for node in ast.walk(ast.parse(code))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                          else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])}
    # the standard library, the model's requirements, and what they bring: tokenizers and fsspec (the prediction
    # log's writer, imported only when the log is on) come with transformers (huggingface_hub)
    imported -= set(sys.stdlib_module_names)
    assert imported <= {"mlflow", "numpy", "pandas", "torch", "transformers", "tokenizers", "fsspec",
                        "onnxruntime"}, imported
    # onnxruntime only inside the onnx-int8 branch (this int8 model's requirements do not list it)
    top = {n.split(".")[0] for node in ast.parse(code).body
           for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])}
    assert "onnxruntime" not in top
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "pandas"}
    assert not any("distillery" in r for r in requirements)
    info = mlflow.models.get_model_info(logged["model_uri"])
    assert [p.name for p in info.signature.params] == ["top_k"]
    assert {c.name for c in info.signature.outputs.inputs} == {"label", "confidence", "top_k", "abstained"}
    assert info.saved_input_example_info is not None
    serving = json.loads(next(local.rglob("distillery-serving.json")).read_text())
    assert serving == {"quantize": "int8", "max_length": 16, "truncation": True}


def test_calibration_travels_with_the_model_and_low_confidence_abstains(logged, tiny_teacher_dir):
    """Temperature and abstention threshold logged with the model: calibrated confidences, out-of-scope below it."""
    import mlflow
    import torch

    from distillery.integrations import registry
    from distillery.models.modeling import load_classifier, load_tokenizer

    model, tokenizer = load_classifier(tiny_teacher_dir).eval(), load_tokenizer(tiny_teacher_dir)
    with torch.inference_mode():
        enc = tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits / 2.0, -1).numpy()
    ranked = np.sort(probs.max(1))
    threshold = float((ranked[1] + ranked[2]) / 2)  # two texts below it, three above
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("served").experiment_id):
        info = registry.log_classifier(tiny_teacher_dir, max_length=16, calibration={
            "calibration_temperature": 2.0, "abstain_below": threshold, "oos_label": "oos"})
    out = mlflow.pyfunc.load_model(info.model_uri).predict(TEXTS, params={"top_k": 2})
    np.testing.assert_allclose(out["confidence"].to_numpy(), probs.max(1), atol=1e-6)
    below = probs.max(1) < threshold
    assert below.sum() == 2
    assert list(out["abstained"]) == list(below)
    assert all(label == "oos" for label in out.loc[below, "label"])
    assert all(label in LABELS for label in out.loc[~below, "label"])
    assert all(k[0]["label"] in LABELS for k in out["top_k"])  # top_k still lists the known labels


def test_energy_score_abstention_matches_the_harness(logged, tiny_teacher_dir):
    """``abstain_score: energy``: the served model abstains exactly where the harness's score is below threshold."""
    import mlflow
    import torch

    from distillery.integrations import registry
    from distillery.models.calibration import in_scope_score
    from distillery.models.modeling import load_classifier, load_tokenizer

    model, tokenizer = load_classifier(tiny_teacher_dir).eval(), load_tokenizer(tiny_teacher_dir)
    with torch.inference_mode():
        enc = tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
        logits = model(**enc).logits.numpy()
    energy = in_scope_score(logits, 1.5, "energy")
    ranked = np.sort(energy)
    threshold = float((ranked[2] + ranked[3]) / 2)  # three texts below it
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("served").experiment_id):
        info = registry.log_classifier(tiny_teacher_dir, max_length=16, calibration={
            "calibration_temperature": 1.5, "abstain_below": threshold, "abstain_score": "energy", "oos_label": "none"})
    out = mlflow.pyfunc.load_model(info.model_uri).predict(TEXTS)
    assert list(out["abstained"]) == list(energy < threshold) and out["abstained"].sum() == 3
    assert set(out.loc[out["abstained"], "label"]) == {"none"}


def test_served_predictions_equal_the_harness(logged, tiny_teacher_dir):
    """What is served is what the harness measured: same INT8 form, same tokenizer settings, same answers."""
    import mlflow
    import torch

    from distillery.models.modeling import load_classifier, load_tokenizer, quantize_int8

    model = mlflow.pyfunc.load_model("models:/student@champion")
    texts = list(make_frames()[1]["text"]) + TEXTS + ["word " * 40]  # one text longer than max_length
    served = model.predict(texts, params={"top_k": len(LABELS)})

    harness = quantize_int8(load_classifier(tiny_teacher_dir).eval())
    tokenizer = load_tokenizer(tiny_teacher_dir)
    with torch.inference_mode():
        enc = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
        probs = torch.softmax(harness(**enc).logits, -1).numpy()
    names = [harness.config.id2label[i] for i in range(len(LABELS))]
    assert list(served["label"]) == [names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(served["confidence"].to_numpy(), probs.max(1), atol=1e-5)
    for row, p in zip(served["top_k"], probs):
        assert [x["label"] for x in row] == [names[i] for i in np.argsort(-p, kind="stable")]
        assert sum(x["probability"] for x in row) == pytest.approx(1.0, abs=1e-4)


def test_served_tokenising_equals_the_tokenizer(tiny_teacher_dir):
    """The served loader tokenises with the Rust backend directly (batch 1 is dominated by Python wrapping): the ids
    and masks equal the transformers tokenizer's for short, long (truncated), odd and batched texts."""
    from distillery.integrations.served_model import ServedClassifier
    from distillery.models.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_teacher_dir)
    texts = TEXTS + ["word " * 40, "", "  Ünïcödé café — emoji 🙂 pin!!", "x"]
    for max_length in (16, 64):
        served = ServedClassifier(tiny_teacher_dir, {"quantize": "fp32", "max_length": max_length})
        assert served._encoder is not None
        for batch in ([t] for t in texts) if max_length == 16 else [texts]:
            ours = served.encode(batch)
            theirs = tokenizer(batch, truncation=True, padding=True, max_length=max_length, return_tensors="np")
            np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
            np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    assert served.encode(["word " * 40])["input_ids"].shape[1] <= 64


def test_any_input_shape_top_k_and_empty(logged):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/student@champion")
    as_list = model.predict(TEXTS)
    assert list(as_list.columns) == ["label", "confidence", "top_k", "abstained"] and len(as_list) == len(TEXTS)
    assert not as_list["abstained"].any()  # no abstention threshold was logged
    assert set(as_list["label"]) <= set(LABELS)
    assert all(len(k) == 1 and k[0]["label"] == label for k, label in zip(as_list["top_k"], as_list["label"]))
    for other in (pd.Series(TEXTS), pd.DataFrame({"utterance": TEXTS}), pd.DataFrame({"text": TEXTS, "id": range(5)}),
                  np.array(TEXTS)):
        pd.testing.assert_frame_equal(model.predict(other), as_list)
    top3 = model.predict(TEXTS, params={"top_k": 3})
    assert [len(k) for k in top3["top_k"]] == [3] * len(TEXTS)
    assert all(k[0]["probability"] >= k[1]["probability"] >= k[2]["probability"] for k in top3["top_k"])
    assert len(model.predict([])) == 0 and list(model.predict([]).columns) == ["label", "confidence", "top_k",
                                                                                 "abstained"]
    with pytest.raises(MlflowException, match="every input must be a string"):
        model.predict([1, 2])
    with pytest.raises(MlflowException, match="top_k"):
        model.predict(TEXTS, params={"top_k": 0})


@pytest.mark.integration
def test_distillery_serve_answers_over_http_within_its_limits(logged, tmp_path):
    """`distillery serve` answers MLflow's scoring protocol on the champion; a text that is not a string is a 400
    (never coerced), a body, text count or text length over the limits a 413, and no answer repeats the body."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "MLFLOW_REGISTRY_URI": logged["uri"]}
    env["PATH"] = "/usr/bin:/bin"  # the command must not rely on the virtual environment being on PATH
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", "--model", "models:/student@champion",
                             "--port", str(port), "--set", "serving.max_body_bytes=20000",
                             "--set", "serving.max_texts=8", "--set", "serving.max_text_chars=300"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def post(body, raw: bytes | None = None) -> tuple[int, dict, bytes]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = resp.read()
                return resp.status, json.loads(answer), answer
        except urllib.error.HTTPError as err:
            answer = err.read()
            return err.code, json.loads(answer), answer

    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 120, proc, tmp_path / "serve.log")
        status, body, _ = post({"inputs": TEXTS, "params": {"top_k": 2}})
        assert status == 200, body
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in
                                                             _local_predictions(logged["uri"], TEXTS)]
        assert all(len(p["top_k"]) == 2 for p in body["predictions"])
        assert post({"inputs": []})[:2] == (200, {"predictions": []})
        status, body, _ = post({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
        assert status == 200 and len(body["predictions"]) == len(TEXTS)
        for bad in ({"inputs": [1, 2]}, {"inputs": [3, "x"]}, {"dataframe_records": [{"text": 3}]}):
            status, body, _ = post(bad)
            assert status == 400 and "every input must be a string" in body["message"], (bad, body)
        marker = "zqx" * 20
        cases = [({"inputs": [marker * 400]}, None, 413, "body larger than 20000 bytes"),
                 ({"inputs": ["a text"] * 9}, None, 413, "9 texts in one request; at most 8"),
                 ({"inputs": [marker * 6]}, None, 413, "text 0 has 360 characters; at most 300"),
                 (None, b'{"inputs": ["' + marker.encode() + b'"', 400, "not valid JSON")]
        for body_in, raw, code, reason in cases:
            status, body, answer = post(body_in, raw)
            assert status == code and reason in body["message"], (reason, body)
            assert marker.encode() not in answer and len(answer) < 500  # the body is never echoed
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def _local_predictions(uri: str, texts: list[str]) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model("models:/student@champion").predict(texts).to_dict("records")


@pytest.mark.slow
def test_loads_in_a_fresh_environment_without_the_project(logged, tmp_path):
    """A virtual environment built from the model's own requirements.txt loads models:/student@champion and predicts."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(local / "requirements.txt"),
                    "-c", str(ROOT / "requirements-lock.txt")], check=True, timeout=1200)
    code = ("import importlib.util as u, sys, mlflow; "
            "assert u.find_spec('distillery') is None, 'the project is installed here'; "
            "m = mlflow.pyfunc.load_model('models:/student@champion'); "
            "print(m.predict(sys.argv[1:], params={'top_k': 2}).to_json(orient='records'))")
    out = subprocess.run([str(py), "-c", code, *TEXTS], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": logged["uri"]})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["label"] for r in rows] == [p["label"] for p in _local_predictions(logged["uri"], TEXTS)]


def test_distillery_predict_reads_stdin_and_files(logged, tmp_path):
    """`distillery predict` answers with the champion (JSON lines or CSV); no champion is a clear error."""
    from tests.helpers import write_config

    write_config(tmp_path, tracking={"uri": logged["uri"]})
    run = lambda *args, stdin="": subprocess.run([sys.executable, "-m", "distillery", "predict", *args],  # noqa: E731
                                                 cwd=tmp_path, input=stdin, capture_output=True, text=True)
    out = run("--top-k", "2", stdin="\n".join(TEXTS) + "\n")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [p["label"] for p in _local_predictions(logged["uri"], TEXTS)]
    assert all(len(r["top_k"]) == 2 for r in rows)
    pd.DataFrame({"utterance": TEXTS}).to_parquet(tmp_path / "in.parquet")
    out = run("in.parquet", "--column", "utterance", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert list(pd.read_csv(__import__("io").StringIO(out.stdout))["label"]) == [r["label"] for r in rows]
    out = run("--model", "student@nosuchalias", stdin="hello\n")
    assert out.returncode == 2 and "no model student@nosuchalias" in out.stderr


def test_a_pickled_wrapper_whose_code_moved_is_a_clear_error(logged, tmp_path, monkeypatch):
    """What models registered before the self-contained loader look like now: one line saying what to do."""
    import importlib

    import mlflow

    from distillery.integrations import registry

    (tmp_path / "old_wrapper.py").write_text(
        "import mlflow.pyfunc\nclass Old(mlflow.pyfunc.PythonModel):\n"
        "    def predict(self, context, model_input, params=None):\n        return model_input\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    old = importlib.import_module("old_wrapper")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("served").experiment_id):
        info = mlflow.pyfunc.log_model(name="old", python_model=old.Old(), pip_requirements=["mlflow"])
    monkeypatch.delitem(sys.modules, "old_wrapper")
    (tmp_path / "old_wrapper.py").unlink()  # the code the pickle names is gone
    with pytest.raises(registry.TrackingError, match=r"registered by an older distillery.*distill --force"):
        registry.load_served_model(info.model_uri)


def read_log(folder: Path) -> pd.DataFrame:
    files = sorted(Path(folder).rglob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def test_the_prediction_log_records_each_request_off_the_request_path(logged, tmp_path):
    """Turned on by the model config: every text with its answer, time and model version, in parquet files under
    date folders, written by the background thread; with ``digest`` only the texts' SHA-256."""
    import hashlib

    import mlflow

    mlflow.set_tracking_uri(logged["uri"])
    model = mlflow.pyfunc.load_model("models:/student@champion", model_config={
        "prediction_log": str(tmp_path / "log"), "prediction_log_model": "student/1", "prediction_log_flush_s": 0.2})
    answers = [model.predict(TEXTS[:3]), model.predict(TEXTS[3:], params={"top_k": 2})]
    log = model.unwrap_python_model().log
    deadline = time.monotonic() + 20
    while log.written < len(TEXTS) and time.monotonic() < deadline:  # the background thread's interval
        time.sleep(0.1)
    rows = read_log(tmp_path / "log")
    assert len(rows) == len(TEXTS) and log.errors == 0 and log.lost == 0
    assert rows["text"].tolist() == TEXTS and set(rows["model"]) == {"student/1"}
    assert rows["label"].tolist() == [*answers[0]["label"], *answers[1]["label"]]
    assert [len(json.loads(t)) for t in rows["top_k"]] == [1, 1, 1, 2, 2]
    assert all(p.parent.name.startswith("date=") for p in (tmp_path / "log").rglob("part-*.parquet"))

    private = mlflow.pyfunc.load_model("models:/student@champion", model_config={
        "prediction_log": str(tmp_path / "digests"), "prediction_log_texts": "digest"})
    private.predict(TEXTS)
    private.unwrap_python_model().log.close()
    rows = read_log(tmp_path / "digests")
    assert rows["text"].isna().all()
    assert rows["text_sha256"].tolist() == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]


def test_the_environment_turns_the_log_on_beside_a_registered_models_default_config(tmp_path, monkeypatch):
    """A registered model's config carries the log's defaults (MLflow overrides only keys logged with the model):
    they never hide the environment's settings; a value set in the config wins over both."""
    from distillery.integrations.served_model import LOG_CONFIG, PredictionLog

    assert PredictionLog.from_settings(dict(LOG_CONFIG)) is None  # off by default
    monkeypatch.setenv("DISTILLERY_PREDICTION_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("DISTILLERY_PREDICTION_LOG_TEXTS", "digest")
    monkeypatch.setenv("DISTILLERY_PREDICTION_LOG_FLUSH_S", "0.5")
    monkeypatch.setenv("DISTILLERY_PREDICTION_LOG_MODEL", "student/4")
    log = PredictionLog.from_settings(dict(LOG_CONFIG))
    assert (log.uri, log.texts, log.flush_s, log.model) == (str(tmp_path / "log"), "digest", 0.5, "student/4")
    log.close()
    mine = PredictionLog.from_settings({**LOG_CONFIG, "prediction_log": str(tmp_path / "mine"),
                                        "prediction_log_flush_s": 2.0})
    assert (mine.uri, mine.texts, mine.flush_s) == (str(tmp_path / "mine"), "digest", 2.0)
    mine.close()


def test_a_prediction_log_that_cannot_be_written_never_fails_a_prediction(logged, tmp_path, caplog):
    import mlflow

    (tmp_path / "a-file").write_text("not a folder")
    mlflow.set_tracking_uri(logged["uri"])
    model = mlflow.pyfunc.load_model("models:/student@champion", model_config={
        "prediction_log": str(tmp_path / "a-file" / "log"), "prediction_log_flush_s": 3600})
    answers = [model.predict([t]) for t in TEXTS]
    assert all(len(a) == 1 for a in answers)
    log = model.unwrap_python_model().log
    with caplog.at_level("WARNING", logger="distillery.prediction_log"):
        log.flush()
        model.predict(TEXTS)
        log.flush()
    assert log.errors == 2 and log.lost == 2 * len(TEXTS) and log.written == 0
    warned = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warned) == 1 and "predictions go on" in warned[0].getMessage()  # once a minute, not per failure


def test_distillery_serve_logs_what_it_is_asked(logged, tmp_path):
    """`distillery serve` with the log on (the environment variable): the HTTP traffic lands in the log, with the
    version the server resolved."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "MLFLOW_REGISTRY_URI": logged["uri"],
           "DISTILLERY_PREDICTION_LOG": str(tmp_path / "log"), "DISTILLERY_PREDICTION_LOG_FLUSH_S": "0.2"}
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", "--model", "student@champion", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 120, proc, tmp_path / "serve.log")
        for text in TEXTS:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": [text]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 200
        deadline = time.monotonic() + 30
        while len(read_log(tmp_path / "log")) < len(TEXTS) and time.monotonic() < deadline:
            time.sleep(0.2)
        rows = read_log(tmp_path / "log")
        assert sorted(rows["text"]) == sorted(TEXTS) and set(rows["model"]) == {"student/1"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
