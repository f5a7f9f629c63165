"""Screenshots of what a user sees after `make run`: the MLflow run, the registered champion version and the Prefect
flow run pages, taken with headless Chromium (Debian: `apt-get install chromium`).

    .venv/bin/python scripts/screenshots.py [--out screenshots/] [--config distillery.yaml]

It starts an MLflow UI on the project's tracking store and a Prefect server on the local Prefect database (where the
temporary servers of earlier runs kept their flow runs), both on free loopback ports, and stops them at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from tests.helpers import free_port, wait_http  # noqa: E402 - after the project root is on the path


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until the server answers (``tests.helpers.wait_http``); a clean exit with its log's tail when it does not."""
    try:
        wait_http(url, seconds, proc, log)
    except AssertionError as exc:
        raise SystemExit(str(exc)) from None


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def shoot(browser: str, url: str, path: Path, height: int = 1400) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1600,{height}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"  {path}  <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="screenshots")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        raise SystemExit("no Chromium found: `apt-get install chromium`")
    from distillery.cli import environment_defaults

    environment_defaults()
    from distillery.config import load_config
    from distillery.integrations import registry
    from distillery.records import Lineage

    cfg = load_config(args.config)
    uri = registry.tracking_uri(cfg)
    reg = registry.Registry.from_config(cfg)
    champion = reg.alias_version(cfg.tracking.student_name, cfg.tracking.champion_alias)
    if champion is None:
        raise SystemExit("no champion yet: run `make run` first")
    lineage = Lineage.from_tags(champion.tags)
    run = reg.client.get_run(lineage.distill_run_id)
    flow_run_id = run.data.tags.get("prefect.flow_run_id")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mlflow_port, prefect_port = free_port(), free_port()
    servers = [start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                      "--backend-store-uri", uri, "--workers", "1"], out / "mlflow-ui.log")]
    api = f"http://127.0.0.1:{prefect_port}/api"  # the UI calls the API it is told about, not the port it runs on
    env_prefect = {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api}
    servers.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                     str(prefect_port)], env=env_prefect, stdout=open(out / "prefect-ui.log", "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", servers[0], out / "mlflow-ui.log")
        wait_for(f"http://127.0.0.1:{prefect_port}/api/health", servers[1], out / "prefect-ui.log")
        ml = f"http://127.0.0.1:{mlflow_port}/#"
        shoot(browser, f"{ml}/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", out / "mlflow-run.png")
        shoot(browser, f"{ml}/experiments/{run.info.experiment_id}", out / "mlflow-experiment.png")
        shoot(browser, f"{ml}/models/{champion.name}/versions/{champion.version}", out / "mlflow-version.png", 2000)
        if flow_run_id:
            shoot(browser, f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run_id}", out / "prefect-flow-run.png")
            shoot(browser, f"http://127.0.0.1:{prefect_port}/artifacts", out / "prefect-artifacts.png")
    finally:
        for proc in servers:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
