from __future__ import annotations

from pathlib import Path

import pytest

from distillery.config import (
    ConfigError,
    config_from_dict,
    load_config,
    parse_override_args,
    without_later_defaults,
)

ROOT = Path(__file__).resolve().parent.parent


def test_project_config_loads_and_resolves_paths_against_its_folder():
    cfg = load_config(ROOT / "distillery.yaml")
    assert cfg.path(cfg.data.snapshot_dir) == ROOT / "data"
    assert cfg.student.base_model == "minilm" and not cfg.student.prune_vocab
    assert list(cfg.student.frontier_shapes()) == ["minilm-cut0-2-4-pv", "minilm-cut0-5-pv"]
    assert cfg.distill.sweep.temperature == () and cfg.distill.sweep.kd_weight == ()


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "distillery.yaml", {"distill.temperature": "2", "student.layers": "[0, 2, 4]",
                                                 "data.transfer_set": "null"})
    assert cfg.distill.temperature == 2.0
    assert cfg.student.layers == (0, 2, 4)
    assert cfg.data.transfer_set is None
    # YAML 1.1 reads a bare off/on as a boolean: the choices that have those words get them back
    cfg = load_config(ROOT / "distillery.yaml", {"gate.baseline": "off", "evaluation.abstain": "on"})
    assert (cfg.gate.baseline, cfg.evaluation.abstain) == ("off", "on")


def test_digest_changes_with_a_knob_not_with_root():
    a = config_from_dict({}, root="/tmp/a")
    b = config_from_dict({}, root="/tmp/b")
    c = config_from_dict({"distill": {"kd_weight": 0.5}})
    assert a.digest() == b.digest() != c.digest()


def test_a_key_added_later_keeps_digests_and_teacher_checkpoint_keys_while_at_its_default():
    # a teacher fine-tune checkpointed before teacher.llm.structured_output existed must resume after an upgrade
    default = config_from_dict({})
    enforcing = config_from_dict({"teacher": {"llm": {"structured_output": "json_schema"}}})
    old_teacher = default.teacher.model_dump()
    old_teacher["llm"].pop("structured_output")
    assert without_later_defaults(default.teacher.model_dump(), "teacher") == old_teacher
    assert "structured_output" in without_later_defaults(enforcing.teacher.model_dump(), "teacher")["llm"]
    assert "taught_by" not in without_later_defaults(default.to_dict())["student"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"distill": {"temperature": 0}}, "distill.temperature must be > 0"),
        ({"distill": {"kd_weight": 0, "ce_weight": 0}}, "must not all be 0"),
        ({"data": {"validation_fraction": 0.7}}, "data.validation_fraction"),
        ({"student": {"init": "grow"}}, "student.init"),
        ({"student": {"layers": [1, 1]}}, "distinct"),
        ({"runtime": {"task_runner": "ray"}}, "runtime.task_runner"),
        ({"distill": {"epochs": "many"}}, "distill.epochs: Input should be a valid integer"),
        ({"teacher": {"learning_rate": [1]}}, "teacher.learning_rate: Input should be a valid number"),
        ({"teacher": {"group_by_length": "yes"}}, "teacher.group_by_length: Input should be a valid boolean"),
        ({"data": {"snapshot_dir": "/tmp/elsewhere"}}, "data.snapshot_dir must be a folder inside the project"),
        ({"data": {"snapshot_dir": "."}}, "data.snapshot_dir must be a folder inside the project"),
        ({"runtime": {"lock": "redis"}}, "runtime.lock"),
        ({"distil": {}}, "unknown configuration key(s): distil"),
        ({"gate": {"max_latency": 0.5}}, "gate.max_latency"),
        ({"student": {"init": "pretrained"}, "distill": {"feature_target": "hidden"}}, "needs a student that reads"),
        ({"distill": {"feature_target": "layers"}}, "distill.feature_target"),
        ({"distill": {"sweep": {"feature_weight": [-1]}}}, "distill.sweep.feature_weight"),
        ({"distill": {"search": {"feature_weight": [0.5, 0.1]}}}, "distill.search.feature_weight"),
        ({"gate": {"accuracy_tolerance": 1.5}}, "gate.accuracy_tolerance must be in .0, 1."),
        ({"gate": {"champion_tolerance": -0.1}}, "gate.champion_tolerance must be in .0, 1."),
        ({"teacher": {"max_parameters": 0}}, "teacher.max_parameters"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw)


def test_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")


def test_cli_override_syntax():
    assert parse_override_args(["a.b=1", "c.d=[1, 2]"]) == {"a.b": "1", "c.d": "[1, 2]"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override_args(["novalue"])


def test_config_is_frozen_and_typed():
    import pydantic

    cfg = config_from_dict({"student": {"layers": [0, 3]}})
    assert cfg.student.layers == (0, 3)
    with pytest.raises(pydantic.ValidationError):
        cfg.student.init = "config"  # one load per run: nobody downstream can change what was loaded


def test_profiles_extend_the_project_config(tmp_path):
    """A profile file holds only what differs; it equals the same keys given as overrides, and paths resolve
    against the base file's folder."""
    root = ROOT
    fast = load_config(root / "configs" / "fast.yaml")
    assert fast == load_config(root / "distillery.yaml", {
        "teacher.base_model": "minilm", "teacher.registered_name": "teacher", "teacher.epochs": 8,
        "teacher.learning_rate": 1.5e-4, "tracking.student_name": "student", "student.init": "cut",
        "student.layers": [0, 5], "student.prune_vocab": True, "student.frontier": [], "distill.epochs": 8,
        "distill.search.trials": 10, "distill.search.parallel": 1, "distill.search.timeout_s": 1800,
        "distill.search.start_configured": False,
        "gate.policy": "best", "data.augment.multiple": 0,
        "gate.accuracy_tolerance": 0.03, "gate.macro_f1_tolerance": 0.03})
    assert fast.root == str(root) and not fast.distill.sweep.kd_weight  # untouched keys come from the base
    default = load_config(root / "distillery.yaml")  # the default: an MPNet teacher, a pretrained MiniLM student
    assert (default.teacher.base_model, default.student.init, default.student.base_model) == ("mpnet", "pretrained",
                                                                                              "minilm")
    assert {default.teacher.registered_name, default.tracking.student_name}.isdisjoint(
        {fast.teacher.registered_name, fast.tracking.student_name})  # no profile takes another's models
    (tmp_path / "profiles").mkdir()
    (tmp_path / "base.yaml").write_text("data:\n  source: src\n")
    (tmp_path / "profiles" / "p.yaml").write_text("extends: ../base.yaml\ndata:\n  seed: 7\n")
    cfg = load_config(tmp_path / "profiles" / "p.yaml")
    assert cfg.data.seed == 7 and cfg.path(cfg.data.source) == tmp_path / "src"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="in a loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path / "c.yaml")


def test_frontier_shapes_are_checked_and_named():
    cut = {"init": "cut", "prune_vocab": False}  # a cut of the teacher, full vocabulary (not the default student)
    cfg = config_from_dict({"student": {**cut, "frontier": [
        {"layers": [0]}, {"init": "config", "hidden_size": 192, "num_attention_heads": 4}]}})
    shapes = cfg.student.frontier_shapes()
    assert list(shapes) == ["cut0", "h192x2"] and cfg.student.label == "cut0-5"
    assert shapes["h192x2"].deploy == cfg.student.deploy and shapes["h192x2"].frontier == ()
    assert cfg.for_student({"layers": [0]}).student.layers == (0,) and cfg.student.layers == (0, 5)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"student": {**cut, "frontier": [{"deploy": "fp32"}, {"layers": [0, 5]}, {"layers": "x"},
                                                   {"init": "config", "hidden_size": 102}]},
                          "gate": {"policy": "cheapest"}})
    text = str(err.value)
    assert "student.frontier[0]: unknown or fixed key(s) ['deploy']" in text
    assert "student.frontier[1]: shape cut0-5 is already a student" in text
    assert "student.frontier[2]" in text and "student.frontier[3]: hidden_size must be divisible" in text
    assert "gate.policy must be 'best' or 'smallest'" in text
    # the default profile's student made static: its frontier's cuts mean nothing for it, and the error says what to do
    with pytest.raises(ConfigError, match=r"already a student .*student.frontier: \[\] to train the student alone"):
        load_config(ROOT / "distillery.yaml", {"student.init": "static"})


def test_feature_target_auto_follows_the_tokenizer():
    assert config_from_dict({"student": {"init": "cut"}}).feature_target == "hidden"  # reads with the teacher's tokenizer
    assert config_from_dict({"student": {"init": "config"}}).feature_target == "hidden"
    assert config_from_dict({"student": {"init": "pretrained"}}).feature_target == "pooled"
    assert config_from_dict({"distill": {"feature_target": "pooled"}}).feature_target == "pooled"
