"""Integration tier: real `prefect server`, `mlflow server`, process worker and webhook receiver on loopback,
started by scripts/stack.sh exactly as documented; a new teacher version alone leads to a promoted student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.helpers import free_port, wait_http, write_config
from tests.test_monitoring import shifted

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _processes_using(folder: Path) -> list[str]:
    """Live processes whose command line or environment names ``folder`` (what the stack started, and children)."""
    needle = str(folder).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "stat").read_text().split(")")[-1].split()[0]
            if status == "Z":
                continue  # exited, not yet reaped by its parent
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes().replace(bytes(1), b' ')[:120].decode()}")
        except OSError:
            continue
    return found


def _champion(env: dict) -> dict | None:
    code = ("import json, mlflow; from mlflow import MlflowClient\n"
            "try:\n v = MlflowClient().get_model_version_by_alias('student', 'champion')\n"
            " print(json.dumps({'version': str(v.version), 'teacher': v.tags.get('teacher.version'),\n"
            "                   'production_texts': v.tags.get('data.production_texts')}))\n"
            "except Exception:\n print('null')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None


def _wait_for_champion(env: dict, teacher_version: str, timeout: float, production: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        champion = _champion(env)
        if champion and champion["teacher"] == teacher_version and bool(champion["production_texts"]) == production:
            return champion
        time.sleep(5)
    raise AssertionError(f"no champion distilled from teacher v{teacher_version}"
                         f"{' with production texts' if production else ''} within {timeout} s")


def serve_and_ask(project: Path, env: dict, texts: list[str], log: Path) -> None:
    """`distillery serve` of the champion, asked ``texts`` over HTTP in requests of 10, until its log holds them."""
    import urllib.request

    import pandas as pd

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", "--port", str(port)], cwd=project,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        for start in range(0, len(texts), 10):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={
                "Content-Type": "application/json"}, data=json.dumps({"inputs": texts[start:start + 10]}).encode())
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert resp.status == 200
        folder, deadline = Path(env["DISTILLERY_PREDICTION_LOG"]), time.monotonic() + 60
        while time.monotonic() < deadline:
            files = sorted(folder.rglob("part-*.parquet"))
            if files and sum(len(pd.read_parquet(f)) for f in files) >= len(texts):
                return
            time.sleep(0.5)
        raise AssertionError(f"the prediction log at {folder} did not receive {len(texts)} rows")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_new_teacher_version_is_distilled_and_promoted_with_no_other_action(tmp_path, tiny_teacher_dir):
    project = make_project(tmp_path / "project", tiny_teacher_dir)
    write_config(project, tracking={"uri": None})
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    (project / ".gitignore").write_text(".distillery/\nsource/\ntiny-teacher\nstack/\n")
    # a clean Prefect environment: the session's test harness must not leak its temporary API or database settings
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env = {**clean, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "STACK_DIR": str(tmp_path / "stack"), "PREFECT_PORT": str(free_port()),
           "MLFLOW_PORT": str(free_port()), "WEBHOOK_PORT": str(free_port()),
           "DISTILLERY_CONFIG": str(project / "distillery.yaml"), "DISTILLERY_WEBHOOK_SECRET": "integration-secret",
           "VENV_BIN": str(Path(sys.executable).parent)}
    stack = ROOT / "scripts" / "stack.sh"
    up = subprocess.run(["bash", str(stack), "up"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        env.update({"PREFECT_API_URL": f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{env['MLFLOW_PORT']}",
                    "PREFECT_HOME": str(tmp_path / "stack" / "prefect-home")})
        cli = [str(Path(sys.executable).parent / "distillery")]
        run = lambda *args: subprocess.run([*cli, *args], cwd=project, env=env, capture_output=True, text=True,
                                           timeout=600)
        ingest = run("ingest")
        assert ingest.returncode == 0, ingest.stderr[-3000:]
        subprocess.run(["git", "add", "-A"], cwd=project, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "data"], cwd=project,
                       check=True)

        # registering a teacher moves teacher@production: the MLflow webhook -> receiver -> Prefect event ->
        # deployment trigger -> worker runs the distillation, which promotes a student of that teacher
        assert run("teacher").returncode == 0
        first = _wait_for_champion(env, "1", timeout=420)
        assert run("teacher").returncode == 0
        second = _wait_for_champion(env, "2", timeout=420)
        assert int(second["version"]) > int(first["version"])
        # the push path did its part: the receiver accepted signed deliveries for both alias moves
        webhook_log = (tmp_path / "stack" / "webhook.log").read_text()
        assert webhook_log.count('"POST / HTTP/1.1" 202') >= 2, webhook_log[-2000:]

        # an unchanged teacher triggers nothing
        watch = run("watch")
        assert watch.returncode == 0 and "no change" in watch.stdout + watch.stderr
        time.sleep(15)
        assert _champion(env) == second

        lineage = run("lineage", "student@champion", "--verify")
        assert lineage.returncode == 0, lineage.stdout[-3000:] + lineage.stderr[-3000:]
        assert "lineage verified" in lineage.stdout

        # production: `distillery serve` with the log on answers real HTTP traffic of another domain; the monitor
        # sees the drift and emits the event; the redistill-on-drift trigger runs a distillation on those texts, and
        # the new champion records them in its lineage
        log = project / "prediction-log"
        texts = shifted(60)
        serve_and_ask(project, env | {"DISTILLERY_PREDICTION_LOG": str(log), "DISTILLERY_PREDICTION_LOG_FLUSH_S": "0.2"},
                      texts, tmp_path / "serve.log")
        monitor = run("monitor", "--json", "--set", f"monitor.log={log}", "--set", "monitor.min_texts=20",
                      "--set", "monitor.teacher_sample=30")
        assert monitor.returncode == 4, monitor.stdout[-3000:] + monitor.stderr[-3000:]
        assert json.loads(monitor.stdout)["drifted"] is True
        third = _wait_for_champion(env, "2", timeout=420, production=True)
        assert int(third["version"]) > int(second["version"]) and third["production_texts"] == str(len(set(texts)))
        lineage = run("lineage", "student@champion", "--verify")
        assert lineage.returncode == 0 and "production texts" in lineage.stdout, lineage.stdout[-3000:]
    finally:
        down = subprocess.run(["bash", str(stack), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    left = _processes_using(tmp_path / "stack")
    assert not left, f"`stack.sh down` left processes running: {left}"
