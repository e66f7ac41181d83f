"""llama-server's other model endpoints (Anthropic's messages, OpenAI's Responses, the
native API) routed by model through the pipeline, through real gunicorn and a real
llama-server: auth, validate, the rate limit and the access log apply, the answer
comes in its own shape with the public model id, and its usage is counted."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from gateway.storage import keys

from .conftest import ROUTES

RELAYED = ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize",
           "/apply-template", "/v1/rerank")
MESSAGES = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture(scope="module")
def relaying(start_gateway, chat_backend, embeddings_backend, logs):
    keys_file = logs / "relay-keys.yaml"
    user = keys.add_key(keys_file, "alice", "user")
    thrifty = keys.add_key(keys_file, "carol", "user", limits={"tokens_per_minute": 600})
    embed_only = keys.add_key(keys_file, "bob", "user", models=["smollm2-embeddings"])
    access_log = logs / "relay-access.log"
    doc = {
        "health_interval": 1,
        "backends": {"chat": {"urls": [chat_backend]}, "embeddings": {"urls": [embeddings_backend]}},
        "models": {"smollm2": {"backend": "chat", "aliases": ["claude-3-haiku"]},
                   "smollm2-embeddings": {"backend": "embeddings"}},
        "pipelines": {"default": [
            {"accesslog": {"path": str(access_log)}},
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
            {"validate": {"max_tokens_limit": 64}},
            {"ratelimit": {"requests_per_minute": None, "tokens_per_minute": 100000}},
        ]},
        "routes": {route: "default" for route in ROUTES + RELAYED},
    }
    gw = start_gateway(doc)
    gw.user, gw.thrifty, gw.embed_only, gw.access_log = user, thrifty, embed_only, access_log
    return gw


def post(gw, route: str, body: dict, key: str | None = None, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key or gw.user}"}
    return requests.post(gw.url + route, json=body, headers=headers, timeout=60, **kwargs)


def access_record(gw, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while True:
        for line in gw.access_log.read_text().splitlines() if gw.access_log.exists() else []:
            record = json.loads(line)
            if record["request_id"] == request_id:
                return record
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.05)


def test_the_responses_api_through_the_official_client_plain_and_streamed(relaying):
    client = relaying.client(api_key=relaying.user)
    answer = client.responses.create(model="smollm2", input="Name one colour.", max_output_tokens=12)
    assert answer.model == "smollm2" and answer.output_text and answer.usage.output_tokens > 0
    events = list(client.responses.create(model="smollm2", input="Name one colour.", max_output_tokens=12,
                                          stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.model == "smollm2"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        completed[0].response.output_text


def test_anthropic_messages_plain_and_streamed_with_usage_logged(relaying):
    plain = post(relaying, "/v1/messages", {"model": "claude-3-haiku", "max_tokens": 10, "messages": MESSAGES})
    assert plain.status_code == 200, plain.text
    answer = plain.json()
    assert answer["type"] == "message" and answer["model"] == "smollm2" and answer["content"][0]["text"]
    record = access_record(relaying, plain.headers["x-request-id"])
    usage = answer["usage"]
    assert record["route"] == "/v1/messages" and record["model"] == "smollm2" and record["outcome"] == "ok"
    assert record["completion_tokens"] == usage["output_tokens"]
    assert record["prompt_tokens"] == usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) > 0
    with post(relaying, "/v1/messages", {"model": "smollm2", "max_tokens": 10, "messages": MESSAGES,
                                          "stream": True}, stream=True) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        text = streamed.text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "message_start" and events[0]["message"]["model"] == "smollm2"
    assert events[-1]["type"] == "message_stop" and "timings" not in text
    record = access_record(relaying, streamed.headers["x-request-id"])
    delta = next(e for e in events if e["type"] == "message_delta")
    assert record["completion_tokens"] == delta["usage"]["output_tokens"] > 0


def test_the_native_endpoints_answer_for_the_named_model(relaying):
    tokens = post(relaying, "/tokenize", {"model": "smollm2", "content": "hello world"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    text = post(relaying, "/detokenize", {"model": "smollm2", "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and text.json()["content"].strip() == "hello world"
    template = post(relaying, "/apply-template", {"model": "smollm2", "messages": MESSAGES})
    assert template.status_code == 200 and "Name one colour." in template.json()["prompt"]
    counted = post(relaying, "/v1/messages/count_tokens", {"model": "smollm2", "messages": MESSAGES})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0


@pytest.mark.parametrize("route, body, status, code", [
    ("/v1/messages", {"max_tokens": 5, "messages": MESSAGES}, 400, None),                      # no model
    ("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": MESSAGES}, 404, "model_not_found"),
    ("/v1/messages", {"model": "smollm2", "max_tokens": 100000, "messages": MESSAGES}, 400, None),  # past the limit
    ("/v1/responses", {"model": "smollm2", "input": "x", "max_output_tokens": 4096}, 400, None),
    ("/v1/messages", {"model": "smollm2", "max_tokens": 5, "messages": MESSAGES, "grammar": "root ::= \"a\""},
     400, None),                                                                               # raw grammar refused
    ("/v1/rerank", {"model": "smollm2", "query": "a", "documents": ["b"]}, 501, None),   # not started --reranking
])
def test_bad_requests_get_openai_shaped_errors_and_never_reach_the_model(relaying, route, body, status, code):
    resp = post(relaying, route, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def test_no_key_no_answer_and_a_key_keeps_to_its_models(relaying):
    for route in RELAYED:
        resp = requests.post(relaying.url + route, json={"model": "smollm2"}, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        narrow = post(relaying, route, {"model": "smollm2", "max_tokens": 5, "messages": MESSAGES},
                      key=relaying.embed_only)
        assert narrow.status_code == 403 and narrow.json()["error"]["code"] == "model_not_allowed"


def test_the_generation_budget_defaults_to_the_limit(relaying):
    """A Responses request without max_output_tokens must not generate until the context
    is full: validate gives it the limit (64 here)."""
    answer = relaying.client(api_key=relaying.user).responses.create(
        model="smollm2", input="Write a very long story about a llama, in many chapters.")
    assert 0 < answer.usage.output_tokens <= 64


def test_a_stream_left_early_is_charged_what_was_relayed(relaying):
    """Leaving an Anthropic stream before its usage event must not make it free."""
    body = {"model": "smollm2", "max_tokens": 64, "messages": [{"role": "user", "content": "Write a long story."}],
            "stream": True, "ignore_eos": True}
    port = int(relaying.url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: left-early\r\n"
                     + f"Authorization: Bearer {relaying.thrifty}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data)
        seen = b""
        while seen.count(b"event: content_block_delta") < 10:
            seen += sock.recv(65536)
    record = access_record(relaying, "left-early")
    assert record["outcome"] == "client_gone"
    assert 10 <= record["completion_tokens"] < 64 + 8 and record["prompt_tokens"] > 0
    # the thrifty key's 600 tokens a minute: its debt shows in the next answer's headers
    after = post(relaying, "/v1/messages/count_tokens", {"model": "smollm2", "messages": MESSAGES},
                 key=relaying.thrifty)
    assert int(after.headers["x-ratelimit-remaining-tokens"]) <= 600 - 10
