"""The limits in front of a served model: an ASGI middleware around MLflow's scoring app (``POST /invocations``).

MLflow's scoring server turns ``{"inputs": [3, "x"]}`` into the strings ``"3"`` and ``"x"`` before the model sees
them, reads bodies of any size, and answers some bad requests with the whole body echoed back. In front of it, this
guard reads at most ``max_body_bytes`` (413 beyond), parses JSON inputs itself and refuses any text that is not a
string (400, no coercion), more than ``max_texts`` texts (413) or a text longer than ``max_text_chars`` characters
(413); and it cuts every error the app answers to a short message. No answer ever repeats the request body.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class ServingLimits:
    max_body_bytes: int = 2 * 1024 * 1024
    max_texts: int = 1000
    max_text_chars: int = 10_000


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _column(columns: list, rows: list[list]) -> list:
    index = columns.index("text") if "text" in columns else 0 if len(columns) == 1 else None
    if index is None:
        raise Refused(400, f"a DataFrame input needs one column or a `text` column; got {columns[:5]}")
    return [row[index] if isinstance(row, list) and len(row) > index else None for row in rows]


def texts_of(payload: Any) -> list | None:
    """The texts of an MLflow scoring payload (``inputs``, ``instances``, ``dataframe_split``, ``dataframe_records``),
    as sent, without coercion; None for a shape this guard does not know (the app answers it)."""
    if not isinstance(payload, dict):
        raise Refused(400, f"the body is a JSON {type(payload).__name__}; expected an object such as "
                           f'{{"inputs": ["a text", ...]}}')
    for key in ("inputs", "instances"):
        if key in payload:
            value = payload[key]
            if isinstance(value, dict):  # named columns: {"text": [...]}
                if "text" in value or len(value) == 1:
                    value = value.get("text", next(iter(value.values()), []))
            return value if isinstance(value, list) else [value]
    if isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        return _column(list(split.get("columns") or ["text"]), list(split.get("data") or []))
    if isinstance(payload.get("dataframe_records"), list):
        records = payload["dataframe_records"]
        keys = sorted({k for r in records if isinstance(r, dict) for k in r})
        return _column(keys, [[r.get(k) for k in keys] if isinstance(r, dict) else r for r in records])
    return None


def check_texts(texts: list, limits: ServingLimits) -> None:
    if len(texts) > limits.max_texts:
        raise Refused(413, f"{len(texts)} texts in one request; at most {limits.max_texts} (serving.max_texts)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise Refused(400, f"every input must be a string; item {i} is {type(text).__name__}")
        if len(text) > limits.max_text_chars:
            raise Refused(413, f"text {i} has {len(text)} characters; at most {limits.max_text_chars} "
                               f"(serving.max_text_chars)")


def check_json_body(body: bytes, limits: ServingLimits) -> None:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise Refused(400, f"the body is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except UnicodeDecodeError as exc:
        raise Refused(400, f"the body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    texts = texts_of(payload)
    if texts is not None:
        check_texts(texts, limits)


async def _reply(send: Send, status: int, message: str) -> None:
    code = "RESOURCE_LIMIT_EXCEEDED" if status == 413 else "INVALID_PARAMETER_VALUE"
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _short_error(body: bytes) -> bytes:
    """An error answer cut to its code and the start of its message (MLflow may quote the input in it)."""
    try:
        parsed = json.loads(body)
        message, code = str(parsed.get("message", "")), parsed.get("error_code", "BAD_REQUEST")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        message, code = body[:MAX_ERROR_CHARS * 4].decode("utf-8", "replace"), "BAD_REQUEST"
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " (cut)"
    return json.dumps({"error_code": code, "message": message}).encode()


class Guard:
    """ASGI middleware: the limits above on ``POST /invocations``; every other route passes through."""

    def __init__(self, app: Callable, limits: ServingLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        limit = self.limits.max_body_bytes
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _reply(send, 413, f"body larger than {limit} bytes (serving.max_body_bytes)")
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _reply(send, 413, f"body larger than {limit} bytes (serving.max_body_bytes)")
                return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        try:
            if content_type == b"application/json":
                check_json_body(bytes(body), self.limits)
        except Refused as refused:
            logger.warning("refused a request: %s", refused)
            await _reply(send, refused.status, str(refused))
            return
        await self.app(scope, _replay(bytes(body), receive), _errors_cut(send))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _errors_cut(send: Send) -> Send:
    """Pass a success through; hold an error answer back and send it cut short (``_short_error``)."""
    state: dict[str, Any] = {"start": None, "body": bytearray()}

    async def forward(message: dict) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await send(message)
                return
            state["start"] = message
            return
        if state["start"] is None:
            await send(message)
            return
        state["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = _short_error(bytes(state["body"]))
        headers = [(k, v) for k, v in state["start"].get("headers", []) if k.lower() not in (b"content-length",
                                                                                              b"content-type")]
        await send({**state["start"], "headers": headers + [(b"content-type", b"application/json"),
                                                            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return forward
