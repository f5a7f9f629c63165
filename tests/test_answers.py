"""A black-box teacher's answers as soft labels, the budget's arithmetic, and the endpoint teacher's configuration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distillery.config import ConfigError, config_from_dict
from distillery.integrations.endpoint import endpoint_identity, identity_digest, public_url
from distillery.models.answers import Answer, MalformedResponse, parse_predictions, plan_requests, soft_labels
from distillery.records import TeacherRef

LABELS = ["a", "b", "c", "d"]


def test_every_answer_shape_of_the_scoring_protocol_parses():
    top_k = {"label": "a", "confidence": 0.7, "top_k": [{"label": "a", "probability": 0.7},
                                                        {"label": "b", "probability": 0.2}]}
    body = {"predictions": [top_k, {"label": "c", "confidence": 0.6}, {"label": "d"}, "b",
                            {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}]}
    answers = parse_predictions(body, 5)
    assert answers[0] == Answer({"a": 0.7, "b": 0.2}, hard=False)
    assert answers[1] == Answer({"c": 0.6}, hard=False)  # a label with its confidence
    assert answers[2] == Answer({"d": 1.0}, hard=True) and answers[3] == Answer({"b": 1.0}, hard=True)
    assert answers[4].probs == {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4} and answers[4].top == "d"
    # older servers answer the list alone; a column-oriented frame is records by column
    assert parse_predictions(["a", "b"], 2) == [Answer({"a": 1.0}, True), Answer({"b": 1.0}, True)]
    columns = parse_predictions({"predictions": {"label": ["a", "b"], "confidence": [0.9, 0.8]}}, 2)
    assert columns == [Answer({"a": 0.9}), Answer({"b": 0.8})]
    assert Answer.from_json(answers[0].to_json()) == answers[0]


@pytest.mark.parametrize("body, expected, message", [
    ({"predictions": ["a"]}, 2, "1 predictions for 2 texts"),
    ({"predictions": [[0.1, 0.9]]}, 1, "a prediction must be a label or an object"),
    ({"predictions": [{"a": 1.5}]}, 1, "not a probability"),
    ({"predictions": [{"a": float("nan")}]}, 1, "not a probability"),
    ({"predictions": [{"top_k": [{"label": "a"}]}]}, 1, "needs label and probability"),
    ({"predictions": "a"}, 1, "must be a list"),
    ({"predictions": {"label": ["a"], "confidence": [1, 2]}}, 1, "equal-length columns"),
])
def test_a_response_not_one_answer_per_text_is_malformed(body, expected, message):
    with pytest.raises(MalformedResponse, match=message):
        parse_predictions(body, expected)


def test_soft_labels_spread_what_an_answer_leaves_unsaid():
    answers = [Answer({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}), Answer({"a": 0.7, "b": 0.2}),
               Answer({"c": 1.0}, hard=True), Answer({"c": 0.6}), Answer({"zzz": 1.0}, hard=True), None]
    soft = soft_labels(answers, LABELS, hard_smoothing=0.1)
    np.testing.assert_allclose(soft.probs[0], [0.1, 0.2, 0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(soft.probs[1], [0.7, 0.2, 0.05, 0.05], atol=1e-6)  # 0.1 left over, split in two
    np.testing.assert_allclose(soft.probs[2], [0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], atol=1e-6)
    np.testing.assert_allclose(soft.probs[3], [0.4 / 3, 0.4 / 3, 0.6, 0.4 / 3], atol=1e-6)
    # a label outside the set, or no answer: uniform, unanswered
    np.testing.assert_allclose(soft.probs[4:], 0.25)
    assert soft.answered.tolist() == [True, True, True, True, False, False]
    assert soft.kind == "hard"  # the least informative kind seen
    np.testing.assert_allclose(np.exp(soft.logits), soft.probs, rtol=1e-5)
    assert np.isfinite(soft_labels([Answer({"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0})], LABELS, 0.1).logits).all()
    assert soft_labels([Answer({"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0})], LABELS, 0.1).kind == "full"


def test_the_budget_counts_requests_and_cost_of_the_texts_not_answered_yet():
    plan = plan_requests(texts=100, cached=30, texts_per_request=16, price_per_request=0.01, price_per_1k_texts=2.0)
    assert (plan.to_ask, plan.requests) == (70, 5)
    assert plan.cost == pytest.approx(5 * 0.01 + 70 * 2.0 / 1000)
    assert plan.over_budget(None, None) is None and plan.over_budget(5, 0.2) is None
    assert "5 requests needed, teacher.endpoint.max_requests is 4" in plan.over_budget(4, None)
    assert "exceeds teacher.endpoint.max_cost 0.1" in plan.over_budget(None, 0.1)
    assert plan_requests(10, 10, 16, 1.0, 1.0).requests == 0


def test_an_endpoint_teacher_needs_a_url_and_refuses_what_needs_its_weights():
    base = {"teacher": {"kind": "endpoint", "endpoint": {"url": "http://127.0.0.1:9/"}}}
    cfg = config_from_dict(base)  # the default students are pretrained models: fine
    assert cfg.teacher.kind == "endpoint"
    for extra, message in (({"teacher": {"endpoint": {}}}, "needs teacher.endpoint.url"),
                           ({"student": {"init": "cut"}}, "student.init: pretrained"),
                           ({"student": {"frontier": [{"init": "config"}]}}, "student.init: pretrained"),
                           ({"distill": {"feature_weight": 0.5}}, "feature KD needs its hidden states"),
                           ({"distill": {"sweep": {"feature_weight": [0.0, 0.5]}}}, "feature KD")):
        raw = json.loads(json.dumps(base))
        for section, values in extra.items():
            raw.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)


def test_how_fast_and_how_much_an_endpoint_is_asked_is_not_part_of_what_a_run_makes():
    base = {"teacher": {"kind": "endpoint", "endpoint": {"url": "http://h:1", "params": {"top_k": 4}}}}
    digest = config_from_dict(base).digest()
    for key, value in (("concurrency", 9), ("max_requests", 3), ("timeout_s", 1.0), ("api_key_env", "TOKEN"),
                       ("price_per_request", 0.5), ("recheck", 0)):
        changed = json.loads(json.dumps(base))
        changed["teacher"]["endpoint"][key] = value
        assert config_from_dict(changed).digest() == digest, key
    for key, value in (("url", "http://h:2"), ("params", {"top_k": 2}), ("hard_label_smoothing", 0.2)):
        changed = json.loads(json.dumps(base))
        changed["teacher"]["endpoint"][key] = value
        assert config_from_dict(changed).digest() != digest, key


def test_the_identity_never_holds_credentials_and_travels_in_the_teacher_tags():
    cfg = config_from_dict({"teacher": {"kind": "endpoint", "endpoint": {
        "url": "https://user:secret@models.example.com:8443/serve?key=secret", "params": {"top_k": 5}}}})
    identity = endpoint_identity(cfg.teacher.endpoint)
    assert "secret" not in json.dumps(identity)
    assert identity["url"] == "https://models.example.com:8443/serve/invocations"
    assert public_url("http://a:b@h/x?q=1") == "http://h/x"
    ref = TeacherRef(name="llm", version=identity_digest(identity), run_id="", kind="endpoint",
                     identity=json.dumps(identity, sort_keys=True))
    assert TeacherRef.from_tags(ref.to_tags()) == TeacherRef(name="llm", version=ref.version, run_id="",
                                                               kind="endpoint", identity=ref.identity)
    assert "teacher.kind" not in TeacherRef(name="t", version="1", run_id="r").to_tags()  # registered: as before


def test_a_registered_teachers_digest_does_not_move_with_the_black_box_keys():
    """Champions made before endpoint teachers existed stay up to date: the keys only a black box reads are outside
    a registered teacher's digest."""
    base = config_from_dict({}).digest()
    assert config_from_dict({"teacher": {"endpoint": {"url": "http://h:1"}},
                             "validation": {"min_answered_share": 0.5}}).digest() == base
    assert config_from_dict({"teacher": {"kind": "endpoint", "endpoint": {"url": "http://h:1"}}}).digest() != base


def test_what_the_budget_leaves_room_for_beside_the_texts_every_run_needs():
    from distillery.models.answers import affordable_texts

    # 20 requests of 16: one goes to re-checking 16 texts, 100 texts are required: 19 * 16 - 100 = 204 more fit
    assert affordable_texts(100, 1000, 16, 16, 0.0, 0.0, 20, None) == 204
    assert affordable_texts(100, 50, 0, 16, 0.0, 0.0, 20, None) == 50  # all of them
    assert affordable_texts(400, 1000, 0, 16, 0.0, 0.0, 20, None) == -1  # the required ones alone do not fit
    assert affordable_texts(0, 50, 0, 16, 0.01, 0.0, None, 0.02) == 32  # two requests' worth of money
    assert affordable_texts(0, 50, 0, 16, 0.0, 1.0, None, 0.0105) == 10  # ten texts at 1 per 1,000


def test_a_diverse_choice_covers_the_rare_kinds_of_text_a_random_one_misses():
    from distillery.models.answers import choose_texts

    texts = ([f"my card {i} has not arrived" for i in range(60)] + [f"what is the euro rate {i}" for i in range(60)]
             + ["my pin is blocked", "pin blocked after three tries", "unblock my pin please"])
    chosen = choose_texts(texts, 12, "diverse", seed=0)
    assert len(chosen) == 12 == len(set(chosen)) and chosen == sorted(chosen)
    assert any(i >= 120 for i in chosen), chosen  # the three pin texts are a cluster of their own
    assert choose_texts(texts, 12, "diverse", seed=0) == chosen  # seeded
    random = choose_texts(texts, 12, "random", seed=0)
    assert len(set(random)) == 12 and random != chosen
    assert choose_texts(texts, 500, "diverse", 0) == list(range(len(texts))) and choose_texts(texts, 0, "random", 0) == []


def test_an_llm_reply_is_parsed_into_the_label_set():
    from distillery.models.answers import parse_label

    labels = ["card_arrival", "exchange_rate", "card"]
    assert parse_label("Card arrival.", labels) == Answer({"card_arrival": 1.0}, hard=True)
    assert parse_label("The label is exchange_rate", labels).top == "exchange_rate"
    assert parse_label("card arrival, not card", labels).top == "card_arrival"  # the longest label named
    outside = parse_label("  I am not sure  ", labels)
    assert outside.top == "I am not sure" and soft_labels([outside], labels, 0.1).answered.tolist() == [False]


def test_first_token_log_probabilities_become_soft_labels():
    from distillery.models.answers import logprob_answer

    labels = ["positive", "negative", "neutral"]
    got = logprob_answer([{"token": "pos", "logprob": math.log(0.6)}, {"token": " neg", "logprob": math.log(0.3)},
                          {"token": "ne", "logprob": math.log(0.05)}, {"token": "The", "logprob": math.log(0.05)}],
                         labels)
    # "ne" starts two labels: credited to neither; the mass left over is spread by soft_labels
    assert got.probs == pytest.approx({"positive": 0.6, "negative": 0.3}) and not got.hard
    np.testing.assert_allclose(soft_labels([got], labels, 0.1).probs[0], [0.6, 0.3, 0.1], atol=1e-6)
    assert logprob_answer([{"token": "The", "logprob": -0.1}], labels) is None


def test_an_llm_prompt_lists_the_labels_and_few_shot_examples_spread_over_them():
    from distillery.models.answers import few_shot_examples, render_messages

    examples = few_shot_examples(["a1", "b1", "a2", "c1", "b2"], ["A", "B", "C"], [0, 1, 0, 2, 1], 4, seed=0)
    assert [label for _, label in examples[:3]] == ["A", "B", "C"] and len(examples) == 4
    assert few_shot_examples(["a1"], ["A"], [0], 0, 0) == []
    messages = render_messages("hi", ["A", "B", "C"], "be brief", "{labels}|{choices}|{examples}|{text}",
                               {"B": "the second"}, [("x", "A")])
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1]["content"] == "- A\n- B: the second\n- C|A, B or C|Text: x\nLabel: A\n\n|hi"
    assert [m["role"] for m in render_messages("hi", ["A"], None, "{text}", {}, [])] == ["user"]


def test_a_chat_completion_without_choices_is_malformed():
    from distillery.integrations.endpoint import chat_answer, chat_url

    assert chat_answer({"choices": [{"message": {"content": "negative"}}]}, ["positive", "negative"]).top == "negative"
    with pytest.raises(MalformedResponse, match="not a chat completion"):
        chat_answer({"error": "overloaded"}, ["positive"])
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"


def test_a_structured_reply_is_read_by_its_label_and_soft_labels_come_from_the_labels_first_token():
    from jsonschema import validate

    from distillery.integrations.endpoint import chat_answer
    from distillery.models.answers import label_schema, structured_label

    labels = ["card_arrival", "exchange_rate"]
    schema = label_schema(labels)
    assert schema["type"] == "json_schema"
    validate({"label": "exchange_rate"}, schema["json_schema"]["schema"])
    with pytest.raises(Exception, match="is not one of"):
        validate({"label": "weather"}, schema["json_schema"]["schema"])
    # the same schema in the json_object form llama-cpp-python's server takes (it refuses OpenAI's)
    assert label_schema(labels, "json_object") == {"type": "json_object", "schema": schema["json_schema"]["schema"]}
    content = '{"label": "exchange_rate"}'
    assert structured_label(content) == ("exchange_rate", content.index("exchange"))
    assert structured_label("exchange_rate") is None and structured_label('["x"]') is None
    # a server that honours the schema: the first tokens are the JSON's, the label's first token carries the choice
    tokens = [{"token": t, "top_logprobs": [{"token": t, "logprob": 0.0}]} for t in ('{"', 'label', '":', ' "')]
    tokens.append({"token": "exchange", "top_logprobs": [{"token": "exchange", "logprob": math.log(0.7)},
                                                         {"token": "card", "logprob": math.log(0.2)}]})
    tokens += [{"token": "_rate", "top_logprobs": []}, {"token": '"}', "top_logprobs": []}]
    body = {"choices": [{"message": {"content": content}, "logprobs": {"content": tokens}}]}
    assert chat_answer(body, labels).probs == pytest.approx({"exchange_rate": 0.7, "card_arrival": 0.2})
    assert chat_answer({"choices": [{"message": {"content": content}}]}, labels).probs == {"exchange_rate": 1.0}
    # a server that ignored the schema answers free text: parsed as ever
    assert chat_answer({"choices": [{"message": {"content": "card arrival"}}]}, labels).top == "card_arrival"
