"""The official openai client, through real gunicorn gevent workers, to real llama-server."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from gateway.testing import free_port

from .conftest import gateway_doc

CHAT = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_models_list(gateway, openai_schema):
    models = gateway.client().models.list()
    assert [m.id for m in models.data] == ["smollm2", "smollm2-embeddings"]
    openai_schema("ListModelsResponse").validate(requests.get(gateway.url + "/v1/models").json())
    assert gateway.client().models.retrieve("gpt-4o-mini").id == "smollm2"


def test_chat_completion(gateway, openai_schema):
    answer = gateway.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24)
    assert answer.model == "smollm2"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content.strip()
    assert answer.usage.completion_tokens > 0
    raw = requests.post(gateway.url + "/v1/chat/completions",
                        json={"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 8}).json()
    openai_schema("CreateChatCompletionResponse").validate(raw)


def test_chat_stream_assembles_and_ends_with_done(gateway, openai_schema):
    stream = gateway.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()

    with requests.post(gateway.url + "/v1/chat/completions", stream=True,
                       json={"model": "smollm2", "messages": CHAT, "max_tokens": 8, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["x-accel-buffering"] == "no"
        events = [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    validator = openai_schema("CreateChatCompletionStreamResponse")
    for event in events[:-1]:
        chunk = json.loads(event)
        validator.validate(chunk)
        assert chunk["model"] == "smollm2"


def test_stream_include_usage(gateway):
    chunks = list(gateway.client().chat.completions.create(
        model="smollm2", messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_legacy_completions(gateway, openai_schema):
    client = gateway.client()
    answer = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
    assert answer.choices[0].text
    assert answer.model == "smollm2"
    raw = requests.post(gateway.url + "/v1/completions",
                        json={"model": "smollm2", "prompt": "Once upon", "max_tokens": 4}).json()
    openai_schema("CreateCompletionResponse").validate(raw)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=8, stream=True) if c.choices)
    assert text


def test_embeddings_for_a_list_of_inputs(gateway, openai_schema):
    result = gateway.client().embeddings.create(model="smollm2-embeddings", input=["hello", "world", "llamas"])
    assert [d.index for d in result.data] == [0, 1, 2]
    assert len({len(d.embedding) for d in result.data}) == 1 and len(result.data[0].embedding) > 100
    assert result.data[0].embedding != result.data[2].embedding
    raw = requests.post(gateway.url + "/v1/embeddings", json={"model": "smollm2-embeddings", "input": "hi"}).json()
    openai_schema("CreateEmbeddingResponse").validate(raw)


def slots_busy(backend: str) -> int:
    return sum(1 for slot in requests.get(backend + "/slots", timeout=2).json() if slot["is_processing"])


def test_client_disconnect_mid_stream_frees_the_backend_slot(gateway, chat_backend):
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "smollm2", "stream": True, "max_tokens": 900,
                       "messages": [{"role": "user", "content": "Write a very long story about a llama."}]})
    sock = socket.create_connection((host, int(port)))
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 5:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    assert slots_busy(chat_backend) == 1  # it is generating for us
    sock.close()
    closed_at = time.monotonic()
    while slots_busy(chat_backend) and time.monotonic() - closed_at < 5:
        time.sleep(0.02)
    freed_after = time.monotonic() - closed_at
    assert slots_busy(chat_backend) == 0
    assert freed_after < 1.0, f"slot still busy {freed_after:.2f}s after the client left"


def post_raw(url: str, body: bytes) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})


def assert_error(resp: requests.Response, status: int, code=None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert resp.headers["x-request-id"]
    return error


def test_bad_input_gets_openai_errors_and_the_gateway_keeps_serving(gateway, openai_schema):
    error_schema = openai_schema("ErrorResponse")
    for body in (b"{oops", b"[]", b"42", b"\xff\xfe"):
        resp = post_raw(gateway.url, body)
        assert_error(resp, 400)
        error_schema.validate(resp.json())
    with pytest.raises(openai.NotFoundError) as err:
        gateway.client().chat.completions.create(model="gpt-9", messages=CHAT)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    resp = requests.get(gateway.url + "/v1/unknown")
    assert_error(resp, 404, "unknown_url")
    resp = requests.delete(gateway.url + "/v1/models")
    assert_error(resp, 405, "method_not_allowed")
    assert gateway.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4).choices


def test_oversized_body_gets_413_without_being_read(gateway):
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Claim 100 MB and send none of it: the answer must come without waiting for the body.
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        answer = b""
        while b"request_too_large" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")


def test_plugin_crash_gets_500_with_request_id_and_worker_lives(gateway):
    resp = requests.post(gateway.url + "/v1/chat/completions", headers={"X-Request-Id": "crash-1"},
                         json={"model": "smollm2", "messages": CHAT, "boom": True})
    error = assert_error(resp, 500, "plugin_error")
    assert "crash-1" in error["message"] and "plugin bug" not in resp.text
    assert resp.headers["x-request-id"] == "crash-1"
    assert "crash-1" in gateway.proc.output()  # the log line carries the request id
    assert gateway.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4).choices


def test_no_backend_reachable_gets_503_with_retry_after(start_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    down = start_gateway(gateway_doc(dead, dead), wait_healthy=False)
    health = requests.get(down.url + "/health")
    assert health.status_code == 503
    with pytest.raises(openai.InternalServerError) as err:
        down.client().chat.completions.create(model="smollm2", messages=CHAT)
    assert err.value.status_code == 503
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.code == "service_unavailable"


def test_usage_counts_every_choice_when_n_is_above_one(gateway):
    client = gateway.client()
    one = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0)
    # llama-server takes n up to its slot count (2 here)
    two = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0, n=2)
    assert len(two.choices) == 2
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens  # llama-server alone says 1x
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens


def sse_events(resp: requests.Response) -> list[dict]:
    lines = [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_logprobs_and_two_choices_validate_streamed_and_not(gateway, openai_schema):
    ask = {"model": "smollm2", "messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "n": 2}
    whole = requests.post(gateway.url + "/v1/chat/completions", json=ask).json()
    openai_schema("CreateChatCompletionResponse").validate(whole)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    for choice in whole["choices"]:
        assert choice["logprobs"]["refusal"] is None
        tokens = choice["logprobs"]["content"]
        assert tokens and all(len(t["top_logprobs"]) == 2 for t in tokens)
        assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    assert "timings" in whole  # llama-server's own, kept

    with requests.post(gateway.url + "/v1/chat/completions", stream=True,
                       json=dict(ask, stream=True, stream_options={"include_usage": True})) as resp:
        events = sse_events(resp)
    validator = openai_schema("CreateChatCompletionStreamResponse")
    for event in events:
        validator.validate(event)
    with_logprobs = [c for e in events for c in e["choices"] if c.get("logprobs")]
    assert {c["index"] for c in with_logprobs} == {0, 1}
    assert all(c["logprobs"]["refusal"] is None and c["logprobs"]["content"] for c in with_logprobs)

    answer = gateway.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, logprobs=True,
                                                      top_logprobs=2)
    assert answer.choices[0].logprobs.content[0].top_logprobs


def test_completion_logprobs_and_two_choices_validate_streamed_and_not(gateway, openai_schema):
    ask = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2, "n": 2}
    validator = openai_schema("CreateCompletionResponse")
    whole = requests.post(gateway.url + "/v1/completions", json=ask).json()
    validator.validate(whole)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    for choice in whole["choices"]:
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["tokens"])
        assert all(len(top) <= 2 for top in logprobs["top_logprobs"]) and logprobs["top_logprobs"][0]
        offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(logprobs["tokens"]))]
        assert logprobs["text_offset"] == offsets

    with requests.post(gateway.url + "/v1/completions", stream=True, json=dict(ask, stream=True)) as resp:
        events = sse_events(resp)
    for event in events:
        # The spec gives streamed and whole completions one schema, whose finish_reason
        # may not be null; a stream's unfinished chunks carry null (OpenAI's own too).
        errors = [e for e in validator.iter_errors(event)
                  if not (e.instance is None and list(e.path)[-1:] == ["finish_reason"])]
        assert errors == []
    for index in (0, 1):
        chunks = [c for e in events for c in e["choices"] if c["index"] == index and c["logprobs"]]
        tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
        offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
        assert tokens and offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]

    answer = gateway.client().completions.create(model="smollm2", prompt="Once upon a time", max_tokens=4, logprobs=2)
    assert answer.choices[0].logprobs.tokens and answer.choices[0].logprobs.top_logprobs[0]
