"""`distillery teacher import`: an existing classifier becomes the teacher without training, labels matched by name."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.models.data import read_snapshot
from distillery.models.modeling import ModelError, classifier_head, load_classifier, load_tokenizer, save_classifier
from distillery.models.training import encode, predict_logits
from tests.helpers import LABELS, run_command


def _registry(project: Path):
    from distillery.config import load_config
    from distillery.integrations import registry

    cfg = load_config(project / "distillery.yaml")
    registry.configure_tracking(cfg)
    return cfg, registry.Registry.from_config(cfg)


def _teacher(project: Path, version: str = "production"):
    from distillery.tasks.teacher import resolve_teacher

    cfg, _ = _registry(project)
    return resolve_teacher.fn(cfg, version)


def _save_permuted(src: Path, dst: Path, order: list[int], names: list[str] | None = None) -> Path:
    """The same classifier saved with its outputs in another order (and, with ``names``, other label names)."""
    model, tokenizer = load_classifier(src), load_tokenizer(src)
    head = classifier_head(model)
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        head.bias.copy_(head.bias[order].clone())
    old = [model.config.id2label[i] for i in range(len(order))]
    new = names or [old[i] for i in order]
    model.config.id2label, model.config.label2id = dict(enumerate(new)), {n: i for i, n in enumerate(new)}
    return save_classifier(model, tokenizer, dst)


def _probabilities(folder: Path, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    model, tokenizer = load_classifier(folder).eval(), load_tokenizer(folder)
    logits = predict_logits(model, encode(tokenizer, texts, 16), tokenizer.pad_token_id)
    return torch.softmax(torch.from_numpy(logits), -1).numpy(), [model.config.id2label[i] for i in range(len(LABELS))]


@pytest.fixture(scope="module")
def reordered(teacher_project, tmp_path_factory) -> Path:
    """teacher v1 saved with its labels in reverse alphabetical order (a normal thing for a user's own model)."""
    folder = Path(_teacher(teacher_project, "1").folder)
    order = sorted(range(len(LABELS)), key=lambda i: LABELS[i], reverse=True)
    return _save_permuted(folder, tmp_path_factory.mktemp("byo") / "reordered", order)


def test_reordered_labels_are_mapped_by_name_and_nothing_changes(teacher_project, reordered):
    cfg, reg = _registry(teacher_project)
    original = _teacher(teacher_project, "1")
    result = run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(reordered))
    imported = result.teacher
    assert str(reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias).version) == str(imported.version)
    tags = reg.version(imported.name, imported.version).tags
    assert tags["teacher.source"] == str(reordered) and len(tags["teacher.source_sha256"]) == 64
    assert tags["teacher.imported"] == "true" and tags["teacher.labels_reordered"] == "true"
    v1 = reg.version(original.name, "1").tags
    assert float(tags["metric.val_accuracy"]) == pytest.approx(float(v1["metric.val_accuracy"]), abs=1e-6)
    assert "metric.test_accuracy" in tags
    # the registered teacher answers exactly as the original, now in the data's label order
    splits, labels = read_snapshot(Path(result.snapshot.path))
    texts = list(splits["test"]["text"])
    mine, mine_names = _probabilities(Path(imported.folder), texts)
    theirs, theirs_names = _probabilities(Path(original.folder), texts)
    assert mine_names == labels == theirs_names
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_a_foreign_label_set_is_refused_and_nothing_registered(teacher_project, tmp_path):
    cfg, reg = _registry(teacher_project)
    before = [v.version for v in reg.versions(cfg.teacher.registered_name)]
    alias = reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias).version
    foreign = _save_permuted(Path(_teacher(teacher_project, "1").folder), tmp_path / "foreign", [0, 1, 2, 3],
                             ["card_arrival", "exchange_rate", "mortgage", "top_up"])
    with pytest.raises(ModelError, match=r"lacks: \['pin_blocked'\].*data lacks: \['mortgage'\]"):
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(foreign))
    assert [v.version for v in reg.versions(cfg.teacher.registered_name)] == before
    assert str(reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias).version) == str(alias)


def test_a_teacher_below_the_floor_is_refused_before_registration(teacher_project, tiny_teacher_dir):
    """The random-init tiny model has the right labels but guesses: refused on the GX suite's floors."""
    cfg, reg = _registry(teacher_project)
    before = [v.version for v in reg.versions(cfg.teacher.registered_name)]
    with pytest.raises(ModelError, match=r"refused, nothing registered: validation accuracy .* < 0.9"):
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(tiny_teacher_dir),
                    overrides={"validation.min_teacher_accuracy": 0.9})
    assert [v.version for v in reg.versions(cfg.teacher.registered_name)] == before


def test_generic_label_names_and_pickle_weights_are_clear_errors(teacher_project, tmp_path):
    from distillery.integrations.registry import TrackingError

    generic = _save_permuted(Path(_teacher(teacher_project, "1").folder), tmp_path / "generic", [0, 1, 2, 3],
                             [f"LABEL_{i}" for i in range(4)])
    with pytest.raises(ModelError, match="has no label names"):
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(generic))
    pickled = tmp_path / "pickled"
    shutil.copytree(generic, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(TrackingError, match="no transformers classifier with safetensors weights.*pytorch_model.bin"):
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(pickled))


def test_import_from_mlflow_uris_transformers_flavour_and_registered(teacher_project, reordered):
    """The MLflow transformers flavour (runs:/...) and a registered distillery model (models:/name/version)."""
    import mlflow

    cfg, reg = _registry(teacher_project)
    model, tokenizer = load_classifier(reordered), load_tokenizer(reordered)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id) as run:
        mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer}, name="hf",
                                      task="text-classification", pip_requirements=["transformers"])
    flavour = run_command(teacher_project / "distillery.yaml", "import-teacher",
                          teacher_source=f"runs:/{run.info.run_id}/hf").teacher
    again = run_command(teacher_project / "distillery.yaml", "import-teacher",
                        teacher_source=f"models:/{cfg.teacher.registered_name}/1").teacher
    v1 = float(reg.version(cfg.teacher.registered_name, "1").tags["metric.val_accuracy"])
    for imported in (flavour, again):
        tags = reg.version(imported.name, imported.version).tags
        assert float(tags["metric.val_accuracy"]) == pytest.approx(v1, abs=1e-6)
    assert reg.version(again.name, again.version).tags["teacher.labels_reordered"] == "false"
    assert str(reg.alias_version(cfg.teacher.registered_name, cfg.teacher.alias).version) == str(again.version)


def test_a_bare_encoder_is_refused_and_a_new_head_is_said_in_a_line(teacher_project, tiny_teacher_dir, tmp_path,
                                                                     caplog):
    """transformers would give an encoder without a head a random one (and print a table about it): importing it
    as a teacher is a clear error instead, and a student's deliberate new head is one line of the log."""
    from transformers import AutoModel

    cfg, reg = _registry(teacher_project)
    before = [v.version for v in reg.versions(cfg.teacher.registered_name)]
    encoder = tmp_path / "encoder"
    AutoModel.from_pretrained(str(tiny_teacher_dir), local_files_only=True).save_pretrained(str(encoder))
    load_tokenizer(tiny_teacher_dir).save_pretrained(str(encoder))
    with pytest.raises(ModelError, match=r"not a complete classifier: it has no weights for classifier\.bias, "
                                         r"classifier\.weight .*teacher\.base_model"):
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(encoder))
    assert [v.version for v in reg.versions(cfg.teacher.registered_name)] == before
    transformers_log = logging.getLogger("transformers.modeling_utils")  # it does not propagate: listen there
    transformers_log.addHandler(caplog.handler)
    caplog.clear()  # making the encoder above printed a report: it was not load_classifier's
    try:
        with caplog.at_level("INFO", logger="distillery.models.modeling"):
            model = load_classifier(tiny_teacher_dir, [*LABELS, "extra"])
    finally:
        transformers_log.removeHandler(caplog.handler)
    assert model.config.num_labels == len(LABELS) + 1
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert [r.getMessage() for r in caplog.records if "new head" in r.getMessage()] == [
        f"{tiny_teacher_dir}: a new head for 5 labels (classifier.bias, classifier.weight initialised at random)"]


def _damaged(reordered: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / damage.replace(" ", "-")
    shutil.copytree(reordered, folder)
    if damage == "garbage weights":
        (folder / "model.safetensors").write_bytes(b"\x07" * 4096)
    elif damage == "config not JSON":
        (folder / "config.json").write_text("{'hidden_size': 32,")
    elif damage == "vocab of 10^9":
        import json

        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10**9}))
    elif damage == "auto_map in the tokenizer config":
        import json

        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["my_tokenizer.MyTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


@pytest.mark.parametrize("damage, message", [
    ("garbage weights", "is not a readable safetensors file"),
    ("config not JSON", "config.json is not JSON"),
    ("vocab of 10^9", "vocab_size=1000000000 out of range"),
    ("auto_map in the tokenizer config", "needs custom code (tokenizer_config.json (auto_map))"),
])
def test_a_bad_teacher_folder_is_one_line_before_anything_is_allocated(teacher_project, reordered, tmp_path, damage,
                                                                       message):
    cfg, reg = _registry(teacher_project)
    before = [v.version for v in reg.versions(cfg.teacher.registered_name)]
    folder = _damaged(reordered, tmp_path, damage)
    with pytest.raises(ModelError) as refused:
        run_command(teacher_project / "distillery.yaml", "import-teacher", teacher_source=str(folder))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert [v.version for v in reg.versions(cfg.teacher.registered_name)] == before


def test_a_config_far_larger_than_its_weights_or_the_limit_is_refused(reordered, tmp_path):
    """A config within every field's range that still describes a model its weights cannot fill (transformers would
    allocate it first), or one over teacher.max_parameters."""
    import json

    from distillery.models.folders import check_classifier_folder

    folder = tmp_path / "wide"
    shutil.copytree(reordered, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 400_000, "hidden_size": 1024}))
    with pytest.raises(ModelError, match="does not belong to these weights"):
        check_classifier_folder(folder)
    with pytest.raises(ModelError, match="over the limit of 1,000"):
        check_classifier_folder(reordered, max_parameters=1000)
    assert check_classifier_folder(reordered)["id2label"]  # a sound folder passes, its config returned


def test_the_cli_refuses_a_garbage_weights_file_in_one_line(teacher_project, reordered, tmp_path):
    import subprocess
    import sys

    folder = _damaged(reordered, tmp_path, "garbage weights")
    out = subprocess.run([str(Path(sys.executable).parent / "distillery"), "teacher", "import", str(folder)],
                         cwd=teacher_project, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    closing = [line for line in out.stderr.splitlines() if line.startswith("distillery teacher:")]
    assert len(closing) == 1 and "ModelError" in closing[0] and "safetensors" in closing[0]
