"""Streams and whole answers, each made from the other: llama-server is always asked for a
stream (:func:`stream_request`), :class:`Assembler` collects a stream's chunks into the
whole answer a client that did not stream gets, and :func:`stream_events` replays a whole
answer as the chunks of a stream (a cache hit for a client that streams)."""

from __future__ import annotations

from typing import Any

from .usage import UsageSum

# What a chunk's choice and its delta may carry; anything else makes an assembled
# answer untrustworthy (Assembler.answer() returns None rather than drop it).
# reasoning_content is llama-server's (reasoning models), not OpenAI's.
_CHAT_CHOICE_FIELDS = frozenset({"index", "delta", "logprobs", "finish_reason"})
_COMPLETION_CHOICE_FIELDS = frozenset({"index", "text", "logprobs", "finish_reason"})
_DELTA_FIELDS = frozenset({"role", "content", "refusal", "reasoning_content", "tool_calls"})
_DELTA_TEXTS = ("content", "refusal", "reasoning_content")
_TOOL_CALL_FIELDS = frozenset({"index", "id", "type", "function"})
_FUNCTION_FIELDS = frozenset({"name", "arguments"})
_BASE_FIELDS = ("id", "created", "model", "system_fingerprint")


def stream_request(payload: dict[str, Any]) -> None:
    """Make a chat or completion request one llama-server streams, whatever the client
    asked: only a stream stops generating when its connection closes (cancel, a client
    that left), and ``timings`` on every chunk tell what an answer cut short cost."""
    payload["stream"] = True
    options = payload.get("stream_options")
    payload["stream_options"] = dict(options if isinstance(options, dict) else {}, include_usage=True)
    payload["timings_per_token"] = True
    # Fields that change the shape of llama-server's chunks, which the gateway reads.
    for field in ("return_progress", "response_fields"):
        payload.pop(field, None)


def _merge_logprobs(merged: dict[str, Any] | None, logprobs: Any) -> dict[str, Any] | None:
    """Concatenates each list of a chunk's logprobs onto ``merged``; None on a malformed one.

    Works on every shape (chat: content, refusal; llama-server's completions: content;
    OpenAI's legacy: tokens, token_logprobs, top_logprobs, text_offset). The lists of
    the first chunk are copied once; later chunks extend them.
    """
    if not isinstance(logprobs, dict):
        return None
    if merged is None:
        merged = {}
    for key, value in logprobs.items():
        if value is None:
            merged.setdefault(key, None)
        elif isinstance(value, list):
            current = merged.get(key)
            if current is None:
                merged[key] = list(value)
            else:
                current.extend(value)
        else:
            return None
    return merged


class _Choice:
    __slots__ = ("role", "texts", "tool_calls", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}  # content, refusal, reasoning_content; or text
        self.tool_calls: dict[int, dict[str, Any]] | None = None
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None


class Assembler:
    """Builds the whole non-streamed answer from a stream's decoded chunks (chat or completions).

    Feed every chunk to :meth:`add` in order (``[DONE]`` excluded), then call
    :meth:`answer`. Pieces are kept by reference and joined once at the end: no copies
    or re-encoding per chunk.

    What a choice keeps: ``role``; ``content``, ``refusal`` and llama-server's
    ``reasoning_content`` concatenated (null when no chunk carried a string);
    ``tool_calls`` assembled by index (``id``, ``type``, ``function.name`` and
    ``function.arguments`` concatenated); ``logprobs`` lists concatenated (any shape);
    ``finish_reason``. At the top: ``id``, ``created``, ``model``,
    ``system_fingerprint`` (from the first chunk carrying them), ``usage`` (one per
    choice, summed by :class:`UsageSum`: ``per_prompt`` choices share a prompt) and
    ``timings`` (the last seen).
    """

    def __init__(self, per_prompt: int = 1) -> None:
        self.base: dict[str, Any] = {}
        self.chat: bool | None = None
        self.choices: dict[int, _Choice] = {}
        self.usage = UsageSum(per_prompt)
        self.timings: Any = None
        self.broken: str | None = None  # why the answer cannot be trusted

    def add(self, event: dict[str, Any]) -> None:
        """Take one decoded chunk into account."""
        if self.broken is not None:
            return
        if len(self.base) < len(_BASE_FIELDS):
            for key in _BASE_FIELDS:
                if key not in self.base and key in event:
                    self.base[key] = event[key]
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage.add(usage, event)
        if "timings" in event:
            self.timings = event["timings"]
        choices = event.get("choices")
        if not choices:
            return
        if not isinstance(choices, list):
            self.broken = "choices is not a list"
            return
        for choice in choices:
            if not isinstance(choice, dict):
                self.broken = "a choice is not an object"
                return
            if self.chat is None:
                self.chat = "delta" in choice
            index = choice.get("index", 0)
            if not isinstance(index, int):
                self.broken = "a choice's index is not an integer"
                return
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = _Choice()
            if self.chat:
                self._add_chat(choice, state)
            else:
                self._add_completion(choice, state)
            if self.broken is not None:
                return
            logprobs = choice.get("logprobs")
            if logprobs is not None:
                state.logprobs = _merge_logprobs(state.logprobs, logprobs)
                if state.logprobs is None:
                    self.broken = "malformed logprobs"
                    return
            finish = choice.get("finish_reason")
            if finish is not None:
                state.finish_reason = finish

    def _add_chat(self, choice: dict[str, Any], state: _Choice) -> None:
        if not choice.keys() <= _CHAT_CHOICE_FIELDS:
            self.broken = f"unknown choice fields {sorted(choice.keys() - _CHAT_CHOICE_FIELDS)}"
            return
        delta = choice.get("delta")
        if delta is None:
            return
        if not isinstance(delta, dict):
            self.broken = "delta is not an object"
            return
        if not delta.keys() <= _DELTA_FIELDS:
            self.broken = f"unknown delta fields {sorted(delta.keys() - _DELTA_FIELDS)}"
            return
        role = delta.get("role")
        if role is not None:
            state.role = role
        for key in _DELTA_TEXTS:
            piece = delta.get(key)
            if piece is not None:
                if not isinstance(piece, str):
                    self.broken = f"delta.{key} is not a string"
                    return
                pieces = state.texts.get(key)
                if pieces is None:
                    state.texts[key] = [piece]
                else:
                    pieces.append(piece)
        calls = delta.get("tool_calls")
        if calls is not None:
            self._add_tool_calls(calls, state)

    def _add_tool_calls(self, calls: Any, state: _Choice) -> None:
        if not isinstance(calls, list):
            self.broken = "delta.tool_calls is not a list"
            return
        if state.tool_calls is None:
            state.tool_calls = {}
        for call in calls:
            if (not isinstance(call, dict) or not call.keys() <= _TOOL_CALL_FIELDS
                    or not isinstance(call.get("index"), int)):
                self.broken = "a tool call delta without an index or with unknown fields"
                return
            parts = state.tool_calls.get(call["index"])
            if parts is None:
                parts = state.tool_calls[call["index"]] = {"id": None, "type": None, "name": [], "arguments": []}
            if call.get("id") is not None and parts["id"] is None:
                parts["id"] = call["id"]
            if call.get("type") is not None:
                parts["type"] = call["type"]
            function = call.get("function")
            if function is None:
                continue
            if not isinstance(function, dict) or not function.keys() <= _FUNCTION_FIELDS:
                self.broken = "a tool call's function has unknown fields"
                return
            for key in ("name", "arguments"):
                piece = function.get(key)
                if piece is not None:
                    if not isinstance(piece, str):
                        self.broken = f"a tool call's function.{key} is not a string"
                        return
                    parts[key].append(piece)

    def _add_completion(self, choice: dict[str, Any], state: _Choice) -> None:
        if not choice.keys() <= _COMPLETION_CHOICE_FIELDS:
            self.broken = f"unknown choice fields {sorted(choice.keys() - _COMPLETION_CHOICE_FIELDS)}"
            return
        text = choice.get("text")
        if text is not None:
            if not isinstance(text, str):
                self.broken = "text is not a string"
                return
            pieces = state.texts.get("text")
            if pieces is None:
                state.texts["text"] = [text]
            else:
                pieces.append(text)

    def answer(self, usage: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The whole answer, or None when it cannot be trusted.

        None when no choice came, when a choice never finished, or when a chunk carried
        a field this assembler does not understand (it would have been lost): a caller
        must not store or serve such an answer as whole.

        Args:
            usage: Used when no chunk carried ``usage`` (e.g. the relay dropped the
                usage chunk and kept it in ``ctx.usage``).
        """
        if self.broken is not None or not self.choices:
            return None
        choices = []
        for index in sorted(self.choices):
            state = self.choices[index]
            if state.finish_reason is None:
                return None
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                message: dict[str, Any] = {"role": state.role or "assistant"}
                for key in _DELTA_TEXTS:
                    pieces = state.texts.get(key)
                    if pieces is not None:
                        message[key] = "".join(pieces)
                    elif key != "reasoning_content":
                        message[key] = None
                if state.tool_calls:
                    calls = []
                    for call_index in sorted(state.tool_calls):
                        parts = state.tool_calls[call_index]
                        if not parts["name"]:
                            return None  # a call without a name is not a call
                        call: dict[str, Any] = {}
                        if parts["id"] is not None:
                            call["id"] = parts["id"]
                        call["type"] = parts["type"] or "function"
                        call["function"] = {"name": "".join(parts["name"]), "arguments": "".join(parts["arguments"])}
                        calls.append(call)
                    message["tool_calls"] = calls
                choice["message"] = message
            else:
                choice["text"] = "".join(state.texts.get("text", ()))
            choice["logprobs"] = dict(state.logprobs) if state.logprobs is not None else None
            choice["finish_reason"] = state.finish_reason
            choices.append(choice)
        whole = dict(self.base, object="chat.completion" if self.chat else "text_completion", choices=choices)
        total = self.usage.total if self.usage.total is not None else usage
        if total is not None:
            whole["usage"] = dict(total)
        if self.timings is not None:
            whole["timings"] = self.timings
        return whole


def stream_events(answer: dict[str, Any], with_usage: bool) -> list[dict[str, Any]]:
    """A whole chat or completions answer as the chunks a stream of it would have had.

    Per chat choice: a chunk with the whole message as its delta (role, content,
    refusal, ``tool_calls`` with their ``index``) and its ``logprobs``, then a chunk
    with ``finish_reason``; per completions choice one chunk. Then the usage chunk
    (``choices: []``) when ``with_usage``. ``timings`` rides on the last chunk, as
    llama-server sends it. :class:`Assembler` turns these back into an equal answer.
    """
    choices = answer.get("choices") or []
    chat = answer.get("object") == "chat.completion" or any("message" in c for c in choices)
    base = {k: answer[k] for k in _BASE_FIELDS if k in answer}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for choice in choices:
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role") or "assistant", "content": message.get("content")}
            for key in ("refusal", "reasoning_content"):
                if message.get(key) is not None:
                    delta[key] = message[key]
            calls = message.get("tool_calls")
            if calls:
                delta["tool_calls"] = [dict(call, index=n) for n, call in enumerate(calls)]
            events.append(dict(base, choices=[{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                               "finish_reason": None}]))
            events.append(dict(base, choices=[{"index": index, "delta": {}, "logprobs": None,
                                               "finish_reason": choice.get("finish_reason")}]))
        else:
            events.append(dict(base, choices=[{"index": index, "text": choice.get("text") or "",
                                               "logprobs": choice.get("logprobs"),
                                               "finish_reason": choice.get("finish_reason")}]))
    if with_usage and answer.get("usage"):
        events.append(dict(base, choices=[], usage=answer["usage"]))
    if "timings" in answer and events:
        events[-1]["timings"] = answer["timings"]
    return events
