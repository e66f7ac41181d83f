"""OpenAI's Responses API through the gateway as OpenAI's own client and spec see it, through
real gunicorn gevent workers and a real llama-server: the official SDK's stream helper
accumulates the stream, every event and the plain Response validate against the spec's
schemas, usage still reaches the access log, and a stream cut mid-way ends in the
protocol's own error events."""

from __future__ import annotations

import json

import pytest
import requests

from gateway.storage import keys

from ..openai_spec import assert_valid, stream_event_validators
from .conftest import ROUTES
from .test_model_routes import access_record

INPUT = "Name one colour."


@pytest.fixture(scope="module")
def responses_gw(start_gateway, chat_backend, logs):
    keys_file = logs / "responses-keys.yaml"
    user = keys.add_key(keys_file, "rita", "user")
    access_log = logs / "responses-access.log"
    doc = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [chat_backend]}},
        "models": {"smollm2": {"backend": "chat", "aliases": ["gpt-4.1-mini"]}},
        "pipelines": {"default": [
            {"accesslog": {"path": str(access_log)}},
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
        ]},
        "routes": {route: "default" for route in ROUTES + ("/v1/responses",) if route != "/v1/embeddings"},
    }
    gw = start_gateway(doc)
    gw.user, gw.access_log = user, access_log
    return gw


@pytest.fixture(scope="module")
def event_schemas():
    return stream_event_validators()


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a Responses stream."""
    found = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        names = [line[7:] for line in lines if line.startswith("event: ")]
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            found.append((names[0] if names else "", json.loads("".join(data))))
    return found


def assert_in_order(events: list[dict]) -> None:
    """The stream's bookkeeping as OpenAI's: numbered from 0 one by one, items indexed as added."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == list(range(len(added)))


def test_the_sdk_stream_helper_accumulates_a_streamed_response(responses_gw):
    """openai's ``client.responses.stream`` indexes the output by ``output_index`` and
    ``content_index``, which llama-server's events lack: it failed with a TypeError."""
    client = responses_gw.client(api_key=responses_gw.user)
    with client.responses.stream(model="gpt-4.1-mini", input=INPUT, max_output_tokens=16,
                                 extra_headers={"X-Request-Id": "sdk-stream"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert_in_order([e.model_dump(warnings=False) for e in events])
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and deltas[-1].snapshot == "".join(d.delta for d in deltas)  # the helper's own accumulation
    assert final.output_text == deltas[-1].snapshot and final.model == "smollm2"
    assert final.status == "completed" and final.id == events[0].response.id
    record = access_record(responses_gw, "sdk-stream")
    assert record["outcome"] == "ok" and record["route"] == "/v1/responses"
    assert record["completion_tokens"] == final.usage.output_tokens > 0
    assert record["prompt_tokens"] == final.usage.input_tokens > 0


def test_streamed_events_and_the_plain_response_match_the_spec(responses_gw, openai_schema, event_schemas):
    """Every event of ``responses.create(stream=True)`` against its ResponseStreamEvent schema,
    the plain ``responses.create`` answer against Response; the usage the ledger reads unchanged."""
    body = {"model": "smollm2", "input": INPUT, "max_output_tokens": 12, "temperature": 0.5,
            "instructions": "Answer in one word.", "metadata": {"team": "qa"}}
    headers = {"Authorization": f"Bearer {responses_gw.user}", "X-Request-Id": "spec-stream"}
    with requests.post(responses_gw.url + "/v1/responses", json=dict(body, stream=True), headers=headers,
                       stream=True, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = resp.text
    named = sse_events(text)
    events = [data for _, data in named]
    stream_schema = openai_schema("ResponseStreamEvent")
    for name, event in named:
        assert name == event["type"]
        assert_valid(event_schemas[event["type"]], event)
        assert_valid(stream_schema, event)
    assert_in_order(events)
    assert "timings" not in text and events[-1]["type"] == "response.completed"
    completed = events[-1]["response"]
    assert completed["model"] == "smollm2" and completed["instructions"] == "Answer in one word."
    assert completed["temperature"] == 0.5 and completed["metadata"] == {"team": "qa"}
    assert {e["response"]["id"] for e in events if "response" in e} == {completed["id"]}
    assert {e["response"]["created_at"] for e in events if "response" in e} == {completed["created_at"]}
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    record = access_record(responses_gw, "spec-stream")
    assert record["completion_tokens"] == completed["usage"]["output_tokens"] > 0
    assert record["prompt_tokens"] == completed["usage"]["input_tokens"] > 0

    plain = requests.post(responses_gw.url + "/v1/responses", json=body,
                          headers=dict(headers, **{"X-Request-Id": "spec-plain"}), timeout=60)
    assert plain.status_code == 200, plain.text
    answer = plain.json()
    assert_valid(openai_schema("Response"), answer)
    assert answer["model"] == "smollm2" and answer["status"] == "completed"
    record = access_record(responses_gw, "spec-plain")
    assert record["completion_tokens"] == answer["usage"]["output_tokens"] > 0
    client = responses_gw.client(api_key=responses_gw.user)
    assert client.responses.create(**body).output_text


def test_a_stream_cut_mid_way_ends_with_the_protocols_error_events(responses_gw, event_schemas):
    """A stream cancelled after its first words ends with an ``error`` event and
    ``response.failed``, each valid, numbered on from the events before (it used to stop
    without a word: these protocols had no error event in the gateway)."""
    user = {"Authorization": f"Bearer {responses_gw.user}"}
    body = {"model": "smollm2", "input": "Write a very long story about a llama.", "max_output_tokens": 400,
            "ignore_eos": True, "stream": True}
    with requests.post(responses_gw.url + "/v1/responses", json=body, stream=True, timeout=60,
                       headers={**user, "X-Request-Id": "responses-cancel"}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_content(chunk_size=None)
        text = ""
        while "response.output_text.delta" not in text:
            text += next(chunks).decode()
        cancelled = requests.post(responses_gw.url + "/v1/requests/responses-cancel/cancel", headers=user, timeout=5)
        assert cancelled.status_code == 200
        text += b"".join(chunks).decode()
    events = [data for _, data in sse_events(text)]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    for event in events:
        assert_valid(event_schemas[event["type"]], event)
    assert_in_order(events)
    error, failed = events[-2:]
    assert error["code"] == "request_cancelled" and error["message"] and error["param"] is None
    assert failed["response"]["status"] == "failed" and failed["response"]["id"] == events[0]["response"]["id"]
    assert failed["response"]["error"]["code"] == "server_error" and failed["response"]["model"] == "smollm2"
    assert not [e for e in events if e["type"] == "response.completed"]
    record = access_record(responses_gw, "responses-cancel")
    assert record["outcome"] == "cancelled" and record["completion_tokens"] > 0
