"""The one home of black-box teachers over HTTP: MLflow's scoring protocol, OpenAI-compatible chat completions (an
LLM teacher, ``ChatClient``), and the cache of what they answered.

``EndpointClient`` posts ``{"inputs": [texts], "params": {...}}`` to ``{url}/invocations`` with a bearer token read
from the environment (``teacher.endpoint.api_key_env``; never logged), retries 429, 5xx, timeouts and refused
connections with exponential backoff (urllib3's ``Retry``, honouring ``Retry-After``), keeps ``concurrency``
requests in flight under an optional rate limit, and stops when more than ``max_failure_rate`` of its requests still
fail after their retries. 401/403 stop at once.

``AnswerCache`` keeps every answer of a well-formed response by (teacher identity, text digest) in SQLite (one
committed transaction per response), so a killed labelling resumes without asking an answered text again and a new
data version or transfer set asks only its new texts. Nothing from a failed or malformed response is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from distillery.config import EndpointConfig, LlmConfig
from distillery.errors import DistilleryError
from distillery.faults import fault_point
from distillery.models.answers import (Answer, MalformedResponse, label_schema, logprob_answer, parse_label,
                                       parse_predictions, render_messages, structured_label, token_at)
from distillery.models.labelling import text_digests
from distillery.models.progress import progress_bar
from distillery.records import identity_digest

logger = logging.getLogger(__name__)

RETRIED_STATUSES = (429, 500, 502, 503, 504)
MIN_REQUESTS_FOR_RATE = 5  # the failure rate is judged once this many requests have ended


class EndpointError(DistilleryError, RuntimeError):
    """The endpoint teacher could not be asked (unreachable, refused, failing too often): answers received before
    are cached, nothing else changed."""


class BudgetExceeded(EndpointError):
    """Asking the texts would exceed ``teacher.endpoint.max_requests`` / ``max_cost``: nothing was asked."""


def public_url(url: str) -> str:
    """The URL without credentials or a query (what may be logged and tagged)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def invocations_url(url: str) -> str:
    """``url`` with MLflow's scoring path (``/invocations``) when it does not end in it already (a query stays)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    path = path if path.endswith("/invocations") else path + "/invocations"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def endpoint_identity(cfg: EndpointConfig) -> dict:
    """What makes this teacher's answers what they are: where it is and what it is asked with (not how fast)."""
    return {"kind": "endpoint", "url": public_url(invocations_url(cfg.url or "")), "params": dict(cfg.params)}


@dataclass(frozen=True)
class Cached:
    """A cached answer with the request it came in: its latency (ms) and how many texts it carried."""

    answer: Answer
    request_ms: float
    request_texts: int


class AnswerCache:
    """Answers by (teacher identity, text digest) in ``folder/answers.sqlite``."""

    def __init__(self, folder: Path, identity: dict):
        self.path = Path(folder) / "answers.sqlite"
        self.identity = identity_digest(identity)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS answers (identity TEXT NOT NULL, digest TEXT NOT NULL, "
                       "answer TEXT NOT NULL, request_ms REAL NOT NULL, request_texts INTEGER NOT NULL, "
                       "asked_at TEXT NOT NULL, PRIMARY KEY (identity, digest))")
            db.execute("CREATE TABLE IF NOT EXISTS identities (identity TEXT PRIMARY KEY, description TEXT)")
            db.execute("INSERT OR IGNORE INTO identities VALUES (?, ?)",
                       (self.identity, json.dumps(identity, sort_keys=True)))

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def lookup(self, digests: Iterable[str]) -> dict[str, Cached]:
        wanted = list(dict.fromkeys(digests))
        found: dict[str, Cached] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                rows = db.execute(f"SELECT digest, answer, request_ms, request_texts FROM answers WHERE identity = ? "
                                  f"AND digest IN ({','.join('?' * len(chunk))})", (self.identity, *chunk))
                for digest, answer, ms, n in rows:
                    found[digest] = Cached(Answer.from_json(answer), float(ms), int(n))
        return found

    def store(self, digests: list[str], answers: list[Answer], request_ms: float) -> None:
        """One response's answers, in one transaction (all or none)."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                           [(self.identity, d, a.to_json(), request_ms, len(digests), now)
                            for d, a in zip(digests, answers)])

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM answers WHERE identity = ?", (self.identity,)).fetchone()[0])


class _RateLimit:
    """At most ``per_second`` request starts per second, across threads."""

    def __init__(self, per_second: float | None):
        self.gap = 1.0 / per_second if per_second else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.gap:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        time.sleep(max(0.0, start - now))


@dataclass
class AskReport:
    """What one round of asking did: requests sent, failed (after retries), texts answered, the first failures."""

    requests: int = 0
    failed: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


class EndpointClient:
    """Asks a model server that speaks MLflow's scoring protocol."""

    def __init__(self, cfg: EndpointConfig):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        if not cfg.url:
            raise EndpointError("teacher.endpoint.url is not set")
        self.cfg = cfg
        self.url = invocations_url(cfg.url)
        self.shown = public_url(self.url)
        self.session = requests.Session()
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries,
                      backoff_factor=cfg.backoff_s, status_forcelist=RETRIED_STATUSES, allowed_methods=None,
                      respect_retry_after_header=True, raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(cfg.concurrency, 1))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Content-Type"] = "application/json"
        if cfg.api_key_env:
            token = os.environ.get(cfg.api_key_env)
            if not token:
                raise EndpointError(f"teacher.endpoint.api_key_env names {cfg.api_key_env}, which is not set in the "
                                    f"environment: export the endpoint's token there")
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.rate = _RateLimit(cfg.requests_per_second)

    texts_per_request = property(lambda self: self.cfg.texts_per_request)

    def ask(self, texts: list[str]) -> tuple[list[Answer], float]:
        """One request: an answer per text and its latency (ms). EndpointError (refused credentials) ends the
        labelling; any other failure raises a plain exception the caller counts."""
        body, elapsed = self.post({"inputs": texts, "params": dict(self.cfg.params)})
        return parse_predictions(body, len(texts)), elapsed

    def post(self, payload: dict) -> tuple[object, float]:
        """POST ``payload`` as JSON: the parsed reply and its latency (ms)."""
        import requests

        self.rate.wait()
        start = time.perf_counter()
        try:
            response = self.session.post(self.url, json=payload, timeout=self.cfg.timeout_s)
        except requests.exceptions.RequestException as exc:
            raise ConnectionError(f"{self.shown} did not answer ({_cause(exc)})") from None
        elapsed = (time.perf_counter() - start) * 1000.0
        if response.status_code in (401, 403):
            raise EndpointError(f"{self.shown} refused the request ({response.status_code}): "
                                + (f"check the token in ${self.cfg.api_key_env}" if self.cfg.api_key_env else
                                   "it needs credentials: set teacher.endpoint.api_key_env to the variable holding "
                                   "its token"))
        if response.status_code != 200:
            raise ConnectionError(f"{self.shown} answered {response.status_code}: {response.text[:200]!r}")
        try:
            return response.json(), elapsed
        except ValueError:
            raise MalformedResponse(f"{self.shown} answered with malformed JSON: {response.text[:200]!r}") from None

    def close(self) -> None:
        self.session.close()


def chat_url(url: str) -> str:
    """``url`` (an OpenAI-compatible API's base, e.g. ``http://host:8000/v1``) with ``/chat/completions``."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def llm_identity(cfg: EndpointConfig, llm: LlmConfig, labels: list[str], examples: list[tuple[str, str]]) -> dict:
    """An LLM teacher is its server, model and everything its prompt says: the label list, descriptions, examples
    and generation settings (hashed)."""
    prompt = {"system": llm.system_prompt, "prompt": llm.prompt, "descriptions": dict(llm.descriptions),
              "labels": list(labels), "examples": [list(e) for e in examples], "max_tokens": llm.max_tokens,
              "temperature": llm.temperature, "logprobs": llm.logprobs, "top_logprobs": llm.top_logprobs}
    if llm.structured_output != "none":  # answers asked without it keep their identity (and cache)
        prompt["structured_output"] = llm.structured_output
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]
    return {"kind": "llm", "url": public_url(chat_url(cfg.url or "")), "model": llm.model, "prompt_sha256": digest}


class ChatClient(EndpointClient):
    """Asks a chat model (OpenAI-compatible ``/chat/completions``) for each text's label, one text per request:
    the reply parsed into ``labels``, or soft labels from the first token's log-probabilities when returned."""

    texts_per_request = 1

    def __init__(self, cfg: EndpointConfig, llm: LlmConfig, labels: list[str], examples: list[tuple[str, str]]):
        super().__init__(cfg)
        self.url, self.llm, self.labels, self.examples = chat_url(cfg.url or ""), llm, labels, examples
        self.shown = public_url(self.url)

    def messages(self, text: str) -> list[dict[str, str]]:
        return render_messages(text, self.labels, self.llm.system_prompt, self.llm.prompt, self.llm.descriptions,
                               self.examples)

    def ask(self, texts: list[str]) -> tuple[list[Answer], float]:
        answers, total = [], 0.0
        for text in texts:
            payload = {"model": self.llm.model, "messages": self.messages(text), "max_tokens": self.llm.reply_tokens,
                       "temperature": self.llm.temperature}
            if self.llm.logprobs:
                payload |= {"logprobs": True, "top_logprobs": self.llm.top_logprobs}
            if self.llm.structured_output != "none":
                payload["response_format"] = label_schema(self.labels, self.llm.structured_output)
            body, elapsed = self.post(payload)
            answers.append(chat_answer(body, self.labels))
            total += elapsed
        return answers, total


def chat_answer(body: object, labels: list[str]) -> Answer:
    """A chat completion's answer: soft labels from the top log-probabilities of the token where the label starts
    (the first token of a free-text reply; in a ``{"label": ...}`` reply, the value's) when the server gave them and
    they name a label, else the reply parsed into the label set. MalformedResponse when the body is not a chat
    completion."""
    try:
        choice = body["choices"][0]  # type: ignore[index]
        content = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise MalformedResponse(f"not a chat completion (no choices[0].message.content): {str(body)[:200]!r}") from None
    structured = structured_label(content)
    said, start = structured if structured else (content, 0)
    tokens = ((choice.get("logprobs") or {}).get("content") or [])
    first = token_at(tokens, start)
    if first is not None and first.get("top_logprobs"):
        soft = logprob_answer(first["top_logprobs"], labels)
        if soft is not None:
            return soft
    return parse_label(said, labels)


def _cause(exc: BaseException) -> str:
    """The root reason of a requests failure, in a few words (refused, timed out...)."""
    text = str(exc)
    for marker, words in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Read timed out", "timed out"), ("Name or service not known", "unknown host"),
                          ("Max retries exceeded", "retries exhausted")):
        if marker in text:
            return words if marker != "Max retries exceeded" else f"retries exhausted: {text[-160:]}"
    return text[:200]


def ask_texts(client: EndpointClient, cache: AnswerCache, texts: list[str],
              on_request: Callable[[], None] = lambda: None) -> AskReport:
    """Ask ``texts`` (none of them cached) in requests of ``texts_per_request``, ``concurrency`` at a time, storing
    each well-formed response's answers as it arrives. Stops (EndpointError) once more than ``max_failure_rate`` of
    the requests so far failed after their retries; what was answered before stays cached."""
    cfg = client.cfg
    digests = text_digests(texts).tolist()
    size = client.texts_per_request
    batches = [(texts[i:i + size], digests[i:i + size]) for i in range(0, len(texts), size)]
    report = AskReport()
    bar = progress_bar(total=len(batches), desc=f"ask {client.shown}", unit="request", leave=False)
    pending: dict[Future, list[str]] = {}
    queue = iter(batches)
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="endpoint") as pool:
        def submit_next() -> bool:
            batch = next(queue, None)
            if batch is None:
                return False
            pending[pool.submit(client.ask, batch[0])] = batch[1]
            return True

        for _ in range(cfg.concurrency):
            submit_next()
        try:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    batch_digests = pending.pop(future)
                    report.requests += 1
                    try:
                        answers, ms = future.result()
                    except EndpointError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - every other failure is counted, never cached
                        report.failed += 1
                        if len(report.errors) < 3:
                            report.errors.append(str(exc))
                        logger.warning("endpoint request failed: %s", exc)
                    else:
                        cache.store(batch_digests, answers, ms)
                        fault_point("endpoint.answered")  # a response paid for and kept: a kill here loses nothing
                        report.answered += len(answers)
                        report.latencies_ms.append(ms)
                    on_request()
                    bar.update(1)
                    check_failures(report, cfg.max_failure_rate, client.shown)
                    submit_next()
            check_failures(report, cfg.max_failure_rate, client.shown, final=True)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            bar.close()
    return report


def check_failures(report: AskReport, limit: float, shown: str, final: bool = False) -> None:
    """EndpointError when the share of failed requests is over ``limit`` (judged after a few requests, or at the
    end)."""
    if not report.failed or (report.requests < MIN_REQUESTS_FOR_RATE and not final):
        return
    if report.failure_rate > limit:
        raise EndpointError(
            f"endpoint teacher {shown}: {report.failed} of {report.requests} requests failed after retries "
            f"(teacher.endpoint.max_failure_rate {limit}); e.g. {'; '.join(report.errors)}. The {report.answered} "
            f"texts answered so far are cached: a re-run asks only the rest")
