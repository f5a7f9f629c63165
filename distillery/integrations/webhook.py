"""The receiver for MLflow registry webhooks, a FastAPI app served by uvicorn: a verified
``model_version_alias.created`` on the teacher's alias becomes the Prefect event the watch flow emits
(``distillery.redistill.requested``).

Signatures follow MLflow's scheme: HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>`` with the shared secret,
sent as ``X-MLflow-Signature: v1,<base64>``; deliveries older than ``max_age_s`` are refused, a delivery id seen within
that window is a replay (acknowledged, nothing emitted), and a body larger than ``max_body_bytes`` is answered 413
before it is read in full. A signed payload that is not an MLflow event gets a 400 with the reason. The secret comes from the
environment (DISTILLERY_WEBHOOK_SECRET), never from code or prefect.yaml.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

SECRET_ENV = "DISTILLERY_WEBHOOK_SECRET"
MAX_BODY_BYTES = 64 * 1024  # an MLflow alias delivery is a few hundred bytes
MAX_AGE_S = 300  # deliveries older than this are stale; ids seen within it are replays


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: str, max_age_s: int = MAX_AGE_S, now: float | None = None) -> str | None:
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


class SeenDeliveries:
    """Delivery ids answered within the freshness window: a replayed delivery (same id, still fresh, so its signature
    still verifies) is acknowledged without emitting again. Older ids are forgotten, as the stale check refuses them."""

    def __init__(self, max_age_s: int):
        self.max_age_s = max_age_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_time(self, delivery_id: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            self._seen = {k: t for k, t in self._seen.items() if now - t <= 2 * self.max_age_s}
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True


def parse_alias_delivery(body: str) -> tuple[str, dict]:
    """``(entity.action, data)`` of an MLflow webhook payload; ValueError with the reason when it is not one (for a
    ``model_version_alias`` event, data needs ``name``, ``alias`` and a numeric ``version``)."""
    try:
        message = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(message, dict):
        raise ValueError(f"payload is a JSON {type(message).__name__}, not an object")
    entity, action, data = message.get("entity"), message.get("action"), message.get("data")
    if not isinstance(entity, str) or not isinstance(action, str):
        raise ValueError("payload lacks string `entity` and `action` fields")
    if not isinstance(data, dict):
        raise ValueError(f"payload `data` is {type(data).__name__}, not an object")
    kind = f"{entity}.{action}"
    if entity == "model_version_alias":
        missing = [k for k in ("name", "alias", "version") if not isinstance(data.get(k), (str, int))]
        if missing:
            raise ValueError(f"{kind} payload lacks {', '.join(missing)} in `data`")
        if not str(data["version"]).isdigit():
            raise ValueError(f"{kind} payload has version {str(data['version'])[:20]!r}, not a version number")
    return kind, data


def create_app(secret: str, teacher_name: str, teacher_alias: str, on_teacher_alias: Callable[[str, str], str | None],
               max_body_bytes: int = MAX_BODY_BYTES, max_age_s: int = MAX_AGE_S) -> FastAPI:
    """The receiver app; ``on_teacher_alias(version, reason)`` is called once per matching, verified delivery."""
    app = FastAPI(title="distillery webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    seen = SeenDeliveries(max_age_s)

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
        headers = {k.lower(): v for k, v in request.headers.items()}
        problem = verify(secret, headers, body, max_age_s)
        if problem:
            logger.warning("refused webhook delivery: %s", problem)
            return JSONResponse({"error": problem}, status_code=401)
        try:
            kind, data = parse_alias_delivery(body)
        except ValueError as exc:
            logger.warning("refused signed webhook delivery: %s", exc)
            return JSONResponse({"error": f"not an MLflow webhook payload: {exc}"}, status_code=400)
        delivery = headers["x-mlflow-delivery-id"]
        if not seen.first_time(delivery):
            logger.warning("webhook delivery %s replayed: acknowledged, nothing emitted", delivery)
            return JSONResponse({"replayed": delivery}, status_code=200)
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
