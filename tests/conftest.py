"""Shared fixtures: one Prefect harness per session, throwaway project folders, tiny random-init models."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import LABELS, make_frames, write_config, write_source


def pytest_configure(config: pytest.Config) -> None:
    from distillery.cli import environment_defaults

    environment_defaults()  # the same offline, quiet defaults as the CLI


TIERS = ("slow", "integration", "faults")  # marked by hand; the rest are unit or flow tests, marked here


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a tier of its own is a flow test when it needs the Prefect harness (a real flow run on tiny
    models), else a unit test: ``pytest -m unit`` runs the pure code's tests alone."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        flow = "prefect_harness" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.flow if flow else pytest.mark.unit)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest's hook
    """The fault-injection table, when that tier ran."""
    from tests.helpers import FAULT_ROWS

    if not FAULT_ROWS:
        return
    terminalreporter.section("fault injection")
    terminalreporter.write_line("| case | outcome | nothing lost | nothing wrong said |")
    terminalreporter.write_line("|---|---|---|---|")
    for case, outcome, lost, said in FAULT_ROWS:
        terminalreporter.write_line(f"| {case} | {outcome} | {lost} | {said} |")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for all flow tests of the session (starting one costs ~18 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init BERT (vocab from the fixture texts, hidden 32, 2 layers) saved as safetensors."""
    from tests.helpers import build_tiny_model

    train, test = make_frames()
    folder = tmp_path_factory.mktemp("models") / "tiny-teacher"
    return build_tiny_model(folder, list(train["text"]) + list(test["text"]), LABELS)


def make_project(root: Path, tiny_teacher_dir: Path) -> Path:
    """A throwaway project folder: source data, tiny base model and a distillery.yaml using both."""
    write_source(root / "source")
    os.symlink(tiny_teacher_dir, root / "tiny-teacher")
    write_config(root)
    return root


@pytest.fixture()
def project(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    return make_project(tmp_path, tiny_teacher_dir)


@pytest.fixture(scope="module")
def teacher_project(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, prefect_harness) -> Path:
    """A project with an ingested snapshot and a bootstrapped tiny teacher@production (shared by a module)."""
    from tests.helpers import run_command

    root = make_project(tmp_path_factory.mktemp("project"), tiny_teacher_dir)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.distillery/\nsource/\ntiny-teacher\n")
    run_command(root / "distillery.yaml", "ingest")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=root, check=True)
    run_command(root / "distillery.yaml", "teacher")
    return root
