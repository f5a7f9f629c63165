"""The receiver for MLflow registry webhooks, a FastAPI app served by uvicorn: a verified
``model_version_alias.created`` on the teacher's alias becomes the Prefect event the watch flow emits
(``distillery.redistill.requested``).

Signatures follow MLflow's scheme: HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>`` with the shared secret,
sent as ``X-MLflow-Signature: v1,<base64>``; deliveries older than ``max_age_s`` are refused (replay protection), and
so is any body larger than ``max_body_bytes`` (answered 413 before it is read in full). The secret comes from the
environment (DISTILLERY_WEBHOOK_SECRET), never from code or prefect.yaml.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

SECRET_ENV = "DISTILLERY_WEBHOOK_SECRET"
MAX_BODY_BYTES = 64 * 1024  # an MLflow alias delivery is a few hundred bytes


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


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is larger than ``limit`` (a lying Content-Length included)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(secret: str, teacher_name: str, teacher_alias: str, on_teacher_alias: Callable[[str, str], str | None],
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The receiver app; ``on_teacher_alias(version, reason)`` is called for matching, verified deliveries."""
    app = FastAPI(title="distillery webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/")
    async def deliver(request: Request) -> JSONResponse:
        raw = await _read_limited(request, max_body_bytes)
        if raw is None:
            logger.warning("refused webhook delivery: body larger than %d bytes", max_body_bytes)
            return JSONResponse({"error": f"body larger than {max_body_bytes} bytes"}, status_code=413)
        body = raw.decode("utf-8", errors="replace")
        problem = verify(secret, {k.lower(): v for k, v in request.headers.items()}, body)
        if problem:
            logger.warning("refused webhook delivery: %s", problem)
            return JSONResponse({"error": problem}, status_code=401)
        try:
            message = json.loads(body)
            data = message["data"]
            kind = f"{message['entity']}.{message['action']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            return JSONResponse({"error": "not an MLflow webhook payload"}, status_code=400)
        if kind != "model_version_alias.created" or data.get("name") != teacher_name \
                or data.get("alias") != teacher_alias:
            return JSONResponse({"ignored": kind}, status_code=200)
        event_id = on_teacher_alias(str(data["version"]), f"{teacher_name}@{teacher_alias} -> v{data['version']}")
        logger.info("webhook: %s@%s -> v%s, emitted %s", teacher_name, teacher_alias, data["version"], event_id)
        return JSONResponse({"emitted": event_id}, status_code=202)

    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve the app with uvicorn until interrupted (access log on: one line per delivery)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
