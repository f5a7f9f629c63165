"""The static-embedding student (models/static.py): made as model2vec makes its tables, trained by KD like any other
student, exported to ONNX, measured on the frontier and served by the registered loader alone."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.helpers import LABELS, build_tiny_model, make_frames, run_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, test = make_frames()
    return build_tiny_model(tmp_path_factory.mktemp("encoder") / "tiny", list(train["text"]) + list(test["text"]),
                            LABELS)


def test_a_static_student_is_made_from_an_encoder_and_answers_the_same_in_any_batch(encoder_dir: Path, tmp_path: Path):
    from distillery.models.modeling import ModelError, load_classifier, load_tokenizer, save_classifier
    from distillery.models.onnx_runtime import folder_onnx_int8
    from distillery.models.static import build_static_student, piece_vectors, piece_weights, static_table
    from distillery.models.vocabulary import prune_vocabulary

    train, _ = make_frames()
    texts = train["text"].tolist()
    encoder, tokenizer = load_classifier(encoder_dir), load_tokenizer(encoder_dir)
    vectors = piece_vectors(encoder, tokenizer)
    assert vectors.shape == (len(tokenizer), encoder.config.hidden_size) and np.isfinite(vectors).all()
    # each piece alone through the encoder, framed as a text is: the row is that text's mean-pooled output
    one = tokenizer.convert_tokens_to_ids("card") if "card" in tokenizer.get_vocab() else 7
    framed = torch.tensor([[tokenizer.cls_token_id, one, tokenizer.sep_token_id]])
    with torch.inference_mode():
        hidden = encoder.base_model(input_ids=framed, attention_mask=torch.ones_like(framed)).last_hidden_state
    assert np.allclose(vectors[one], hidden.mean(1)[0].numpy(), atol=1e-5)
    weights = piece_weights(tokenizer, texts, 16)
    # smooth inverse frequency: [CLS] is in every text and weighs least; a piece the texts never use weighs 1
    unused = next(i for i in range(len(tokenizer)) if i not in set(sum(tokenizer(texts)["input_ids"], [])))
    assert weights[tokenizer.cls_token_id] == weights.min() and weights[unused] == 1.0
    table = static_table(vectors, 8, weights, seed=0)
    assert table.shape == (len(tokenizer), 8)
    assert np.allclose(table, static_table(vectors, 8, weights, seed=0))  # seeded
    with pytest.raises(ModelError, match="at most 32"):
        static_table(vectors, 64, weights, seed=0)

    torch.manual_seed(0)
    model = build_static_student(encoder, tokenizer, LABELS, 8, texts, 16, seed=0)
    assert model.config.num_labels == len(LABELS) and model.get_input_embeddings().weight.shape == (len(tokenizer), 8)
    model, pruned = prune_vocabulary(model, tokenizer, texts[:10], 0, 16)
    model.eval()
    batch = pruned(texts[:4], padding=True, return_tensors="pt")
    together = model(**batch).logits.detach()
    alone = torch.cat([model(**pruned([t], return_tensors="pt")).logits.detach() for t in texts[:4]])
    assert torch.allclose(together, alone, atol=1e-5)  # padding never changes an answer
    folder = save_classifier(model, pruned, tmp_path / "static")
    again = load_classifier(folder).eval()  # the Auto classes know it: no remote code, no auto_map
    assert type(again).__name__ == "StaticEmbeddingClassifier" and "auto_map" not in json.loads(
        (folder / "config.json").read_text())
    assert torch.allclose(again(**batch).logits, together)
    onnx = folder_onnx_int8(again, folder)
    assert np.allclose(onnx(batch["input_ids"], batch["attention_mask"]).logits.numpy(), together.numpy(), atol=0.05)


def test_static_students_are_served_as_onnx_and_named_by_shape():
    from distillery.config import ConfigError, StudentConfig, config_from_dict

    from distillery.models.students import shape_learning_rate, shape_recipe
    from distillery.records import BASELINE, Candidate

    assert StudentConfig(init="static", hidden_size=64).label == "static64"
    assert StudentConfig(init="static", base_model="teacher", prune_vocab=True).label == "static256-teacher-pv"
    cfg = config_from_dict({"student": {"deploy": "onnx-int8", "frontier": [{"init": "static"}]}})
    assert list(cfg.student.frontier_shapes()) == ["static256"]
    # a static student learns at its own pace unless its shape says otherwise; other shapes follow the recipe
    assert shape_learning_rate(cfg.student.frontier_shapes()["static256"]) == 2e-3
    assert shape_learning_rate(cfg.student) is None
    assert shape_learning_rate(StudentConfig(init="static", learning_rate=0.01)) == 0.01
    # and with its own recipe: softer targets, more weight on the hard labels; other shapes take the chosen one
    chosen = Candidate("distilled", 4.0, 0.8, 0.2, 0.5, learning_rate=3e-4, trial=2)
    static = shape_recipe(cfg.student.frontier_shapes()["static256"], chosen)
    assert (static.temperature, static.kd_weight, static.ce_weight) == (1.0, 0.5, 0.5)
    assert (static.feature_weight, static.learning_rate, static.trial) == (0.5, 3e-4, 2)  # the rest as chosen
    assert shape_recipe(StudentConfig(pretrained_layers=[0, 5]), chosen) == chosen
    assert shape_recipe(StudentConfig(init="static"), BASELINE) == BASELINE  # hard labels stay hard
    own = config_from_dict({"student": {"frontier": [{"pretrained_layers": [0, 5],
                                                      "recipe": {"temperature": 2, "kd_weight": 1, "ce_weight": 0}}]}})
    assert shape_recipe(own.student.frontier_shapes()["minilm-cut0-5"], chosen).temperature == 2.0
    with pytest.raises(ConfigError, match="student.recipe: the student's recipe is distill"):
        config_from_dict({"student": {"recipe": {"temperature": 2, "kd_weight": 1, "ce_weight": 0}}})
    with pytest.raises(ConfigError, match="static-embedding students \\(static256\\) are served as their ONNX file"):
        config_from_dict({"student": {"deploy": "int8", "frontier": [{"init": "static"}]}})
    black_box = {"teacher": {"kind": "endpoint", "endpoint": {"url": "http://127.0.0.1:1/invocations"}},
                 "distill": {"feature_weight": 0.0}}
    config_from_dict({**black_box, "student": {"deploy": "onnx-int8", "frontier": [{"init": "static"}]}})
    with pytest.raises(ConfigError, match="static from a base model"):
        config_from_dict({**black_box, "student": {"frontier": [{"init": "static", "base_model": "teacher"}]}})


def test_a_static_student_on_the_frontier_is_distilled_measured_registered_and_served(teacher_project: Path):
    """A static student beside the cut student: trained by response KD at its own pace and with its own recipe,
    measured in its served ONNX form, chosen by gate.policy smallest, and served by the registered loader in a
    process without distillery."""
    overrides = {"student.deploy": "onnx-int8", "student.frontier": [{"init": "static", "base_model": "teacher",
                                                                        "hidden_size": 16, "learning_rate": 0.03}],
                 # the tiny teacher is underconfident (ECE ~0.5): the hard labels too, as for other small students
                 "distill.kd_weight": 0.5, "distill.ce_weight": 0.5, "distill.temperature": 2.0, "distill.epochs": 10,
                 "distill.patience": 10,
                 "distill.feature_weight": 0.5, "gate.policy": "smallest", "tracking.student_name": "student-static",
                 "gate.accuracy_tolerance": 1.0, "gate.macro_f1_tolerance": 1.0, "gate.max_class_f1_drop": 1.0,
                 "gate.max_latency_ratio": 100.0, "gate.champion_tolerance": 1.0, "gate.baseline": "off"}
    out = run_command(teacher_project / "distillery.yaml", overrides=overrides)
    metrics = out.evaluation.metrics
    assert out.evaluation.students == ("student", "static16-teacher")
    static = metrics["static16-teacher_int8_onnx"]  # measured in its served form
    assert static["size_mb"] < metrics["student_int8_onnx"]["size_mb"] and static["accuracy"] >= 0.5  # chance: 0.25
    assert out.decision.passed and out.decision.student == "static16-teacher"
    from distillery.config import load_config

    tracking = load_config(teacher_project / "distillery.yaml").tracking.uri
    mlflow.set_tracking_uri(tracking)
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_run(out.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{out.run_id}' and tags.stage = 'train-student'")
    trained = next(r for r in runs if r.info.run_name.startswith("static16"))
    assert float(trained.data.params["distill.learning_rate"]) == pytest.approx(0.03)  # its own pace
    assert float(trained.data.params["candidate.temperature"]) == 1.0  # its own recipe (the student's: T 2)
    student = next(r for r in runs if r.info.run_name.startswith("distill"))
    assert float(student.data.params["candidate.temperature"]) == 2.0
    assert trained.data.params["distill.feature_target"] == "none"  # no hidden states: response KD only
    assert "static table from teacher's encoder" in trained.data.params["student.weights_from"]
    script = ("import mlflow, sys; m = mlflow.pyfunc.load_model('models:/student-static@champion'); "
              "out = m.predict(['my card has not arrived', 'what is the exchange rate']); "
              "c = m.unwrap_python_model().classifier; "
              "assert c.model is None and c.session is not None, 'not the ONNX file'; "
              "assert not any(k.startswith('distillery') for k in sys.modules), 'distillery was imported'; "
              "print(list(out['label']))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=teacher_project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(label in LABELS for label in ast.literal_eval(done.stdout.strip().splitlines()[-1]))
