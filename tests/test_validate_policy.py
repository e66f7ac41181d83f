"""The validate plugin's policy on llama-server's own request fields (n_predict and the
rest), and its size limits checked before the (costly) schema validation."""

from __future__ import annotations

import pytest

import plugins.validate as validate_module
from gateway import hookimpl
from gateway.config import parse_config
from gateway.pipeline import build_pipelines

from .conftest import config_doc

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "smollm2", "prompt": "Hi"}


def validate(**config):
    """The validate plugin as a pipeline builds it (schema checked, defaults filled)."""
    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{"validate": config}]})
    return build_pipelines(parse_config(doc))["default"].plugins[0]


class Seen:
    """Keeps the payload as the plugins leave it (the core then adds its own streaming
    fields, timings_per_token among them)."""

    payload = None

    @hookimpl
    def upstream_request(self, ctx, payload):
        self.payload = dict(payload)


@pytest.fixture
def seen():
    return Seen()


def error_of(resp):
    assert resp.status_code == 400, resp.text
    return resp.json["error"]


# --- 1. n_predict and the other generation fields ---------------------------------------

@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", dict(CHAT, max_tokens=10, n_predict=-1), "n_predict"),   # the reported bypass
    ("/v1/chat/completions", dict(CHAT, n_predict=-2), "n_predict"),
    ("/v1/chat/completions", dict(CHAT, n_predict=4097), "n_predict"),
    ("/v1/chat/completions", dict(CHAT, n_predict="100"), "n_predict"),
    ("/v1/chat/completions", dict(CHAT, n_predict=1e30), "n_predict"),
    ("/v1/completions", dict(COMPLETION, max_tokens=10, n_predict=-1), "n_predict"),
    # the completions schema has no max_completion_tokens, which llama-server reads before max_tokens
    ("/v1/completions", dict(COMPLETION, max_tokens=10, max_completion_tokens=-1), "max_completion_tokens"),
    ("/v1/completions", dict(COMPLETION, max_completion_tokens=5000), "max_completion_tokens"),
])
def test_n_predict_and_max_completion_tokens_are_bounded_like_max_tokens(make_client, route, body, param):
    client = make_client([validate(max_tokens_limit=4096)])
    assert error_of(client.simulate_post(route, json=body))["param"] == param


def test_the_backend_gets_the_smallest_budget_whichever_field_it_reads(make_client, seen):
    client = make_client([validate(max_tokens_limit=64), ("seen", seen)])
    body = dict(CHAT, max_tokens=10, n_predict=30, max_completion_tokens=20)
    assert client.simulate_post("/v1/chat/completions", json=body).status_code == 200
    assert (seen.payload["n_predict"], seen.payload["max_completion_tokens"], seen.payload["max_tokens"]) == (10, 10, 10)
    assert client.simulate_post("/v1/completions", json=dict(COMPLETION, n_predict=7)).status_code == 200
    assert seen.payload["n_predict"] == 7 and "max_tokens" not in seen.payload


def test_without_a_limit_a_budget_past_int32_is_refused(make_client):
    # llama-server reads it into an int32: 2**32 + 5 would wrap, a larger one overflow
    client = make_client([validate()])
    for value in (2**32 + 5, 1e300):
        error = error_of(client.simulate_post("/v1/completions", json=dict(COMPLETION, n_predict=value)))
        assert error["param"] == "n_predict"


def test_a_request_without_a_budget_gets_the_limit(make_client, seen):
    client = make_client([validate(max_tokens_limit=64), ("seen", seen)])
    assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert seen.payload["max_tokens"] == 64
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, max_tokens=None)).status_code == 200
    assert seen.payload["max_tokens"] == 64
    client = make_client([validate(max_tokens_limit=64, default_max_tokens=16), ("seen", seen)])
    assert client.simulate_post("/v1/completions", json=COMPLETION).status_code == 200
    assert seen.payload["max_tokens"] == 16


def test_default_max_tokens_above_the_limit_is_a_config_error():
    with pytest.raises(Exception, match="default_max_tokens"):
        validate(max_tokens_limit=64, default_max_tokens=65)


def test_context_check_counts_n_predict(make_client):
    # the canned backend: n_ctx 4096, one token per word
    client = make_client([validate(context_check=True)])
    body = dict(COMPLETION, prompt="one two three", n_predict=4094)
    error = error_of(client.simulate_post("/v1/completions", json=body))
    assert error["code"] == "context_length_exceeded" and "4094 in the completion" in error["message"]
    body = dict(body, n_predict=4093)
    assert client.simulate_post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("id_slot", 0), ("lora", [{"id": 0, "scale": 1.0}]), ("n_keep", -1), ("n_discard", 1),
    ("grammar", 'root ::= ("a" | "b")+'),
    ("n_cache_reuse", 1), ("speculative.n_max", 64), ("chat_format", 99999), ("chat_parser", "x"),
    ("grammar_triggers", []), ("preserved_tokens", []), ("backend_sampling", True),
])
def test_backend_fields_that_reach_past_the_request_are_refused(make_client, field, value):
    client = make_client([validate()])
    for route, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        error = error_of(client.simulate_post(route, json=dict(body, **{field: value})))
        assert error["param"] == field and "not accepted" in error["message"]


def test_an_operator_may_allow_a_refused_field(make_client, seen):
    client = make_client([validate(allow_backend_fields=["id_slot"]), ("seen", seen)])
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, id_slot=1)).status_code == 200
    assert seen.payload["id_slot"] == 1
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, lora=[])).status_code == 400


def test_allowing_a_field_that_is_not_refused_is_a_config_error():
    with pytest.raises(Exception, match="allow_backend_fields: id_slots"):
        validate(allow_backend_fields=["id_slots"])  # a typo would silently allow nothing


def test_a_few_dry_sequence_breakers_pass(make_client):
    client = make_client([validate()])
    body = dict(COMPLETION, dry_multiplier=0.8, dry_sequence_breakers=["\n", ":", "\"", "*"])
    assert client.simulate_post("/v1/completions", json=body).status_code == 200


def test_fields_that_change_the_answer_shape_are_dropped(make_client, seen):
    client = make_client([validate(), ("seen", seen)])
    shape = {"timings_per_token": True, "return_progress": True, "response_fields": ["content"],
             "return_tokens": True, "post_sampling_probs": True}
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True, **shape)).status_code == 200
    assert not set(shape) & set(seen.payload)


def test_n_probs_is_bounded_like_top_logprobs(make_client):
    client = make_client([validate()])
    assert error_of(client.simulate_post("/v1/chat/completions", json=dict(CHAT, n_probs=2000)))["param"] == "n_probs"
    assert error_of(client.simulate_post("/v1/completions", json=dict(COMPLETION, n_probs=-1)))["param"] == "n_probs"
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, n_probs=20)).status_code == 200
    client = make_client([validate(max_n_probs=5)])
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, n_probs=6)).status_code == 400


def test_completions_per_request_are_bounded_by_max_n(make_client):
    client = make_client([validate()])  # max_n: 1
    assert error_of(client.simulate_post("/v1/chat/completions", json=dict(CHAT, n=2)))["param"] == "n"
    assert error_of(client.simulate_post("/v1/chat/completions", json=dict(CHAT, n_cmpl=2)))["param"] == "n_cmpl"
    # a prompt list is one completion per prompt
    error = error_of(client.simulate_post("/v1/completions", json=dict(COMPLETION, prompt=["a", "b", "c"])))
    assert error["param"] == "prompt" and "3 completions" in error["message"]
    assert error_of(client.simulate_post("/v1/completions", json=dict(COMPLETION, n_cmpl=0)))["param"] == "n_cmpl"
    assert client.simulate_post("/v1/completions", json=dict(COMPLETION, prompt=[1, 2, 3])).status_code == 200
    client = make_client([validate(max_n=6)])
    assert client.simulate_post("/v1/completions", json=dict(COMPLETION, prompt=["a", "b", "c"], n=2)).status_code == 200
    assert client.simulate_post("/v1/completions", json=dict(COMPLETION, prompt=["a", "b", "c"],
                                                             n_cmpl=3)).status_code == 400
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, n=6)).status_code == 200


def test_llama_servers_own_list_inputs_count_against_max_n_and_are_bounded(make_client):
    routes = {r: "default" for r in ("/completion", "/embedding", "/v1/rerank")}
    client = make_client([validate(max_n=2, max_input_chars=100)], routes=routes)
    native = {"model": "smollm2", "n_predict": 4}
    for body, param in ((dict(native, prompt=["a", "b", "c"]), "prompt"), (dict(native, prompt="a", n_cmpl=3), "n_cmpl"),
                        (dict(native, prompt=[[1], [2]], n=2), "prompt")):
        error = error_of(client.simulate_post("/completion", json=body))
        assert error["param"] == param and "the most this gateway allows is 2" in error["message"]
    assert client.simulate_post("/completion", json=dict(native, prompt=["a", "b"])).status_code != 400
    assert client.simulate_post("/completion", json=dict(native, prompt=[1, 2, 3], n=2)).status_code != 400
    many = {"model": "smollm2", "content": ["x"] * (validate_module.MAX_EMBEDDING_INPUTS + 1)}
    assert error_of(client.simulate_post("/embedding", json=many))["param"] == "content"
    long = {"model": "smollm2", "query": "q", "documents": ["y" * 60, "z" * 60]}
    assert error_of(client.simulate_post("/v1/rerank", json=long))["param"] == "documents"
    assert error_of(client.simulate_post("/completion", json=dict(native, prompt="w" * 101)))["param"] == "prompt"


def test_ignore_eos_only_when_the_generation_is_bounded(make_client):
    unlimited = make_client([validate()])
    assert error_of(unlimited.simulate_post("/v1/chat/completions", json=dict(CHAT, ignore_eos=True)))["param"] \
        == "ignore_eos"
    assert unlimited.simulate_post("/v1/chat/completions", json=dict(CHAT, ignore_eos=True,
                                                                     max_tokens=8)).status_code == 200
    limited = make_client([validate(max_tokens_limit=64)])
    assert limited.simulate_post("/v1/chat/completions", json=dict(CHAT, ignore_eos=True)).status_code == 200


def test_images_must_be_inline_unless_media_urls_are_allowed(make_client):
    def image(url):
        return dict(CHAT, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}])

    client = make_client([validate()])
    for url in ("http://169.254.169.254/latest/meta-data/", "https://example.com/a.png", "file:///etc/passwd"):
        error = error_of(client.simulate_post("/v1/chat/completions", json=image(url)))
        assert error["param"] == "messages[0].content[1].image_url"
    assert client.simulate_post("/v1/chat/completions", json=image("data:image/png;base64,AAAA")).status_code == 200
    allowing = make_client([validate(allow_media_urls=True)])
    assert allowing.simulate_post("/v1/chat/completions", json=image("https://example.com/a.png")).status_code == 200


# --- 2. sizes before the schema ---------------------------------------------------------

@pytest.fixture
def schema_calls(monkeypatch):
    """Spy on the schema validation: the bodies it was run on."""
    calls = []
    real = validate_module.first_error

    def spy(validator, body, *check):
        calls.append(body)
        return real(validator, body, *check)

    monkeypatch.setattr(validate_module, "first_error", spy)
    return calls


def test_a_huge_message_list_is_refused_before_the_schema(make_client, schema_calls):
    client = make_client([validate()])  # max_messages defaults to 2048
    body = dict(CHAT, messages=[{"role": "user", "content": "x"}] * 120_000)
    error = error_of(client.simulate_post("/v1/chat/completions", json=body))
    assert error["param"] == "messages" and "120000 messages" in error["message"]
    assert schema_calls == []


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", dict(CHAT, tools=[{"type": "function"}] * 129), "tools"),
    ("/v1/chat/completions", dict(CHAT, logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    ("/v1/chat/completions", dict(CHAT, stop=["a"] * 100_000), "stop"),
    ("/v1/chat/completions", dict(CHAT, stop="x" * 1025), "stop"),
    ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "x"}] * 1025}]),
     "messages[0].content"),
    ("/v1/completions", dict(COMPLETION, prompt=["a"] * 100_000), "prompt"),
    # each breaker stalls llama-server's main loop ~60 ms (all slots): 400 took 17 s
    ("/v1/completions", dict(COMPLETION, dry_multiplier=0.8, dry_sequence_breakers=["ab"] * 400),
     "dry_sequence_breakers"),
    ("/v1/chat/completions", dict(CHAT, dry_sequence_breakers=["x" * 65]), "dry_sequence_breakers"),
    ("/v1/completions", dict(COMPLETION, prompt=[1] * 100_000 + ["a"]), "prompt"),
    ("/v1/completions", dict(COMPLETION, prompt=[[1] * 1000] * 100 + [[]]), "prompt"),
    ("/v1/embeddings", {"model": "smollm2", "input": [1] * 100_000}, "input"),
    ("/v1/embeddings", {"model": "smollm2", "input": ["a"] * 2049}, "input"),
])
def test_size_limits_are_checked_before_the_schema(make_client, schema_calls, route, body, param):
    client = make_client([validate()])
    assert error_of(client.simulate_post(route, json=body))["param"] == param
    assert schema_calls == []


def test_valid_token_arrays_are_checked_without_the_schema_walking_them(make_client, schema_calls, seen):
    client = make_client([validate(), ("seen", seen)])
    tokens = list(range(200_000))
    assert client.simulate_post("/v1/completions", json=dict(COMPLETION, prompt=tokens)).status_code == 200
    assert seen.payload["prompt"] == tokens  # the backend gets the real prompt ...
    assert not isinstance(schema_calls[-1]["prompt"], list)  # ... the schema a stand-in
    body = {"model": "smollm2", "input": [[1, 2, 3]] * 2048}
    assert client.simulate_post("/v1/embeddings", json=body).status_code == 200
    assert not isinstance(schema_calls[-1]["input"], list)
    for bad in ([-1], [[]], [[1], "a"], [1.5]):
        error = error_of(client.simulate_post("/v1/embeddings", json={"model": "smollm2", "input": bad}))
        assert error["param"] == "input"


@pytest.mark.parametrize("messages, param", [
    ("hello", "messages"),
    ([5], "messages[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [5, {"type": "text", "text": 7}]}], "messages[0].content[0]"),
])
def test_wrong_types_still_get_the_schema_error_with_every_limit_on(make_client, messages, param):
    # (a guard for the new order: the size checks must not trip over wrong types)
    client = make_client([validate(max_input_chars=10, max_messages=4)])
    error = error_of(client.simulate_post("/v1/chat/completions", json=dict(CHAT, messages=messages)))
    assert error["param"] == param and error["message"].startswith("Invalid value")
