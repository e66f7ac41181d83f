"""gateway.answers.responses: llama-server's Responses answers and streams made OpenAI's, checked
against the spec's schemas and fed to the official SDK's own stream accumulator. The
llama-server events are the shapes its server-task.cpp writes, also those the test model
never produces (function calls, reasoning, an error event)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from gateway.answers import usage_of
from gateway.config import Timeouts
from gateway.context import RequestContext
from gateway.errors import GatewayTimeoutError, RateLimitError
from gateway.answers.responses import ResponsesStream, complete_response, echoed
from gateway.web.streaming import relay_as_is

from .openai_spec import assert_valid, openai_validator, stream_event_validators

SCHEMAS = stream_event_validators()
USAGE = {"input_tokens": 20, "output_tokens": 9, "total_tokens": 29, "input_tokens_details": {"cached_tokens": 4}}
CALL = {"type": "function_call", "status": "completed", "arguments": '{"city":"Paris"}', "call_id": "fc_abc",
        "name": "get_weather"}
REASONING = {"id": "rs_1", "summary": [], "type": "reasoning", "encrypted_content": "",
             "content": [{"text": "Hmm", "type": "reasoning_text"}]}
MESSAGE = {"type": "message", "status": "completed", "id": "msg_1", "role": "assistant",
           "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Blue"}]}


def raw(data: dict[str, Any]) -> bytes:
    """One event as llama-server frames it (without the blank line)."""
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}".encode()


def start() -> list[bytes]:
    lifecycle = {"id": "resp_1", "object": "response", "status": "in_progress"}
    return [raw({"type": "response.created", "response": lifecycle}),
            raw({"type": "response.in_progress", "response": lifecycle})]


def completed(*output: dict[str, Any]) -> bytes:
    return raw({"type": "response.completed", "timings": {"prompt_n": 20, "predicted_n": 9},
                "response": {"id": "resp_1", "object": "response", "created_at": 1796203825, "status": "completed",
                             "model": "models/x.gguf", "output": list(output), "usage": USAGE}})


def shaped(upstream: list[bytes], request: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], ResponsesStream]:
    """The events the client gets, each checked against its schema and its ``event:`` name."""
    stream = ResponsesStream("smollm2", request or {"model": "x", "input": "hi"})
    return parse(b"".join(stream.event(event) for event in upstream)), stream


def parse(data: bytes) -> list[dict[str, Any]]:
    events = []
    for block in data.decode().split("\n\n"):
        if block:
            name, payload = block.split("\n")
            event = json.loads(payload.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            assert_valid(SCHEMAS[event["type"]], event)
            events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def sdk(events: list[dict[str, Any]]) -> tuple[list[Any], ResponseStreamState]:
    """What openai-python's stream helper makes of the events (it raises on what it cannot follow)."""
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    seen = []
    for event in events:
        seen += state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))
    return seen, state


def test_a_function_call_stream_gets_its_indices_and_its_arguments_done():
    upstream = start() + [
        raw({"type": "response.output_item.added", "item": {"arguments": "", "call_id": "fc_abc", "name": "get_weather",
                                                             "type": "function_call", "status": "in_progress"}}),
        raw({"type": "response.function_call_arguments.delta", "delta": '{"city":', "item_id": "fc_abc"}),
        raw({"type": "response.function_call_arguments.delta", "delta": '"Paris"}', "item_id": "fc_abc"}),
        raw({"type": "response.output_item.done", "item": CALL}),
        completed(CALL),
    ]
    events, stream = shaped(upstream)
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert {e.get("output_index") for e in events[2:-1]} == {0}
    assert events[5]["name"] == "get_weather" and events[5]["arguments"] == '{"city":"Paris"}'
    assert events[2]["item"]["id"] == events[3]["item_id"] == "fc_abc"
    final = events[-1]["response"]
    assert final["model"] == "smollm2" and "timings" not in events[-1] and stream.finished
    assert_valid(openai_validator("Response"), final)
    assert usage_of(events[-1]) == usage_of(json.loads(upstream[-1].split(b"data: ")[1]))  # what the ledger reads
    seen, state = sdk(events)
    assert [e.snapshot for e in seen if e.type == "response.function_call_arguments.delta"] == \
        ['{"city":', '{"city":"Paris"}']
    call = state._completed_response.output[0]
    assert (call.name, call.arguments, call.call_id) == ("get_weather", '{"city":"Paris"}', "fc_abc")


def test_items_and_parts_llama_server_finished_without_announcing_them_are_added_first():
    """Text parsed only at the end comes as ``output_text.done`` for a message never added:
    the SDK refuses a content event for an output it has not seen."""
    upstream = start() + [
        raw({"type": "response.output_item.added", "item": {"id": "rs_1", "summary": [], "type": "reasoning",
                                                             "content": [], "encrypted_content": "",
                                                             "status": "in_progress"}}),
        raw({"type": "response.reasoning_text.delta", "delta": "Hmm", "item_id": "rs_1"}),
        raw({"type": "response.output_item.done", "item": REASONING}),
        raw({"type": "response.output_text.done", "item_id": "msg_1", "text": "Blue"}),
        raw({"type": "response.content_part.done", "item_id": "msg_1", "part": MESSAGE["content"][0]}),
        raw({"type": "response.output_item.done", "item": MESSAGE}),
        completed(REASONING, MESSAGE),
    ]
    events, _ = shaped(upstream)
    assert [(e["type"], e.get("output_index"), e.get("content_index")) for e in events[2:]] == [
        ("response.output_item.added", 0, None), ("response.reasoning_text.delta", 0, 0),
        ("response.output_item.done", 0, None),
        ("response.output_item.added", 1, None), ("response.content_part.added", 1, 0),
        ("response.output_text.done", 1, 0), ("response.content_part.done", 1, 0),
        ("response.output_item.done", 1, None), ("response.completed", None, None)]
    assert events[5]["item"] == {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress",
                                 "content": []}
    _, state = sdk(events)
    assert state._completed_response.output_text == "Blue"


def test_an_upstream_error_event_ends_the_stream_as_the_protocol_does():
    upstream = start() + [
        raw({"type": "response.output_item.added", "item": dict(MESSAGE, status="in_progress", content=[])}),
        raw({"type": "response.content_part.added", "item_id": "msg_1", "part": {"type": "output_text", "text": ""}}),
        raw({"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Bl"}),
        b'data: {"error":{"code":500,"message":"the slot broke","type":"server_error"}}',
    ]
    events, stream = shaped(upstream)
    error, failed = events[-2:]
    assert error == {"type": "error", "code": None, "message": "the slot broke", "param": None,
                     "sequence_number": 5}
    assert failed["response"]["id"] == "resp_1" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the slot broke"}
    assert stream.error is not None and stream.error.message == "the slot broke" and stream.finished
    assert stream.failure(GatewayTimeoutError()) == b""  # one end only
    seen, state = sdk(events)
    assert [e.type for e in seen[-2:]] == ["error", "response.failed"] and state._completed_response is None


def test_a_failure_before_any_event_still_gives_a_response_to_fail():
    events = parse(ResponsesStream("smollm2", {}).failure(RateLimitError("Too many tokens.")))
    assert [e["type"] for e in events] == ["response.created", "error", "response.failed"]
    response_id = events[0]["response"]["id"]
    assert response_id.startswith("resp_") and events[2]["response"]["id"] == response_id
    assert events[1]["code"] == "rate_limit_exceeded"
    assert events[2]["response"]["error"]["code"] == "rate_limit_exceeded"
    sdk(events)


def test_an_item_announced_twice_is_announced_once():
    added = raw({"type": "response.output_item.added", "item": dict(MESSAGE, status="in_progress", content=[])})
    events, _ = shaped(start() + [added, added])
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added"]


def test_a_plain_response_gets_what_the_spec_requires_and_repeats_the_request():
    answer = {"completed_at": 1, "created_at": 1, "id": "resp_2", "model": "models/x.gguf", "object": "response",
              "output": [dict(REASONING, status="completed"), MESSAGE, CALL], "status": "completed", "usage": dict(USAGE)}
    request = {"model": "x", "input": "hi", "instructions": "Be brief.", "temperature": 0.2, "top_p": True,
               "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
               "tool_choice": "required", "metadata": {"a": "b"}, "max_output_tokens": 32}
    complete_response(answer, "smollm2", echoed(request))
    assert_valid(openai_validator("Response"), answer)
    assert answer["model"] == "smollm2" and answer["instructions"] == "Be brief." and answer["temperature"] == 0.2
    assert answer["top_p"] is None  # not a number: not repeated
    assert answer["tools"] == [dict(request["tools"][0], strict=None)] and answer["tool_choice"] == "required"
    assert "strict" not in request["tools"][0]
    assert answer["output"][2]["id"] == "fc_abc"
    assert usage_of(answer) == {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}


class _Lease:
    """What relay_as_is reads of a lease: the upstream body's chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.response = SimpleNamespace(chunks=lambda: iter(chunks))
        self.backend = SimpleNamespace(name="chat")

    def set_read_timeout(self, seconds: float) -> None:
        pass


def test_a_stream_that_ends_before_its_final_event_fails_in_shape():
    ctx = RequestContext(request_id="r1", method="POST", route="/v1/responses", pipeline="p", headers={},
                         query={}, remote_addr="")
    body = b"".join(event + b"\n\n" for event in start())
    out = b"".join(relay_as_is(ctx, _Lease([body]), "smollm2", Timeouts(), ResponsesStream("smollm2", {})))
    events = parse(out)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2]["code"] == "bad_gateway" and ctx.error is not None and ctx.error.code == "bad_gateway"
