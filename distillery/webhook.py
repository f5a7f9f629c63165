"""A small receiver for MLflow registry webhooks: a verified ``model_version_alias.created`` on the teacher's
alias becomes the same Prefect event the watch flow emits (``distillery.redistill.requested``).

Signatures follow MLflow's scheme: HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>`` with the shared secret,
sent as ``X-MLflow-Signature: v1,<base64>``; deliveries older than ``max_age_s`` are refused (replay protection).
The secret comes from the environment (DISTILLERY_WEBHOOK_SECRET), never from code or prefect.yaml.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

logger = logging.getLogger(__name__)

SECRET_ENV = "DISTILLERY_WEBHOOK_SECRET"


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: str, max_age_s: int = 300, now: float | None = None) -> str | None:
    """None when the delivery is authentic and fresh, else the reason it is not."""
    signature = headers.get("x-mlflow-signature", "")
    delivery_id = headers.get("x-mlflow-delivery-id", "")
    timestamp = headers.get("x-mlflow-timestamp", "")
    if not signature or not delivery_id or not timestamp.isdigit():
        return "missing signature headers"
    if abs((now or time.time()) - int(timestamp)) > max_age_s:
        return "stale delivery"
    if not hmac.compare_digest(signature, sign(secret, delivery_id, timestamp, body)):
        return "bad signature"
    return None


def make_handler(secret: str, teacher_name: str, teacher_alias: str,
                 on_teacher_alias: Callable[[str, str], str | None]) -> type[BaseHTTPRequestHandler]:
    """A request handler class; ``on_teacher_alias(version, reason)`` is called for matching, verified deliveries."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._reply(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            problem = verify(secret, {k.lower(): v for k, v in self.headers.items()}, body)
            if problem:
                logger.warning("refused webhook delivery: %s", problem)
                self._reply(401, {"error": problem})
                return
            try:
                message = json.loads(body)
                data = message["data"]
                kind = f"{message['entity']}.{message['action']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                self._reply(400, {"error": "not an MLflow webhook payload"})
                return
            if kind != "model_version_alias.created" or data.get("name") != teacher_name \
                    or data.get("alias") != teacher_alias:
                self._reply(200, {"ignored": kind})
                return
            event_id = on_teacher_alias(str(data["version"]), f"{teacher_name}@{teacher_alias} -> v{data['version']}")
            self._reply(202, {"emitted": event_id})

        def log_message(self, fmt: str, *args: object) -> None:
            logger.info("webhook %s", fmt % args)

    return Handler


def serve(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler)
