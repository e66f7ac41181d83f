"""OpenAI's Responses API as llama-server speaks it, made what OpenAI's spec and clients expect.

llama-server's ``/v1/responses`` answers lack what the spec requires and openai-python's
stream helper reads (it indexes ``output[event.output_index].content[event.content_index]``):

* its stream events carry no ``sequence_number``, ``output_index`` or ``content_index``;
  its ``response.created`` and ``response.in_progress`` carry only ``id``, ``object`` and
  ``status``; its function-call items have no ``id`` (their events name them by
  ``call_id``); it sends no ``response.function_call_arguments.done``; an item or content
  part it finished without announcing it (text parsed only at the end) is never added;
* its Response lacks fields the spec requires (``error``, ``tools``, ``metadata``...) and
  its ``usage`` the token details.

:class:`ResponsesStream` edits a stream event by event (the relay decodes every event of
this route, :func:`gateway.web.streaming.relay_as_is`) and ends a failed one in the protocol's
shape: an ``error`` event, then ``response.failed``. :func:`complete_response` edits a
whole Response. Token counts are never changed: the ledger and the limits read ``usage``
from the upstream events (:func:`gateway.answers.usage_of`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from ..errors import GatewayError, from_upstream
from .shapes import decode_json

_LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress", "response.completed",
                        "response.failed", "response.incomplete"})
_FINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
# Events about a message's current content part: their content_index is its last part's.
_PART_EVENTS = frozenset({"response.output_text.delta", "response.output_text.done",
                          "response.output_text.annotation.added", "response.refusal.delta",
                          "response.refusal.done", "response.content_part.done"})
_TEXT_EVENTS = frozenset({"response.output_text.delta", "response.output_text.done"})
_COMPACT = (",", ":")


def echoed(request: Any) -> dict[str, Any]:
    """The request's fields a Response repeats (the spec requires them), each the request's
    value when it has the right type, else what OpenAI reports for a request without it."""
    body = request if isinstance(request, dict) else {}

    def number(name: str) -> float | None:
        value = body.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    instructions, tools, choice = body.get("instructions"), body.get("tools"), body.get("tool_choice")
    parallel, metadata, budget = body.get("parallel_tool_calls"), body.get("metadata"), body.get("max_output_tokens")
    return {
        "instructions": instructions if isinstance(instructions, (str, list)) else None,
        "tools": [_echoed_tool(tool) for tool in tools] if isinstance(tools, list) else [],
        "tool_choice": choice if isinstance(choice, (str, dict)) else "auto",
        "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "temperature": number("temperature"),
        "top_p": number("top_p"),
        "max_output_tokens": budget if type(budget) is int else None,
    }


def _echoed_tool(tool: Any) -> Any:
    """A function tool as a Response lists it: ``strict`` and ``parameters`` present (null:
    llama-server enforces no strictness of its own). A copy: the request stays as it was."""
    if isinstance(tool, dict) and tool.get("type") == "function":
        return dict(tool, strict=tool.get("strict"), parameters=tool.get("parameters"))
    return tool


def complete_response(response: dict[str, Any], public_model: str, echo: dict[str, Any]) -> None:
    """Edit a Response in place into the spec's shape: ``model`` the public id, the
    required fields present (``echo`` from :func:`echoed`), its items and usage whole."""
    response["model"] = public_model
    response.setdefault("object", "response")
    if not isinstance(response.get("created_at"), (int, float)):
        response["created_at"] = int(time.time())
    response.setdefault("error", None)
    response.setdefault("incomplete_details", None)
    for key, value in echo.items():
        response.setdefault(key, value)
    output = response.get("output")
    if isinstance(output, list):
        for item in output:
            complete_item(item)
    else:
        response["output"] = []
    usage = response.get("usage")
    if isinstance(usage, dict):
        _complete_usage(usage)


def _complete_usage(usage: dict[str, Any]) -> None:
    # llama-server counts no cache writes nor reasoning apart: 0, as the spec requires a number
    for key, fields in (("input_tokens_details", ("cached_tokens", "cache_write_tokens")),
                        ("output_tokens_details", ("reasoning_tokens",))):
        details = usage.get(key)
        if not isinstance(details, dict):
            details = usage[key] = {}
        for field in fields:
            details.setdefault(field, 0)


def complete_item(item: Any) -> None:
    """Edit an output item in place into the spec's shape (a function call's ``id`` is its
    ``call_id``, which llama-server's events name it by)."""
    if not isinstance(item, dict):
        return
    kind = item.get("type")
    if kind == "message":
        item.setdefault("role", "assistant")
        item.setdefault("status", "completed")
        content = item.get("content")
        if isinstance(content, list):
            for part in content:
                _complete_part(part)
        else:
            item["content"] = []
    elif kind == "function_call":
        if "id" not in item and isinstance(item.get("call_id"), str):
            item["id"] = item["call_id"]
        item.setdefault("arguments", "")
    elif kind == "reasoning":
        item.setdefault("summary", [])


def _complete_part(part: Any) -> None:
    if isinstance(part, dict) and part.get("type") == "output_text":
        part.setdefault("annotations", [])
        part.setdefault("logprobs", [])


def _opening(item_id: str, item: dict[str, Any] | None, event_type: str) -> dict[str, Any]:
    """The item an ``output_item.added`` announces, for one llama-server never announced:
    from the finished item when that came first, else from the event that names it."""
    kind = item.get("type") if item is not None else (
        "reasoning" if event_type.startswith("response.reasoning_text.")
        else "function_call" if event_type.startswith("response.function_call_arguments.") else "message")
    if kind == "message":
        return {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    if kind == "function_call":
        found = item or {}
        return {"id": item_id, "type": "function_call", "call_id": found.get("call_id", item_id),
                "name": found.get("name", ""), "arguments": "", "status": "in_progress"}
    if kind == "reasoning":
        return {"id": item_id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
    return dict(item or {}, status="in_progress")


class _Item:
    __slots__ = ("index", "parts", "name", "arguments_done")

    def __init__(self, index: int, name: Any) -> None:
        self.index = index  # its output_index
        self.parts = 0  # content parts added
        self.name = name if isinstance(name, str) else ""  # a function call's
        self.arguments_done = False


class ResponsesStream:
    """One Responses stream from llama-server, made OpenAI's event by event.

    Every event gets ``sequence_number`` (from 0, one by one), events about an item its
    ``output_index`` (in the order the items were added) and events about a content part
    its ``content_index``; lifecycle events carry a whole Response (:func:`complete_response`,
    ``created_at`` the same in all); items and parts never announced are added first, a
    function call's ``arguments.done`` is sent before its ``output_item.done``. An upstream
    error event, or :meth:`failure`, ends the stream with ``error`` and ``response.failed``.

    Args:
        public_model: The model id the client asked for.
        request: The request as sent to llama-server (what the Response repeats).
    """

    def __init__(self, public_model: str, request: Any) -> None:
        self.public_model = public_model
        self.echo = echoed(request)
        self.created_at = int(time.time())
        self.response_id: str | None = None
        self.sequence = 0
        self.items: dict[str, _Item] = {}
        self.finished = False  # a final event (completed, failed, incomplete) was sent
        self.error: GatewayError | None = None  # what an upstream error event said

    def event(self, raw: bytes) -> bytes:
        """One upstream SSE event (without its blank line) as the SSE events to send."""
        if raw.startswith(b"error:"):
            return self.failure(from_upstream(502, decode_json(raw[6:])), upstream=True)
        start = raw.find(b"data:")
        event = decode_json(raw[start + 5:]) if start >= 0 else None
        if not isinstance(event, dict):
            return raw + b"\n\n"  # not a Responses event: as it came
        kind = event.get("type")
        if kind == "error" or (kind is None and isinstance(event.get("error"), dict)):
            return self.failure(from_upstream(502, event if kind is None else {"error": event}), upstream=True)
        if not isinstance(kind, str):
            return raw + b"\n\n"
        event.pop("timings", None)  # llama-server's, not the protocol's
        return b"".join(self._encode(sent) for sent in self._shape(event))

    def failure(self, error: GatewayError, upstream: bool = False) -> bytes:
        """The end of a stream that failed: ``error``, then ``response.failed`` (after a
        ``response.created`` when nothing came before, so a client has a response to fail).

        Args:
            error: What went wrong.
            upstream: llama-server said so in an event: kept in :attr:`error`.
        """
        if upstream:
            self.error = error
        if self.finished:
            return b""
        events: list[dict[str, Any]] = []
        if self.response_id is None:
            self.response_id = "resp_" + secrets.token_hex(16)
            events += self._shape({"type": "response.created",
                                   "response": {"id": self.response_id, "status": "in_progress"}})
        events += self._shape(dict(error.to_response_event()))
        events += self._shape({"type": "response.failed",
                               "response": {"id": self.response_id, "status": "failed",
                                            "error": error.to_response_error()}})
        return b"".join(self._encode(event) for event in events)

    @staticmethod
    def _encode(event: dict[str, Any]) -> bytes:
        return (b"event: " + event["type"].encode() + b"\ndata: "
                + json.dumps(event, separators=_COMPACT).encode() + b"\n\n")

    def _shape(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The event made OpenAI's, after the events it needs first; [] to drop it."""
        kind = event["type"]
        before: list[dict[str, Any]] = []
        if kind in _LIFECYCLE:
            self._lifecycle(event)
            self.finished = self.finished or kind in _FINAL
        elif kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict):
                complete_item(item)
                item_id = item.get("id")
                if isinstance(item_id, str):
                    if item_id in self.items:
                        return []  # announced twice: the SDK refuses a second one
                    state = self.items[item_id] = _Item(len(self.items), item.get("name"))
                    event["output_index"] = state.index
        elif kind == "response.output_item.done":
            item = event.get("item")
            if isinstance(item, dict):
                complete_item(item)
                item_id = item.get("id")
                if isinstance(item_id, str):
                    state = self._item(item_id, item, kind, before)
                    event["output_index"] = state.index
                    if item.get("type") == "function_call" and not state.arguments_done:
                        before.append({"type": "response.function_call_arguments.done", "item_id": item_id,
                                       "output_index": state.index, "name": item.get("name", state.name),
                                       "arguments": item.get("arguments", "")})
        elif isinstance(event.get("item_id"), str):
            self._about_item(event, kind, before)
        for sent in before:
            self._number(sent)
        self._number(event)
        return before + [event]

    def _number(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = self.sequence
        self.sequence += 1

    def _lifecycle(self, event: dict[str, Any]) -> None:
        response = event.get("response")
        if not isinstance(response, dict):
            response = event["response"] = {}
        if self.response_id is None:
            if isinstance(response.get("id"), str):
                self.response_id = response["id"]
            if isinstance(response.get("created_at"), (int, float)):
                self.created_at = response["created_at"]
        response.setdefault("id", self.response_id)
        # one creation time for the whole stream (llama-server's final event has its end's)
        response["created_at"] = self.created_at
        if response.get("status") == "completed":
            response.setdefault("completed_at", int(time.time()))
        complete_response(response, self.public_model, self.echo)

    def _about_item(self, event: dict[str, Any], kind: str, before: list[dict[str, Any]]) -> None:
        """An event that names its item by ``item_id``: its indices, and what it needs first."""
        item_id = event["item_id"]
        state = self._item(item_id, None, kind, before)
        event["output_index"] = state.index
        if kind == "response.content_part.added":
            event["content_index"] = state.parts
            state.parts += 1
            _complete_part(event.get("part"))
        elif kind in _PART_EVENTS:
            if state.parts == 0:  # a part llama-server finished without adding it
                part = ({"type": "refusal", "refusal": ""} if kind.startswith("response.refusal.")
                        else {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                before.append({"type": "response.content_part.added", "item_id": item_id,
                               "output_index": state.index, "content_index": 0, "part": part})
                state.parts = 1
            event["content_index"] = state.parts - 1
            if kind == "response.content_part.done":
                _complete_part(event.get("part"))
            elif kind in _TEXT_EVENTS:
                event.setdefault("logprobs", [])
        elif kind.startswith("response.reasoning_text."):
            event.setdefault("content_index", 0)  # llama-server's reasoning items have one text
        elif kind == "response.function_call_arguments.done":
            state.arguments_done = True
            event.setdefault("name", state.name)

    def _item(self, item_id: str, item: dict[str, Any] | None, kind: str, before: list[dict[str, Any]]) -> _Item:
        """The item's state; one never announced is announced first (in ``before``)."""
        state = self.items.get(item_id)
        if state is None:
            opening = _opening(item_id, item, kind)
            state = self.items[item_id] = _Item(len(self.items), opening.get("name"))
            before.append({"type": "response.output_item.added", "output_index": state.index, "item": opening})
        return state
