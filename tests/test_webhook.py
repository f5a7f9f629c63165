"""The MLflow webhook receiver, over real HTTP on loopback, with MLflow's own signing code as the sender."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

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


def _post(url: str, message: dict, secret: str = SECRET, timestamp: int | None = None) -> tuple[int, dict]:
    body = json.dumps(message)
    ts = str(timestamp or int(time.time()))
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": _generate_hmac_signature(secret, "d-1", ts, body)}
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
