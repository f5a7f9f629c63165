"""The audit proves what it says and the gate cannot be walked around: a corrupted DVC remote, a hand-registered model
wearing a promoted version's tags, and edited lineage tags each fail `lineage --verify` or are refused by `promote`,
naming the check (tiny models, a real Prefect harness, MLflow on SQLite, DVC with a local remote)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distillery.config import load_config
from distillery.commands.admin import SNAPSHOT_CHECK, lineage_of, promote_version, status_of, verify_lineage
from distillery.integrations import provenance
from distillery.integrations.registry import Registry
from distillery.models.gate import GateError
from distillery.records import DECISION_TAG, PENDING, PROMOTED, SIGNATURE_TAG
from distillery.integrations.promotion import reconcile
from tests.helpers import fault_row, run_command

TOLERANT = {"gate.champion_tolerance": 1.0}


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def promoted(teacher_project: Path) -> dict:
    """A champion made by the gate (the module's first promotion)."""
    out = run_command(teacher_project / "distillery.yaml", overrides=TOLERANT, force=True)
    assert out.decision.passed
    cfg = load_config(str(teacher_project / "distillery.yaml"), TOLERANT)
    return {"root": teacher_project, "cfg": cfg, "version": out.decision.version, "run_id": out.run_id}


def _failed(checks: list) -> dict[str, str]:
    return {name: detail for name, ok, detail in checks if not ok}


def _verify(promoted: dict, ref: str | None = None) -> dict[str, str]:
    cfg = promoted["cfg"]
    return _failed(verify_lineage(cfg, lineage_of(cfg, ref or f"student/{promoted['version']}")))


def test_a_gated_champion_verifies(promoted: dict):
    assert _verify(promoted) == {}


def _remote_object(root: Path, md5: str) -> Path:
    return root / ".distillery" / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]


def _snapshot_files(root: Path) -> dict[str, str]:
    """relpath -> md5 of each file of the snapshot data.dvc records (from its .dir listing in the remote)."""
    import json

    from distillery.integrations.store import snapshot_md5

    listing = json.loads(_remote_object(root, snapshot_md5(root / "data.dvc")).read_text())
    return {entry["relpath"]: entry["md5"] for entry in listing}


@pytest.mark.parametrize("damage", ["flip a byte of train.parquet", "replace labels.json"])
def test_a_corrupted_remote_fails_verification(promoted: dict, damage: str):
    root = promoted["root"]
    files = _snapshot_files(root)
    target = _remote_object(root, files["train.parquet" if "train" in damage else "labels.json"])
    original = target.read_bytes()
    target.chmod(0o644)
    try:
        if "flip" in damage:
            middle = len(original) // 2
            target.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:])
        else:
            target.write_bytes(b'["a", "b"]\n')
        champion = _client(root).get_model_version_by_alias("student", "champion").version
        failed = _verify(promoted)
        said = set(failed) == {SNAPSHOT_CHECK} and "hashes to" in failed[SNAPSHOT_CHECK]
    finally:
        target.write_bytes(original)
    unchanged = _client(root).get_model_version_by_alias("student", "champion").version == champion
    fault_row(f"corrupted DVC remote ({damage})", "lineage --verify FAILED on the snapshot check, every other "
              "check ok; after the repair it verifies", unchanged and _verify(promoted) == {}, said)


def _register_impostor(promoted: dict) -> str:
    """Another model (the teacher's) registered as a student version wearing the champion's tags."""
    client = _client(promoted["root"])
    champion = client.get_model_version("student", promoted["version"])
    teacher = client.get_model_version("teacher", "1")
    tags = {k: v for k, v in champion.tags.items()}
    impostor = client.create_model_version("student", teacher.source, run_id=teacher.run_id, tags=tags)
    return str(impostor.version)


def test_a_hand_registered_model_is_refused_and_fails_verification(promoted: dict):
    cfg, client = promoted["cfg"], _client(promoted["root"])
    impostor = _register_impostor(promoted)
    before = str(client.get_model_version_by_alias("student", "champion").version)
    with pytest.raises(GateError) as refused:
        promote_version(cfg, impostor, "looks fine")
    refused_said = provenance.FILES_CHECK in str(refused.value) and provenance.NAMES_CHECK in str(refused.value)
    kept = str(client.get_model_version_by_alias("student", "champion").version) == before
    failed = _verify(promoted, f"student/{impostor}")
    verify_said = provenance.FILES_CHECK in failed and provenance.NAMES_CHECK in failed

    # someone moves the alias with a plain MLflow client: status says so, and reconciliation never marks it gated
    client.set_model_version_tag("student", impostor, DECISION_TAG, PENDING)
    client.set_registered_model_alias("student", "champion", impostor)
    try:
        state = status_of(cfg)
        warned = any(provenance.FILES_CHECK in f for f in state["champion"]["integrity_failures"])
        reconcile(cfg, Registry.from_config(cfg), logging.getLogger("test"))
        never_gated = client.get_model_version("student", impostor).tags[DECISION_TAG] == PENDING
    finally:
        client.set_registered_model_alias("student", "champion", before)
        client.delete_model_version("student", impostor)
    fault_row("another model registered by hand with a promoted version's tags, then promote --version",
              "promote refused (files not the measured bytes; runs name another version), alias unchanged; verify "
              "FAILED; moved there with a plain MLflow client: status warns, reconciliation never marks it promoted",
              kept and never_gated and status_of(cfg)["champion"]["integrity_failures"] == [],
              refused_said and verify_said and warned)


def _edited(promoted: dict, key: str, value: str) -> dict[str, str]:
    client = _client(promoted["root"])
    version = promoted["version"]
    original = client.get_model_version("student", version).tags[key]
    client.set_model_version_tag("student", version, key, value)
    try:
        return _verify(promoted)
    finally:
        client.set_model_version_tag("student", version, key, original)


def test_edited_lineage_tags_fail_verification(promoted: dict):
    """Each edit is caught by an agreement check (not only by an existence check)."""
    root, client = promoted["root"], _client(promoted["root"])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "later"], cwd=root, check=True)
    later = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    teacher_run = client.get_model_version("teacher", "1").run_id
    tags = client.get_model_version("student", promoted["version"]).tags
    agree = "distill run agrees with the version's tags (teacher, snapshot, config, code revision)"
    cases = {
        "data.snapshot_md5": ("0" * 32 + ".dir", agree),
        "teacher.version": ("2", agree),
        "git.revision": (later, agree),
        "config.hash": ("0" * 16, agree),
        "distill.run_id": (teacher_run, agree),
        "metric.accuracy": (str(round(float(tags["metric.accuracy"]) - 0.1, 4)),
                            "metrics on the version equal the evaluation's"),
        "gate.criteria": (tags["gate.criteria"].replace('"passed": true', '"passed": false', 1),
                          "gate criteria on the version equal the run's gate decision"),
        "evaluation.run_id": (promoted["run_id"], provenance.FILES_CHECK),
    }
    caught = {}
    for key, (value, check) in cases.items():
        assert value != tags[key], key
        failed = _edited(promoted, key, value)
        caught[key] = any(name.startswith(check) for name in failed)
    fault_row(f"lineage tags edited ({len(cases)} cases: snapshot, teacher, code revision, config, distill run, metric, "
              "gate criterion, evaluation run)", f"verify FAILED naming the agreement check in "
              f"{sum(caught.values())} of {len(cases)}; restored, it verifies",
              _verify(promoted) == {}, all(caught.values()))


def test_signed_lineage_detects_any_edit(promoted: dict, monkeypatch):
    monkeypatch.setenv(provenance.LINEAGE_KEY_ENV, "a test key")
    out = run_command(promoted["root"] / "distillery.yaml", overrides=TOLERANT, force=True)
    assert out.decision.passed
    signed = {**promoted, "version": out.decision.version}
    client = _client(promoted["root"])
    assert client.get_model_version("student", signed["version"]).tags.get(SIGNATURE_TAG)
    assert _verify(signed) == {}
    failed = _edited(signed, "candidate", '{"kind": "distilled"}')
    fault_row("a signed version's tag edited without the key (DISTILLERY_LINEAGE_KEY)",
              "verify FAILED on the signature check", True,
              provenance.SIGNATURE_CHECK in failed and "changed after signing" in failed[provenance.SIGNATURE_CHECK])
    monkeypatch.delenv(provenance.LINEAGE_KEY_ENV)
    assert "is not set" in _verify(signed)[provenance.SIGNATURE_CHECK]
    # the promotion state, rollbacks and manual promotions change by design: not covered by the signature
    monkeypatch.setenv(provenance.LINEAGE_KEY_ENV, "a test key")
    assert client.get_model_version("student", signed["version"]).tags[DECISION_TAG] == PROMOTED
    assert _verify(signed) == {}


def test_every_alias_move_is_in_the_history(promoted: dict, monkeypatch):
    """Each move of the champion alias (the gate's, by hand, a rollback) is recorded on the registered model with
    when, from and to, by whom and why; a move recorded but never made (a crash in between) and a move made with a
    plain MLflow client are told as such (MLflow itself keeps no history of aliases)."""
    import sys

    from distillery.commands.admin import alias_moves, rollback_champion
    from distillery.faults import FAULTS_ENV, InjectedFault

    root, cfg = promoted["root"], promoted["cfg"]
    out = run_command(root / "distillery.yaml", overrides=TOLERANT, force=True)
    assert out.decision.passed
    gated = out.decision.version
    restored = rollback_champion(cfg, "test: back to the one before")[1]
    monkeypatch.setenv(FAULTS_ENV, "alias.recorded=raise")  # dies between the record and the move
    with pytest.raises(InjectedFault):
        promote_version(cfg, gated, "test: interrupted")
    monkeypatch.delenv(FAULTS_ENV)
    assert str(_client(root).get_model_version_by_alias("student", "champion").version) == restored
    promote_version(cfg, gated, "test: forward again")
    state = alias_moves(cfg)
    last = state["moves"][-4:]
    assert [(m["kind"], m["from_version"], m["to_version"], m["took_effect"]) for m in last] == [
        ("gate", last[0]["from_version"], gated, True), ("rollback", gated, restored, True),
        ("manual", restored, gated, False), ("manual", restored, gated, True)]
    assert last[0]["by"] == f"distill run {out.run_id}" and "passed the gate" in last[0]["reason"]
    assert last[1]["reason"] == "test: back to the one before" and "@" in last[1]["by"]
    assert [m["at"] for m in last] == sorted(m["at"] for m in last)
    assert (state["holder"], state["note"]) == (gated, "")
    _client(root).set_registered_model_alias("student", "champion", restored)  # outside distillery
    try:
        state = alias_moves(cfg)
        assert state["holder"] == restored and "moved outside distillery" in state["note"]
        shown = subprocess.run([str(Path(sys.executable).parent / "distillery"), "history"], cwd=root,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert "[not made" in shown.stdout and "WARNING" in shown.stdout and "test: forward again" in shown.stdout
    finally:
        _client(root).set_registered_model_alias("student", "champion", gated)
    fault_row("champion alias moved by the gate, a rollback, by hand (once interrupted between record and move), and "
              "with a plain MLflow client", "history lists each move with who and why; the interrupted one as not "
              "made; the outside move as a warning", True, True)
