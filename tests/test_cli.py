"""The command line: help, and clear one-line errors (exit 2) instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pathlib import Path

from tests.helpers import free_port, write_config, write_source

CLI = [str(Path(sys.executable).parent / "distillery")]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("run", "ingest", "teacher", "label", "distill", "watch", "lineage", "status", "promote", "history",
                    "webhook"):
        assert command in out.stdout


def test_bad_override_is_a_clear_error(tmp_path):
    write_config(tmp_path)
    out = _run("ingest", "--set", "distill.temperature=-1", cwd=tmp_path)
    assert out.returncode == 2
    assert "distill.temperature must be > 0" in out.stderr and "Traceback" not in out.stderr


def test_missing_config_is_a_clear_error(tmp_path):
    out = _run("status", cwd=tmp_path)
    assert out.returncode == 2 and "--config" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv", [["status"], ["run", "--set", "distill.temperature=-1"],
                                  ["lineage", "--set", "gate.policy=any"], ["gc", "--set", "labelling.shards=0"]])
def test_a_configuration_error_ends_before_the_heavy_stack_loads(tmp_path, argv):
    """A missing file or a bad key is told before torch, transformers, MLflow or Prefect are imported (seconds of
    start-up otherwise, on every mistyped command)."""
    if argv[0] != "status":
        write_config(tmp_path)
    code = ("import sys; from distillery.cli import main; rc = main(%r); "
            "print(rc, [m for m in ('torch', 'transformers', 'mlflow', 'prefect') if m in sys.modules])" % argv)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2 []", out.stdout + out.stderr
    assert "Error" in out.stderr and "Traceback" not in out.stderr


def test_mlflow_server_down_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    write_config(tmp_path, tracking={"uri": f"http://127.0.0.1:{port}"})
    out = _run("status", cwd=tmp_path)
    assert out.returncode == 2
    assert f"MLflow tracking server at http://127.0.0.1:{port} is not reachable" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_and_module_entry(tmp_path):
    out = _run("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("distillery ")
    module = subprocess.run([sys.executable, "-m", "distillery", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert module.returncode == 0 and "lineage" in module.stdout and "gc" in module.stdout


def test_status_json_is_json_only(tmp_path):
    import json

    write_config(tmp_path)
    out = _run("status", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state["teacher"] is None and state["champion"] is None and state["leftovers"] == []


def test_prefect_server_down_is_a_clear_error(tmp_path):
    import os

    port = free_port()  # nothing listens there
    write_source(tmp_path / "source")
    write_config(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    out = subprocess.run([*CLI, "ingest"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert f"Prefect server at http://127.0.0.1:{port}/api is not reachable" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "data.dvc").exists()


def test_a_temporary_server_that_does_not_start_in_time_is_a_clear_error(tmp_path, monkeypatch):
    """The first start in a fresh PREFECT_HOME migrates a database (20-35 s on 2 cores): distillery waits 120 s by
    default, and a limit the user set that is too short ends in one line naming the setting."""
    import os

    write_source(tmp_path / "source")
    write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    out = subprocess.run([*CLI, "ingest"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "did not start in time" in out.stderr and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "data.dvc").exists()
    from distillery.cli import environment_defaults

    monkeypatch.setattr(os, "environ", {})  # an empty environment, restored after the test
    environment_defaults()
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 60
