"""A black-box teacher behind HTTP (``teacher.kind: endpoint``), against a real server: the registered tiny teacher
served by ``mlflow models serve``. Faults (429 bursts, slow answers, 401, malformed JSON, labels outside the set,
answers that change) come from a forwarding proxy in front of that server: the answers themselves are always the
real server's."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LABELS, free_port, run_command, wait_http


class FaultProxy:
    """Forwards ``POST /<case>/invocations`` to the real server's ``/invocations`` and answers per ``case``:
    ``ok`` as is; ``burst`` 429 (Retry-After: 0) for the first 3 requests; ``slow`` the first 2 after 1.5 s;
    ``auth`` 401; ``malformed`` broken JSON; ``outside`` one intent renamed to a label the data does not have;
    ``shuffle`` every label answered as the next one (a weak teacher); ``drift`` honest until ``drifted`` is set,
    then shuffled; a case in ``down`` answers 503 after its first 3 requests. ``requests[case]`` counts what
    reached the proxy (retries included)."""

    def __init__(self, upstream: str):
        self.upstream, self.requests, self.authorization, self.drifted = upstream, {}, {}, False
        self.down: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                case = self.path.strip("/").split("/")[0]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.requests[case] = n = proxy.requests.get(case, 0) + 1
                    proxy.authorization[case] = self.headers.get("Authorization")
                if case == "auth":
                    return self.reply(401, b'{"error": "unauthorized"}')
                if case == "burst" and n <= 3:
                    return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "0"})
                if case == "slow" and n <= 2:
                    time.sleep(1.5)
                if case == "malformed":
                    return self.reply(200, b'{"predictions": [')
                if case in proxy.down and n > 3:  # answers three requests, then falls over
                    return self.reply(503, b'{"error": "unavailable"}')
                request = urllib.request.Request(proxy.upstream, data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as resp:
                    answer = json.loads(resp.read())
                if case in ("outside", "shuffle") or (case == "drift" and proxy.drifted):
                    answer = proxy.rewrite(case, answer)
                self.reply(200, json.dumps(answer).encode())

            def reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # a client that timed out and went
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def rewrite(case: str, answer: dict) -> dict:
        nxt = {name: LABELS[(i + 1) % len(LABELS)] for i, name in enumerate(LABELS)}
        out = []
        for p in answer["predictions"]:
            if case == "outside":
                if p["label"] == LABELS[0]:
                    p = {"label": "no_such_intent", "confidence": 0.9,
                         "top_k": [{"label": "no_such_intent", "probability": 0.9}]}
            else:
                p = {**p, "label": nxt[p["label"]],
                     "top_k": [{**t, "label": nxt[t["label"]]} for t in p["top_k"]]}
            out.append(p)
        return {"predictions": out}

    def count(self, case: str) -> int:
        return self.requests.get(case, 0)


@pytest.fixture(scope="module")
def served(teacher_project: Path, tmp_path_factory: pytest.TempPathFactory):
    """The project's registered teacher served by ``mlflow models serve``, and the fault proxy in front of it."""
    port, log_path = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    uri = f"sqlite:///{teacher_project / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/teacher@production",
                                 "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                                cwd=teacher_project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log_path)
        proxy = FaultProxy(f"http://127.0.0.1:{port}/invocations")
        yield {"project": teacher_project, "proxy": proxy, "direct": f"http://127.0.0.1:{port}"}
        proxy.server.shutdown()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def endpoint(case: str, url: str, **extra) -> dict:
    """Overrides that make the project's teacher the endpoint at ``url``/``case``; its students pretrained models
    (the tiny base model with a new head: a black box has no weights to cut)."""
    return {"teacher.kind": "endpoint", "teacher.endpoint.url": f"{url}/{case}",
            "teacher.endpoint.params": "{top_k: 4}", "teacher.endpoint.backoff_s": 0.01, "teacher.endpoint.recheck": 0,
            "student.init": "pretrained", "student.base_model": "tiny-teacher", **extra}


def run_metrics(project: Path, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).data.metrics


def answers_cached(project: Path, config: dict) -> int:
    """How many answers the project's cache holds for the endpoint teacher of ``config`` overrides."""
    from distillery.config import load_config
    from distillery.integrations.endpoint import AnswerCache, endpoint_identity

    cfg = load_config(project / "distillery.yaml", config)
    return AnswerCache(cfg.work.teacher_answers, endpoint_identity(cfg.teacher.endpoint)).count()


def test_an_endpoint_teacher_gives_the_white_box_soft_labels_and_is_asked_each_text_once(served):
    """Full probabilities from the served teacher are the white box's soft labels; a re-run (the outputs cache gone)
    asks nothing; the re-check re-asks a sample and finds the same answers."""
    from distillery.models.labelling import read_outputs

    project, proxy = served["project"], served["proxy"]
    white = run_command(project / "distillery.yaml", "label")
    black = run_command(project / "distillery.yaml", "label", endpoint("ok", proxy.url))
    assert black.teacher.kind == "endpoint" and black.teacher.run_id == "" and len(black.teacher.version) == 16
    w, b = read_outputs(white.outputs.path, probs=True), read_outputs(black.outputs.path, probs=True)
    assert list(w.frame["id"]) == list(b.frame["id"]) and b.frame["answered"].all()
    np.testing.assert_allclose(b.probs, w.probs, atol=2e-4)
    asked = run_metrics(project, black.outputs.run_id)
    texts = len(set(w.frame["text"])) + 40  # the rows labelled and the test split (the harness measures the teacher on it)
    assert asked["endpoint.asked_texts"] == texts and asked["endpoint.cached_texts"] == 0
    assert asked["endpoint.requests"] == proxy.count("ok") == math.ceil(texts / 16)
    assert asked["endpoint.failed_requests"] == 0 and asked["endpoint.request_p50_ms"] > 0

    shutil.rmtree(Path(black.outputs.path).parent)  # the soft labels go; the answers stay
    os.environ.pop("DISTILLERY_UNSET_TOKEN", None)  # answered from the cache alone: no server, nor its token, needed
    again = run_command(project / "distillery.yaml", "label", endpoint("ok", proxy.url, **{
        "teacher.endpoint.api_key_env": "DISTILLERY_UNSET_TOKEN"}))
    assert proxy.count("ok") == math.ceil(texts / 16)  # not one request more
    m = run_metrics(project, again.outputs.run_id)
    assert (m["endpoint.asked_texts"], m["endpoint.requests"], m["endpoint.cached_texts"]) == (0, 0, texts)
    np.testing.assert_array_equal(read_outputs(again.outputs.path, probs=True).probs, b.probs)

    shutil.rmtree(Path(again.outputs.path).parent)
    checked = run_command(project / "distillery.yaml", "label", endpoint("ok", proxy.url, **{
        "teacher.endpoint.recheck": 8}))
    m = run_metrics(project, checked.outputs.run_id)
    assert (m["endpoint.rechecked_texts"], m["endpoint.recheck_agreement"], m["endpoint.requests"]) == (8, 1.0, 1)


def test_a_labelling_stopped_midway_resumes_without_asking_an_answered_text_again(served):
    """The endpoint falls over after three requests: the run stops on the failure rate with those answers kept;
    once it is back, the re-run asks only the texts never answered."""
    from distillery.integrations.endpoint import EndpointError

    project, proxy = served["project"], served["proxy"]
    proxy.down.add("dies")
    with pytest.raises(EndpointError, match=r"requests failed after retries .*48 texts answered so far are cached"):
        run_command(project / "distillery.yaml", "label", endpoint("dies", proxy.url, **{
            "teacher.endpoint.concurrency": 1}))
    assert answers_cached(project, endpoint("dies", proxy.url)) == 48
    proxy.down.clear()
    done = run_command(project / "distillery.yaml", "label", endpoint("dies", proxy.url))
    m = run_metrics(project, done.outputs.run_id)
    assert m["endpoint.cached_texts"] == 48 and m["endpoint.failed_requests"] == 0
    assert m["endpoint.asked_texts"] + 48 == answers_cached(project, endpoint("dies", proxy.url))


def test_a_labelling_killed_midway_resumes_without_asking_an_answered_text_again(served, tmp_path):
    """kill -9 after the third answered request of a `distillery label`: those answers are kept; the re-run asks
    only the texts never answered."""
    from tests.helpers import fault_row

    project, proxy = served["project"], served["proxy"]
    overrides = endpoint("killed", proxy.url, **{"teacher.endpoint.concurrency": 1})
    args = [sys.executable, "-m", "distillery", "label", "--config", str(project / "distillery.yaml")]
    args += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    from prefect.settings import get_current_settings

    # the tests' Prefect API: a killed command then leaves no temporary server of its own behind
    env = {**os.environ, "DISTILLERY_FAULTS": "endpoint.answered=kill@3",
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    killed = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    kept, asked = answers_cached(project, overrides), proxy.count("killed")
    done = run_command(project / "distillery.yaml", "label", overrides)
    m = run_metrics(project, done.outputs.run_id)
    total = answers_cached(project, overrides)
    assert (kept, asked, m["endpoint.cached_texts"]) == (48, 3, 48)
    assert m["endpoint.asked_texts"] == total - 48 and proxy.count("killed") == 3 + math.ceil((total - 48) / 16)
    fault_row("kill -9 during an endpoint teacher's labelling, re-run", f"the 48 answers of the 3 requests made were "
              f"kept; the re-run asked only the {total - 48} other texts", True, None)


def test_a_labelling_over_budget_asks_nothing_and_the_dry_run_says_so(served):
    from distillery.integrations.endpoint import BudgetExceeded

    project, proxy = served["project"], served["proxy"]
    budget = endpoint("budget", proxy.url, **{"teacher.endpoint.max_requests": 3,
                                              "teacher.endpoint.price_per_request": 0.02})
    over = r"to ask; \d+ requests in all \(re-checks included\), estimated cost .*max_requests is 3.*Nothing was asked"
    with pytest.raises(BudgetExceeded, match=over):
        run_command(project / "distillery.yaml", "label", budget)
    assert proxy.count("budget") == 0 and answers_cached(project, budget) == 0
    args = [sys.executable, "-m", "distillery", "label", "--dry-run", "--json", "--config",
            str(project / "distillery.yaml")] + [a for k, v in budget.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(args, capture_output=True, text=True, cwd=project, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["to_ask"] == plan["texts"] > 0 and plan["requests"] == math.ceil(plan["texts"] / 16)
    assert plan["estimated_cost"] == pytest.approx(plan["requests"] * 0.02)
    assert "max_requests is 3" in plan["over_budget"] and proxy.count("budget") == 0


def test_a_budget_short_of_the_transfer_set_asks_a_diverse_part_of_it(served):
    """``over_budget: select``: every train, validation and test text is asked, and of the generated transfer texts
    as many as the budget leaves room for (one per cluster of their TF-IDF vectors); the rest go unlabelled."""
    from distillery.models.labelling import read_outputs

    project, proxy = served["project"], served["proxy"]
    overrides = endpoint("select", proxy.url, **{"data.augment.multiple": 1, "teacher.endpoint.max_requests": 16,
                                                 "teacher.endpoint.over_budget": "select"})
    done = run_command(project / "distillery.yaml", "label", overrides)
    rows = read_outputs(done.outputs.path).frame
    required = (rows["split"].isin(["train", "validation"])).sum() + 40  # + the test texts
    assert rows["answered"].all() and (rows["split"] == "augmented").sum() == 16 * 16 - required == 56
    m = run_metrics(project, done.outputs.run_id)
    assert m["endpoint.requests"] == proxy.count("select") == 16 and m["endpoint.asked_texts"] == 16 * 16


def ask(project: Path, url: str, case: str, texts: list[str], **settings):
    """One round of asking through the client and the answer cache (no flow): (report or the error, answers kept)."""
    from distillery.config import load_config
    from distillery.integrations.endpoint import AnswerCache, EndpointClient, ask_texts, endpoint_identity

    overrides = {**endpoint(case, url), "teacher.endpoint.timeout_s": 0.5, "teacher.endpoint.retries": 2,
                 **{f"teacher.endpoint.{k}": v for k, v in settings.items()}}
    cfg = load_config(project / "distillery.yaml", overrides)
    cache = AnswerCache(cfg.work.teacher_answers, endpoint_identity(cfg.teacher.endpoint))
    try:
        client = EndpointClient(cfg.teacher.endpoint)
        try:
            outcome = ask_texts(client, cache, texts)
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the error is what these cases check
        outcome = exc
    return outcome, cache.count()


TEXTS = [f"where is my card number {i}" for i in range(40)]


def test_bursts_of_429_and_slow_answers_are_retried_and_every_text_answered(served):
    project, url = served["project"], served["proxy"].url
    for case in ("burst", "slow"):
        report, kept = ask(project, url, case, TEXTS, texts_per_request=8, concurrency=1, retries=4)
        assert not isinstance(report, Exception), report
        assert (report.requests, report.failed, report.answered, kept) == (5, 0, 40, 40), case
    assert served["proxy"].count("burst") == 5 + 3 and served["proxy"].count("slow") == 5 + 2


@pytest.mark.parametrize("case, settings, message", [
    ("auth", {}, r"refused the request \(401\).*teacher.endpoint.api_key_env"),
    ("auth", {"api_key_env": "DISTILLERY_TEST_TOKEN"}, r"names DISTILLERY_TEST_TOKEN, which is not set"),
    ("malformed", {}, r"5 of 5 requests failed after retries .*malformed JSON"),
    ("unreachable", {}, r"requests failed after retries .*did not answer"),
])
def test_a_failing_endpoint_ends_in_one_clear_message_and_caches_nothing(served, case, settings, message):
    from distillery.integrations.endpoint import EndpointError

    url = served["proxy"].url if case != "unreachable" else f"http://127.0.0.1:{free_port()}"
    os.environ.pop("DISTILLERY_TEST_TOKEN", None)
    error, kept = ask(served["project"], url, case, TEXTS, texts_per_request=8, concurrency=2, **settings)
    assert isinstance(error, EndpointError), error
    assert __import__("re").search(message, str(error)), str(error)
    assert kept == 0


def test_a_token_from_the_environment_is_sent_and_never_written_down(served, monkeypatch):
    """The bearer token reaches the server; the answer cache never holds it."""
    project, proxy = served["project"], served["proxy"]
    monkeypatch.setenv("DISTILLERY_TEST_TOKEN", "s3cret-token-value")
    report, kept = ask(project, proxy.url, "token", TEXTS[:4], api_key_env="DISTILLERY_TEST_TOKEN")
    assert report.answered == 4 and kept == 4
    assert proxy.authorization["token"] == "Bearer s3cret-token-value"
    for path in (project / ".distillery" / "teacher-answers").rglob("*"):
        if path.is_file():
            assert b"s3cret-token-value" not in path.read_bytes()


@pytest.mark.parametrize("case, expectation", [
    ("outside", r"answered\): observed 0\.[0-8]"),      # a quarter of the answers name no intent of the data
    ("shuffle", r"val_correct\): observed 0\b"),       # a teacher that answers wrongly: refused before training
])
def test_answers_outside_the_label_set_or_a_weak_teacher_stop_before_any_training(served, case, expectation):
    from distillery.integrations.expectations import ValidationFailed

    with pytest.raises(ValidationFailed, match=expectation):
        run_command(served["project"] / "distillery.yaml", "label", endpoint(case, served["proxy"].url))


def test_answers_that_change_between_runs_show_in_the_recheck(served):
    project, proxy = served["project"], served["proxy"]
    first = run_command(project / "distillery.yaml", "label", endpoint("drift", proxy.url))
    shutil.rmtree(Path(first.outputs.path).parent)
    proxy.drifted = True  # the cached answers stay the first ones: the labelling itself passes
    again = run_command(project / "distillery.yaml", "label", endpoint("drift", proxy.url, **{
        "teacher.endpoint.recheck": 16}))
    m = run_metrics(project, again.outputs.run_id)
    assert m["endpoint.rechecked_texts"] == 16 and m["endpoint.recheck_agreement"] == 0.0
    assert m["endpoint.asked_texts"] == 0


def test_a_student_distilled_from_an_endpoint_teacher_is_gated_against_it(served):
    """distil end to end: the harness measures the endpoint from its answers (accuracy, latency per request) and the
    gate judges the student against it; the lineage names the black box and verifies it."""
    from distillery.commands.admin import lineage_of, verify_lineage
    from distillery.config import load_config

    project, proxy = served["project"], served["proxy"]
    overrides = endpoint("ok", proxy.url, **{"gate.accuracy_tolerance": 1.0, "gate.macro_f1_tolerance": 1.0,
                                             "gate.max_class_f1_drop": 1.0})
    result = run_command(project / "distillery.yaml", "distill", overrides, force=True)
    assert result.evaluation.reference == "teacher_endpoint"
    teacher = result.evaluation.metrics["teacher_endpoint"]
    assert 0 < teacher["accuracy"] <= 1 and teacher["latency_p50_ms"] > 0 and math.isnan(teacher["size_mb"])
    assert any("endpoint teacher" in r for r in result.decision.reasons), result.decision.reasons
    named = {c["name"] for c in result.decision.criteria}  # named for the teacher as served, not an INT8 form
    assert {"accuracy_vs_served_teacher", "latency_vs_served_teacher"} <= named and "accuracy_vs_int8_teacher" not in named
    assert result.decision.passed, result.decision.reasons
    cfg = load_config(project / "distillery.yaml", overrides)
    info = lineage_of(cfg, f"student/{result.decision.version}")
    assert info["teacher"]["kind"] == "endpoint" and info["teacher"]["identity"]["url"].endswith("/ok/invocations")
    checks = {name: ok for name, ok, _ in verify_lineage(cfg, info)}
    assert checks["black-box teacher's identity hashes to its version"]
