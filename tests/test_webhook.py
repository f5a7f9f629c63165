"""The MLflow webhook receiver, over real HTTP on loopback, with MLflow's own signing code as the sender."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from distillery.webhook import make_handler, serve, verify

SECRET = "test-secret"


@pytest.fixture()
def receiver():
    calls: list[tuple[str, str]] = []
    server = serve("127.0.0.1", 0, make_handler(SECRET, "teacher", "production",
                                                lambda v, why: calls.append((v, why)) or "event-1"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", calls
    server.shutdown()
    server.server_close()


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
