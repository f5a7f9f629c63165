"""A black-box teacher's answers: what an endpoint said about one text, turned into soft labels over the data's labels.

An endpoint (MLflow's scoring protocol) answers per text with per-label probabilities, its top k, or only a label.
``parse_predictions`` reads a response body into one ``Answer`` per text (a {label: probability} mapping and whether
it was a label alone); ``soft_labels`` turns answers into (rows, classes) probabilities and logits over the data's
label set, spreading the mass an answer leaves unsaid evenly over the labels it did not name. An answer naming a
label outside the set is not a soft label: its row is marked unanswered (the Great Expectations suite bounds their
share). ``plan_requests`` is the budget's arithmetic. Pure code: no HTTP, no files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from distillery.errors import DistilleryError

FLOOR = 1e-6  # no label gets less probability than this: logits stay finite


class MalformedResponse(DistilleryError, ValueError):
    """A response that is not an answer per text in a shape this protocol knows: nothing of it is kept."""


@dataclass(frozen=True)
class Answer:
    """What the teacher said about one text: probabilities by label name (all labels, the top k, or one label with
    its confidence when it gave one), and ``hard`` when it answered a label alone."""

    probs: Mapping[str, float]
    hard: bool = False

    def to_json(self) -> str:
        return json.dumps({"probs": dict(self.probs), "hard": self.hard}, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Answer":
        data = json.loads(text)
        return cls(probs={str(k): float(v) for k, v in data["probs"].items()}, hard=bool(data["hard"]))

    @property
    def top(self) -> str:
        return max(self.probs, key=lambda k: self.probs[k])


def _probability(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= float(value) <= 1.0:
        raise MalformedResponse(f"{what} is not a probability in [0, 1]: {value!r}")
    return float(value)


def _answer(item: Any) -> Answer:
    """One text's prediction: {"top_k": [{label, probability}...]} (distillery's own served models),
    {"label": L, "confidence": p}, {label: probability, ...} (a model answering per-label columns) or "L"."""
    if isinstance(item, str):
        return Answer({item: 1.0}, hard=True)
    if not isinstance(item, dict) or not item:
        raise MalformedResponse(f"a prediction must be a label or an object, got {type(item).__name__}")
    if isinstance(item.get("top_k"), list) and item["top_k"]:
        probs: dict[str, float] = {}
        for entry in item["top_k"]:
            if not isinstance(entry, dict) or "label" not in entry or "probability" not in entry:
                raise MalformedResponse(f"a top_k entry needs label and probability, got {entry!r}")
            probs[str(entry["label"])] = _probability(entry["probability"], f"top_k probability of {entry['label']!r}")
        return Answer(probs, hard=len(probs) == 1 and "confidence" not in item)
    if "label" in item and isinstance(item["label"], str):
        if item.get("confidence") is None:
            return Answer({item["label"]: 1.0}, hard=True)
        return Answer({item["label"]: _probability(item["confidence"], "confidence")}, hard=False)
    return Answer({str(k): _probability(v, f"probability of {k!r}") for k, v in item.items()})


def parse_predictions(body: Any, expected: int) -> list[Answer]:
    """One Answer per text from an MLflow scoring response (``{"predictions": [...]}``, or the list alone as older
    servers answer; a column-oriented ``{"label": [...], ...}`` too). MalformedResponse when it is not one answer per
    text."""
    predictions = body.get("predictions", body) if isinstance(body, dict) else body
    if isinstance(predictions, dict):  # columns: {"label": [...], "confidence": [...]} -> records
        columns = {k: v for k, v in predictions.items() if isinstance(v, list)}
        if not columns or len({len(v) for v in columns.values()}) != 1:
            raise MalformedResponse(f"predictions are neither a list nor equal-length columns: {sorted(predictions)}")
        n = len(next(iter(columns.values())))
        predictions = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    if not isinstance(predictions, list):
        raise MalformedResponse(f"predictions must be a list, got {type(predictions).__name__}")
    if len(predictions) != expected:
        raise MalformedResponse(f"{len(predictions)} predictions for {expected} texts")
    return [_answer(item) for item in predictions]


@dataclass(frozen=True)
class SoftLabels:
    """Answers over the data's label set: (rows, classes) probabilities and their logits (log-probabilities),
    ``answered`` per row (False: no answer, or one naming a label outside the set: a uniform row), and the kind of
    answer the rows carry (``full``, ``top_k`` or ``hard``; the least informative one seen)."""

    probs: np.ndarray
    logits: np.ndarray
    answered: np.ndarray
    kind: str


def soft_labels(answers: Sequence[Answer | None], labels: Sequence[str], hard_smoothing: float) -> SoftLabels:
    """Probabilities over ``labels`` per answer: what it names (a hard label gets ``1 - hard_smoothing`` unless it
    gave its confidence), the rest of the mass spread evenly over the labels it did not name, every label at least
    ``FLOOR``. A missing answer, or one naming a label outside ``labels``, gives a uniform row marked unanswered."""
    index = {name: i for i, name in enumerate(labels)}
    k = len(labels)
    probs = np.full((len(answers), k), 1.0 / k, dtype=np.float64)
    answered = np.zeros(len(answers), dtype=bool)
    kinds = set()
    for row, answer in enumerate(answers):
        if answer is None or not answer.probs or any(name not in index for name in answer.probs):
            continue
        named = {index[name]: p for name, p in answer.probs.items()}
        if answer.hard:
            named = {i: 1.0 - hard_smoothing for i in named}
        total = sum(named.values())
        if total > 1.0:
            named = {i: p / total for i, p in named.items()}
            total = 1.0
        rest = [i for i in range(k) if i not in named]
        vec = np.zeros(k, dtype=np.float64)
        for i, p in named.items():
            vec[i] = p
        if rest:
            vec[rest] = (1.0 - total) / len(rest)
        vec = np.maximum(vec, FLOOR)
        probs[row] = vec / vec.sum()
        answered[row] = True
        kinds.add("hard" if answer.hard else ("full" if len(named) == k else "top_k"))
    kind = next((name for name in ("hard", "top_k", "full") if name in kinds), "none")
    return SoftLabels(probs=probs.astype(np.float32), logits=np.log(probs).astype(np.float32), answered=answered,
                      kind=kind)


@dataclass(frozen=True)
class RequestPlan:
    """What asking ``texts`` costs: requests of ``texts_per_request`` texts at the configured prices."""

    texts: int
    cached: int
    to_ask: int
    requests: int
    cost: float

    def over_budget(self, max_requests: int | None, max_cost: float | None) -> str | None:
        """Why this plan exceeds the budget, or None."""
        if max_requests is not None and self.requests > max_requests:
            return f"{self.requests} requests needed, teacher.endpoint.max_requests is {max_requests}"
        if max_cost is not None and self.cost > max_cost + 1e-12:
            return f"estimated cost {self.cost:.4f} exceeds teacher.endpoint.max_cost {max_cost}"
        return None

    def describe(self) -> str:
        return (f"{self.texts} texts: {self.cached} answered already (cached), {self.to_ask} to ask; "
                f"{self.requests} requests in all (re-checks included), estimated cost {self.cost:.4f}")


def plan_requests(texts: int, cached: int, texts_per_request: int, price_per_request: float,
                  price_per_1k_texts: float) -> RequestPlan:
    """The budget's arithmetic for asking the ``texts - cached`` texts not answered yet."""
    to_ask = max(texts - cached, 0)
    requests = math.ceil(to_ask / texts_per_request) if to_ask else 0
    cost = requests * price_per_request + to_ask * price_per_1k_texts / 1000.0
    return RequestPlan(texts=texts, cached=cached, to_ask=to_ask, requests=requests, cost=cost)


def choose_texts(texts: Sequence[str], k: int, method: str, seed: int) -> list[int]:
    """Which ``k`` of ``texts`` to ask a paid teacher first, as sorted indices: ``random`` (a seeded sample) or
    ``diverse``: the texts nearest the centres of ``k`` clusters of their TF-IDF vectors (reduced to 64 dimensions),
    so the answers bought cover the ways the texts differ rather than repeat their most common kind."""
    if k >= len(texts):
        return list(range(len(texts)))
    if k <= 0:
        return []
    rng = np.random.default_rng(seed)
    if method == "random":
        return sorted(int(i) for i in rng.choice(len(texts), size=k, replace=False))
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import pairwise_distances_argmin

    vectors = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1).fit_transform(list(texts))
    dims = max(1, min(64, vectors.shape[1] - 1, len(texts) - 1))
    reduced = TruncatedSVD(dims, random_state=seed).fit_transform(vectors) if vectors.shape[1] > 1 else \
        vectors.toarray()
    centres = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048).fit(reduced).cluster_centers_
    chosen: set[int] = set()
    for nearest in pairwise_distances_argmin(centres, reduced):  # one text per centre; a text two centres share
        chosen.add(int(nearest))                                  # counts once, the rest filled at random
    rest = [i for i in rng.permutation(len(texts)).tolist() if i not in chosen]
    chosen.update(rest[:k - len(chosen)])
    return sorted(chosen)


def affordable_texts(required: int, optional: int, recheck: int, texts_per_request: int, price_per_request: float,
                     price_per_1k_texts: float, max_requests: int | None, max_cost: float | None) -> int:
    """How many of ``optional`` further texts fit the budget beside the ``required`` ones still to ask and the
    ``recheck`` texts re-asked (each in requests of its own); -1 when the required texts alone do not fit."""
    def fits(extra: int) -> bool:
        plan = plan_requests(required + extra, 0, texts_per_request, price_per_request, price_per_1k_texts)
        again = plan_requests(recheck, 0, texts_per_request, price_per_request, price_per_1k_texts)
        total = RequestPlan(plan.texts, 0, plan.to_ask, plan.requests + again.requests, plan.cost + again.cost)
        return total.over_budget(max_requests, max_cost) is None

    if not fits(0):
        return -1
    low, high = 0, optional  # the largest extra that fits: fits() only turns False as extra grows
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def few_shot_examples(texts: Sequence[str], labels: Sequence[str], label_ids: Sequence[int], n: int,
                      seed: int) -> list[tuple[str, str]]:
    """``n`` (text, label) examples for an LLM teacher's prompt, a seeded choice from the training rows spread over
    the labels (one per label in turn, as far as ``n`` goes)."""
    if n <= 0 or not len(texts):
        return []
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i in rng.permutation(len(texts)).tolist():
        by_label.setdefault(int(label_ids[i]), []).append(i)
    order, queues = [], [by_label[k] for k in sorted(by_label)]
    while len(order) < n and any(queues):
        for queue in queues:
            if queue and len(order) < n:
                order.append(queue.pop())
    return [(str(texts[i]), str(labels[int(label_ids[i])])) for i in order]


def render_messages(text: str, labels: Sequence[str], system_prompt: str | None, prompt: str,
                    descriptions: Mapping[str, str], examples: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The chat messages that ask an LLM teacher for ``text``'s label: the system prompt (none when empty), then
    ``prompt`` with ``{labels}`` (one per line, with a description where given), ``{choices}`` (the names inline:
    "a, b or c"), ``{examples}`` and ``{text}`` filled in."""
    listed = "\n".join(f"- {name}" + (f": {descriptions[name]}" if descriptions.get(name) else "") for name in labels)
    choices = " or ".join([", ".join(labels[:-1]), labels[-1]]) if len(labels) > 1 else "".join(labels)
    shown = "".join(f"Text: {t}\nLabel: {label}\n\n" for t, label in examples)
    user = prompt.format(labels=listed, choices=choices, examples=shown, text=text)
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": user}]


def _normal(name: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def parse_label(content: str, labels: Sequence[str]) -> Answer:
    """An LLM's reply as a label: the reply itself when it is a label (case, punctuation, ``_`` against spaces
    aside), else the longest label named in it; else the reply as given (a label outside the set: unanswered)."""
    said = _normal(content)
    normal = {_normal(name): name for name in labels}
    if said in normal:
        return Answer({normal[said]: 1.0}, hard=True)
    named = [n for n in sorted(normal, key=len, reverse=True) if n and f" {n} " in f" {said} "]
    if named:
        return Answer({normal[named[0]]: 1.0}, hard=True)
    return Answer({content.strip()[:80] or "(empty reply)": 1.0}, hard=True)


def label_schema(labels: Sequence[str], style: str = "json_schema") -> dict[str, Any]:
    """The ``response_format`` that constrains a chat reply to ``{"label": <one of labels>}``: ``json_schema``, OpenAI's
    form (vLLM, llama.cpp's llama-server, Ollama, SGLang, OpenAI's API), or ``json_object`` with the schema beside it
    (llama-cpp-python's server, which refuses OpenAI's form, and llama-server)."""
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
              "required": ["label"], "additionalProperties": False}
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}


def structured_label(content: str) -> tuple[str, int] | None:
    """The label of a structured reply (``{"label": "..."}``) and where its value starts in ``content``; None when
    the reply is not such an object (a server that ignored the schema answers free text)."""
    try:
        said = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(said, dict) or not isinstance(said.get("label"), str):
        return None
    value = said["label"]
    quoted = json.dumps(value)[1:-1]  # as the server wrote it (escapes and all)
    start = content.find(quoted, content.find('"label"') + len('"label"'))
    return value, max(start, 0)


def token_at(tokens: Sequence[Mapping[str, Any]], offset: int) -> Mapping[str, Any] | None:
    """The reply token that covers character ``offset`` of the reply (the tokens' texts laid end to end)."""
    position = 0
    for token in tokens:
        position += len(str(token.get("token", "")))
        if position > offset:
            return token
    return None


def logprob_answer(top_logprobs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> Answer | None:
    """Soft labels from the log-probabilities of the reply's first token: each alternative token credits the one
    label whose name starts with it (tokens matching no label, or several, credit none); None when no label is
    credited. The mass of uncredited tokens is left for ``soft_labels`` to spread."""
    normal = [(_normal(name), name) for name in labels]
    probs: dict[str, float] = {}
    for entry in top_logprobs:
        token = _normal(str(entry.get("token", "")))
        if not token:
            continue
        matches = [name for n, name in normal if n.startswith(token)]
        if len(matches) == 1:
            probs[matches[0]] = probs.get(matches[0], 0.0) + math.exp(float(entry["logprob"]))
    if not probs:
        return None
    total = sum(probs.values())
    return Answer({k: v / total if total > 1 else v for k, v in probs.items()})
