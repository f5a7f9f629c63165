"""Fault-injection tier: real `distillery` processes killed with SIGKILL at named points (see distillery/faults.py),
a tracking server stopped mid-run, runs started together, an ingest started under a distillation. After each: the
registry is consistent (the alias unchanged, or moved once), no orphan version, data.dvc and the DVC remote intact,
and a re-run completes (with the same result where the inputs are the same). `make test` prints the table."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distillery.integrations import store
from distillery.records import DECISION_TAG, PENDING, PROMOTED
from tests.conftest import make_project
from tests.helpers import fault_row, free_port, wait_http, write_config

pytestmark = pytest.mark.faults

BIN = Path(sys.executable).parent
KILLED = -signal.SIGKILL



def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


class Project:
    """A tiny project driven through the real CLI, one process per command, against one Prefect server."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.marks = root / "marks"

    def cli(self, *args: str, faults: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "DISTILLERY_FAULTS_MARKS": str(self.marks)}
        if faults:
            env["DISTILLERY_FAULTS"] = faults
        return subprocess.run([str(BIN / "distillery"), *args], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str, faults: str | None = None) -> subprocess.Popen:
        env = {**self.env, "DISTILLERY_FAULTS_MARKS": str(self.marks)}
        if faults:
            env["DISTILLERY_FAULTS"] = faults
        return subprocess.Popen([str(BIN / "distillery"), *args], cwd=self.root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def wait_mark(self, point: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while not (self.marks / point).exists():
            assert time.monotonic() < deadline, f"fault point {point} not reached in {seconds} s"
            time.sleep(0.2)
        (self.marks / point).unlink()

    def client(self) -> MlflowClient:
        uri = self.env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def registry(self, name: str = "student") -> dict:
        """{'alias': version or None, 'versions': {version: promotion state}}."""
        client = self.client()
        versions = {str(v.version): v.tags.get(DECISION_TAG) for v in client.search_model_versions(f"name='{name}'")}
        try:
            alias = str(client.get_model_version_by_alias(name, "champion").version)
        except Exception:  # noqa: BLE001 - no model or no alias yet
            alias = None
        return {"alias": alias, "versions": versions}

    def consistent(self, before: dict, moved: int) -> bool:
        """The alias moved ``moved`` times (0 or 1) since ``before``; every version that claims to have served is a
        champion now or was one before; nothing is left pending."""
        now = self.registry()
        new = set(now["versions"]) - set(before["versions"])
        alias_ok = now["alias"] == before["alias"] if moved == 0 else (now["alias"] in new and len(new) == 1)
        served = {v for v, s in now["versions"].items() if s == PROMOTED}
        claims_ok = served <= set(before["versions"]) | ({now["alias"]} if now["alias"] else set())
        return alias_ok and claims_ok and PENDING not in now["versions"].values()

    def data_intact(self, dvc_text: str) -> bool:
        """data.dvc unchanged, data/ hashes to it, and the remote serves that snapshot."""
        if (self.root / "data.dvc").read_text() != dvc_text:
            return False
        md5 = store.snapshot_md5(self.root / "data.dvc")
        return store.dir_md5(self.root / "data") == md5 and \
            store.verify_snapshot_fetchable(self.root, dvc_text, "local") == md5

    def champion_metrics(self) -> dict:
        v = self.client().get_model_version_by_alias("student", "champion")
        return {k: v.tags[k] for k in ("metric.accuracy", "metric.macro_f1", "metric.ece")}


def _row(case: str, outcome: str, nothing_lost: bool, said: bool | None = None) -> None:
    fault_row(case, outcome, nothing_lost, said)


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory):
    """One real `prefect server` on loopback for the module's CLI processes (each would start its own otherwise)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "DISTILLERY_"))}
    env = {**clean, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                    home / "server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120)
        yield env
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, server_env: dict) -> Project:
    root = make_project(tmp_path_factory.mktemp("faults"), tiny_teacher_dir)
    write_config(root, distill={"epochs": 3, "patience": 3}, gate={"champion_tolerance": 1.0})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.distillery/\nsource/\ntiny-teacher\nmarks/\n")
    p = Project(root, server_env)
    assert p.cli("ingest").returncode == 0
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "data"], cwd=root, check=True)
    p.dvc_text = (root / "data.dvc").read_text()
    return p


def test_kill_during_teacher_fine_tune_then_resume(proj: Project):
    killed = proj.cli("teacher", faults="train.epoch_end=kill@2")
    assert killed.returncode == KILLED, killed.stdout[-2000:] + killed.stderr[-2000:]
    teachers = {str(v.version) for v in proj.client().search_model_versions("name='teacher'")}
    rerun = proj.cli("teacher")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    client = proj.client()
    version = client.get_model_version_by_alias("teacher", "production")
    resumed = client.get_run(version.run_id).data.metrics["resumed_from_epoch"]
    _row("kill -9 during teacher fine-tune, re-run",
         f"no teacher registered by the killed run; re-run resumed after epoch {resumed:.0f} and registered v{version.version}",
         teachers == set() and resumed >= 1 and proj.data_intact(proj.dvc_text))


def test_kill_during_labelling_then_rerun(proj: Project):
    before = proj.registry()
    killed = proj.cli("distill", faults="label.shard=kill")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    cache = proj.root / ".distillery" / "teacher-outputs"
    complete = [p for p in cache.glob("*") if (p / "meta.json").is_file()] if cache.is_dir() else []
    after_kill_ok = proj.consistent(before, moved=0) and complete == []
    rerun = proj.cli("distill", "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    import json

    result = json.loads(rerun.stdout)  # --json: stdout holds the result alone, the log goes to stderr
    assert result["decision"]["passed"] and result["decision"]["version"] == proj.registry()["alias"]
    log = rerun.stdout + rerun.stderr  # a default run's log carries no library noise
    assert "_docs_decorators" not in log and "LOAD REPORT" not in log
    _row("kill -9 during labelling, re-run", f"nothing registered or cached by the killed run; re-run promoted "
         f"v{proj.registry()['alias']}", after_kill_ok and proj.consistent(before, moved=1)
         and proj.data_intact(proj.dvc_text))


def test_kill_during_training_then_rerun_gives_the_same_student(proj: Project):
    args = ("distill", "--force", "--set", "distill.seed=21")
    before = proj.registry()
    killed = proj.cli(*args, faults="train.epoch_end=kill@2")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    after_kill_ok = proj.consistent(before, moved=0)
    resumed = proj.cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    moved_once = proj.consistent(before, moved=1)
    with_resume = proj.champion_metrics()
    # the same inputs from scratch (no checkpoints) give the same student
    shutil.rmtree(proj.root / ".distillery" / "checkpoints")
    scratch = proj.cli(*args)
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    same = proj.champion_metrics() == with_resume
    _row("kill -9 during training, re-run", f"alias unchanged by the killed run; resumed re-run promoted once; "
         f"same metrics as a clean run: {same} (accuracy {with_resume['metric.accuracy']}, "
         f"ECE {with_resume['metric.ece']})",
         after_kill_ok and moved_once and same and proj.data_intact(proj.dvc_text))


def test_kill_between_registration_and_alias_move(proj: Project):
    before = proj.registry()
    killed = proj.cli("distill", "--force", faults="promote.registered=kill")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    now = proj.registry()
    orphan = set(now["versions"]) - set(before["versions"])
    alias_kept = now["alias"] == before["alias"] and [now["versions"][v] for v in orphan] == [PENDING]
    status = proj.cli("status")
    reported = status.returncode == 0 and f"v{next(iter(orphan))} is pending" in status.stdout
    rerun = proj.cli("distill", "--force")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _row("kill -9 between registration and alias move, re-run",
         f"alias stayed on v{before['alias']}; v{next(iter(orphan))} left pending (status reports it); "
         f"re-run removed it and promoted v{proj.registry()['alias']}",
         alias_kept and proj.consistent(before, moved=1) and proj.data_intact(proj.dvc_text), reported)


def test_kill_after_alias_move_before_the_final_mark(proj: Project):
    before = proj.registry()
    killed = proj.cli("distill", "--force", faults="promote.alias_moved=kill")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    now = proj.registry()
    serving_pending = now["alias"] != before["alias"] and now["versions"][now["alias"]] == PENDING
    gc = proj.cli("gc")
    assert gc.returncode == 0, gc.stderr[-3000:]
    _row("kill -9 after alias move, before the final mark; gc",
         f"v{now['alias']} serves; gc marked it {PROMOTED}",
         serving_pending and proj.consistent(before, moved=1) and proj.data_intact(proj.dvc_text))


def test_two_runs_started_together(proj: Project):
    before = proj.registry()
    args = ("distill", "--set", "distill.temperature=3.0")  # a config no champion was made from
    runs = [proj.popen(*args), proj.popen(*args)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    codes = [r.returncode for r in runs]
    skipped = sum("nothing to do" in out for out in outputs)
    _row("two runs started together", f"exit codes {codes}; one promoted, the other waited and found nothing to do",
         codes == [0, 0] and proj.consistent(before, moved=1) and proj.data_intact(proj.dvc_text), skipped == 1)


def test_ingest_started_during_a_distillation(proj: Project):
    before = proj.registry()
    old_md5 = store.snapshot_md5(proj.root / "data.dvc")
    distill = proj.popen("distill", "--force", faults="gate.before=pause:20")
    proj.wait_mark("gate.before")
    with open(proj.root / "source" / "train.csv", "a") as f:
        f.write("how long does a top up by bank transfer take,top_up\n")
    ingest = proj.popen("ingest")
    distill_out = distill.communicate(timeout=600)[0]
    ingest_out = ingest.communicate(timeout=600)[0]
    assert distill.returncode == 0 and ingest.returncode == 0, distill_out[-3000:] + ingest_out[-3000:]
    champion = proj.client().get_model_version_by_alias("student", "champion")
    new_md5 = store.snapshot_md5(proj.root / "data.dvc")
    waited = "waiting for it" in ingest_out
    new_text = (proj.root / "data.dvc").read_text()
    _row("ingest started during a distillation",
         f"ingest waited for the run lock; the promoted student records the snapshot it read ({old_md5[:8]}); "
         f"data.dvc then moved to {new_md5[:8]}",
         champion.tags["data.snapshot_md5"] == old_md5 != new_md5 and proj.consistent(before, moved=1)
         and proj.data_intact(new_text), waited)
    proj.dvc_text = new_text


def test_a_command_that_fails_leaves_no_run_running(proj: Project):
    """An error inside the flow after its runs were opened (here a training thread raising at an epoch end): the
    command exits non-zero with the error, the runs it opened end FAILED (none left RUNNING for gc to find), and the
    registry is untouched."""
    before = proj.registry()

    def statuses() -> dict[str, str]:
        experiment = proj.client().get_experiment_by_name("distillery")  # none yet when this case runs first
        return {r.info.run_id: r.info.status
                for r in proj.client().search_runs([experiment.experiment_id])} if experiment else {}

    earlier = statuses()
    out = proj.cli("distill", "--force", faults="train.epoch_end=raise")
    opened = {run: status for run, status in statuses().items() if run not in earlier}
    failed = out.returncode != 0 and "InjectedFault" in out.stdout + out.stderr
    _row("an error inside the flow after its runs were opened",
         f"exit {out.returncode}; {len(opened)} run(s) opened, statuses {sorted(set(opened.values()))}",
         proj.consistent(before, moved=0) and "RUNNING" not in opened.values(), failed)
    assert failed, out.stdout[-2000:] + out.stderr[-2000:]
    assert opened and "RUNNING" not in opened.values() and "FAILED" in opened.values(), opened
    assert proj.consistent(before, moved=0)


def test_lineage_of_the_survivor_verifies_as_json(proj: Project):
    """After all of the above, the champion's lineage still verifies; `--json --verify` prints JSON only."""
    import json

    out = proj.cli("lineage", "student@champion", "--json", "--verify")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    info = json.loads(out.stdout)
    assert info["verification"]["passed"] and "champion" in info["aliases"]


def test_a_stop_that_waits_on_a_training_thread_still_ends(proj: Project):
    """Ctrl-C while students train on the task runner's threads, one of them held at an epoch end for 300 s: the
    unwinding waits for that thread (the task runner's shutdown joins it), so the command's watchdog ends it after its
    grace period (STOP_GRACE_S), with the same one line and exit 130, its runs KILLED and the registry untouched."""
    from distillery.cli import STOP_GRACE_S

    before = proj.registry()
    experiment = proj.client().get_experiment_by_name("distillery").experiment_id
    running = lambda: {r.info.run_id for r in proj.client().search_runs([experiment])  # noqa: E731
                       if r.info.status == "RUNNING"}
    left_before = running()  # an earlier case's kill -9 leaves its run for gc
    (proj.marks / "train.epoch_end").unlink(missing_ok=True)  # an earlier case's mark
    run = proj.popen("distill", "--force", faults="train.epoch_end=pause:300")
    proj.wait_mark("train.epoch_end", 300)
    started = time.monotonic()
    os.kill(run.pid, signal.SIGINT)
    out = run.communicate(timeout=150)[0]
    took = time.monotonic() - started
    last = ([line for line in out.strip().splitlines() if line.strip()] or [""])[-1]
    left = running() - left_before
    ended = run.returncode == 130 and "stopped by Ctrl-C" in last and "Traceback" not in out
    _row("Ctrl-C while a training thread is held (unwinding waits on it)",
         f"exit {run.returncode} after {took:.0f} s (grace {STOP_GRACE_S:.0f} s, the thread held 300 s), one line, "
         f"{len(left)} run(s) left RUNNING", proj.consistent(before, moved=0) and not left, ended)
    assert ended, out[-3000:]
    assert took < 120, f"the command took {took:.0f} s to end: the watchdog did not stop it"
    assert not left and proj.consistent(before, moved=0)


def test_tracking_server_stopped_mid_run(tmp_path: Path, tiny_teacher_dir: Path, server_env: dict):
    """With MLflow behind a real server: the server dies before the gate reads the champion; the run stops with
    a clear error instead of deciding without it, and a re-run after the restart promotes once."""
    port = free_port()
    store_dir = tmp_path / "mlflow"
    store_dir.mkdir()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}", "--artifacts-destination",
           str(store_dir / "artifacts")]

    def mlflow_up() -> subprocess.Popen:
        proc = _start(cmd, server_env, store_dir / "server.log")
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        return proc

    server = mlflow_up()
    root = make_project(tmp_path / "project", tiny_teacher_dir)
    write_config(root, distill={"epochs": 2}, tracking={"uri": None, "retries": 2, "retry_backoff_s": 0.5})
    p = Project(root, {**server_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    try:
        for step in (("ingest",), ("teacher",), ("distill",)):
            done = p.cli(*step)
            assert done.returncode == 0, done.stderr[-3000:]
        dvc_text = (root / "data.dvc").read_text()
        before = p.registry()
        run = p.popen("distill", "--force", faults="gate.before=pause:6")
        p.wait_mark("gate.before")
        _stop(server)
        out = run.communicate(timeout=600)[0]
        last = out.rsplit("distillery distill:", 1)[-1]  # the CLI's one closing message
        clear = run.returncode == 2 and ("did not answer" in last or "is not reachable" in last) \
            and "run again" in last and "Traceback" not in out  # the failure is told, not dumped
        server = mlflow_up()
        unchanged = p.registry() == before
        rerun = p.cli("distill", "--force")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        _row("tracking server stopped mid-run, restarted, re-run",
             f"run stopped with exit {run.returncode} and a clear error, registry unchanged; re-run promoted "
             f"v{p.registry()['alias']}",
             unchanged and p.consistent(before, moved=1) and p.data_intact(dvc_text), clear)
    finally:
        _stop(server)


def _helpers_of(pid: int) -> list:
    """Live processes started by the distillery command ``pid`` (they carry its description in their environment)."""
    import psutil

    from distillery.processes import COMMAND_ENV

    found = []
    for proc in psutil.process_iter():
        try:
            owner = proc.environ().get(COMMAND_ENV, "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if owner.split(" ")[1:2] == [str(pid)] and proc.pid != pid:
            found.append(proc)
    return found


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "kill -9, then gc"])
def test_a_stopped_command_leaves_no_server_and_no_running_run(tmp_path: Path, tiny_teacher_dir: Path, how: str):
    """Without PREFECT_API_URL each command starts a temporary Prefect server. SIGTERM and Ctrl-C end the command
    with one line and exit 143/130, that server stopped and its MLflow run KILLED; after kill -9, `gc` does both."""
    root = make_project(tmp_path / "project", tiny_teacher_dir)
    write_config(root, teacher={"epochs": 8})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "DISTILLERY_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    p = Project(root, env)
    assert p.cli("ingest").returncode == 0
    run = p.popen("teacher", faults="train.epoch_end=pause:120")
    p.wait_mark("train.epoch_end", 300)
    helpers = _helpers_of(run.pid)
    assert helpers, "the command started no temporary Prefect server"
    signum = {"SIGTERM": signal.SIGTERM, "Ctrl-C": signal.SIGINT}.get(how, signal.SIGKILL)
    os.kill(run.pid, signum)
    # after kill -9 the orphaned server still holds the output pipe: wait for the command alone
    out = run.communicate(timeout=60)[0] if signum != signal.SIGKILL else (run.wait(60), "")[1]
    statuses = lambda: sorted(r.info.status for r in p.client().search_runs(  # noqa: E731
        [p.client().get_experiment_by_name("distillery").experiment_id]))
    if signum == signal.SIGKILL:
        left_running = "RUNNING" in statuses() and any(h.is_running() for h in helpers)
        gc = p.cli("gc")
        assert gc.returncode == 0, gc.stderr[-3000:]
        import psutil

        psutil.wait_procs(helpers, timeout=10)
        clean = left_running and "RUNNING" not in statuses() and "FAILED" in statuses()
        said = "marked FAILED" in gc.stdout and "temporary Prefect server" in gc.stdout
        outcome = "killed: server and RUNNING run left; gc marked the run FAILED and stopped the server (and said so)"
    else:
        code = 143 if signum == signal.SIGTERM else 130
        last_lines = [line for line in out.strip().splitlines() if line.strip()][-1:]
        clean = run.returncode == code and statuses() == ["KILLED"]
        said = "Traceback" not in out and "stopped by" in last_lines[0]
        outcome = f"exit {run.returncode}, one line, run KILLED, temporary server stopped"
        if not clean or not said:
            outcome += f" [statuses {statuses()}; last {last_lines}; traceback {'Traceback' in out}]"
    alive = [h for h in helpers if h.is_running() and h.status() != "zombie"]
    no_teacher = not p.client().search_model_versions("name='teacher'")
    if alive or not no_teacher:
        outcome += f" [alive {alive}; teacher registered {not no_teacher}]"
    _row(f"{how} during teacher fine-tune (temporary Prefect server)", outcome,
         clean and not alive and no_teacher, said)
