"""The MLflow webhook receiver, over real HTTP on loopback, with MLflow's own signing code as the sender."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from distillery.integrations.webhook import create_app, verify

SECRET = "test-secret"


@pytest.fixture()
def receiver():
    """The real app on a real uvicorn server on a loopback port."""
    import socket

    import uvicorn

    calls: list[tuple[str, str]] = []
    app = create_app(SECRET, "teacher", "production", lambda v, why: calls.append((v, why)) or "event-1",
                     max_body_bytes=4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", calls
    server.should_exit = True
    thread.join(10)


def _post(url: str, message, secret: str = SECRET, timestamp: int | None = None,
          delivery: str | None = None) -> tuple[int, dict]:
    body = json.dumps(message)
    ts = str(timestamp or int(time.time()))
    delivery = delivery or uuid.uuid4().hex
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, ts, body)}
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _alias(name="teacher", alias="production", version="7"):
    return {"entity": "model_version_alias", "action": "created", "timestamp": "now",
            "data": {"name": name, "alias": alias, "version": version}}


def test_signed_teacher_alias_move_emits(receiver):
    url, calls = receiver
    assert _post(url, _alias()) == (202, {"emitted": "event-1"})
    assert calls == [("7", "teacher@production -> v7")]


def test_bad_signature_and_stale_deliveries_are_refused(receiver):
    url, calls = receiver
    assert _post(url, _alias(), secret="wrong")[0] == 401
    assert _post(url, _alias(), timestamp=int(time.time()) - 3600) == (401, {"error": "stale delivery"})
    assert calls == []


def test_other_models_and_aliases_are_ignored(receiver):
    url, calls = receiver
    assert _post(url, _alias(name="student"))[0] == 200
    assert _post(url, _alias(alias="staging"))[0] == 200
    assert calls == []


def test_verify_rejects_missing_headers():
    assert verify(SECRET, {}, "{}") == "missing signature headers"


def test_oversized_body_is_refused_before_it_is_read(receiver):
    """A large body, or a Content-Length that claims one, gets 413 and emits nothing."""
    import http.client

    url, calls = receiver
    big = _alias()
    big["data"]["padding"] = "x" * 10_000
    assert _post(url, big)[0] == 413
    port = int(url.rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/")
    conn.putheader("Content-Length", str(10**12))  # claims a terabyte, sends nothing
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert calls == []


def test_a_replayed_delivery_emits_once(receiver):
    """The same signed delivery sent three times inside the freshness window: one event, two acknowledgements."""
    url, calls = receiver
    from tests.helpers import fault_row

    answers = [_post(url, _alias(), delivery="d-replayed", timestamp=int(time.time())) for _ in range(3)]
    fault_row("one signed MLflow delivery replayed twice within the freshness window",
              f"answers {[a[0] for a in answers]}; one re-distill event emitted",
              calls == [("7", "teacher@production -> v7")],
              answers == [(202, {"emitted": "event-1"})] + [(200, {"replayed": "d-replayed"})] * 2)


@pytest.mark.parametrize("message, reason", [
    ([1, 2], "payload is a JSON list"),
    ({"entity": "model_version_alias", "action": "created", "data": [1]}, "`data` is list"),
    ({"entity": "model_version_alias", "action": "created", "data": {"name": "teacher", "alias": "production"}},
     "lacks version"),
    ({"entity": "model_version_alias", "action": "created",
      "data": {"name": "teacher", "alias": "production", "version": "../1"}}, "not a version number"),
    ({"action": "created", "data": {}}, "lacks string `entity`"),
])
def test_a_malformed_signed_payload_gets_a_400_with_the_reason(receiver, message, reason):
    url, calls = receiver
    status, body = _post(url, message)
    assert status == 400 and reason in body["error"], body
    assert calls == []


def test_the_receiver_refuses_to_start_where_its_events_would_be_lost(tmp_path):
    """Without PREFECT_API_URL the events would go to a temporary server no deployment listens to; with an
    unreachable one they would fail: either way one line and exit 2, before listening."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["DISTILLERY_WEBHOOK_SECRET"] = SECRET
    (tmp_path / "distillery.yaml").write_text("{}\n")
    cli = [str(Path(sys.executable).parent / "distillery"), "webhook", "serve", "--port", str(free_port())]
    unset = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert unset.returncode == 2 and "set PREFECT_API_URL" in unset.stderr and "Traceback" not in unset.stderr
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"
    down = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "is not reachable" in down.stderr and "webhook receiver on" not in down.stdout
