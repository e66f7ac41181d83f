"""llama-server's answers in OpenAI's shape: the one home for answer shapes.

A documented public module (see docs/plugins.md, "Answers"): plugins may use it.

* :func:`normalize_answer` and :func:`normalize_event` edit a whole answer or one
  stream chunk in place so OpenAI's clients and schemas accept it: ``model`` becomes
  the public id, ``choices[].logprobs`` and ``message.refusal`` are present (null),
  chat logprobs carry ``refusal``, and the legacy completions' logprobs, which
  llama-server sends in the chat shape (``{"content": [{"token", "logprob",
  "top_logprobs": [...]}]}``), become OpenAI's legacy shape (``tokens``,
  ``token_logprobs``, ``top_logprobs`` as ``{token: logprob}``, ``text_offset``).
* :class:`Assembler` builds the whole non-streamed answer from a stream's chunks.
* :func:`stream_events` is the reverse: a whole answer as the chunks of a stream.
* :func:`choice_text` is the text of one choice, whatever its shape.

``text_offset`` counts characters from the start of the generated text (the first
token is at 0), not from the start of the prompt as OpenAI's does; llama-server does
not send the prompt's length with the tokens.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .config import LLAMA_SERVER_ROUTES

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

# -9999.0 is OpenAI's "very unlikely"; a probability of 0 has no logarithm.
_UNLIKELY = -9999.0


def choice_text(choice: dict[str, Any]) -> str:
    """The text of a choice: a message's or a delta's content, or a completion's text ("" if none)."""
    message = choice.get("message")
    if message is None:
        message = choice.get("delta")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _logprob(entry: dict[str, Any]) -> float:
    value = entry.get("logprob")
    if isinstance(value, (int, float)):
        return value
    prob = entry.get("prob")  # llama-server's post_sampling_probs
    if isinstance(prob, (int, float)):
        return math.log(prob) if prob > 0 else _UNLIKELY
    return _UNLIKELY


def legacy_logprobs(entries: list[Any], start: int = 0) -> tuple[dict[str, list[Any]], int]:
    """llama-server's chat-shaped token list as OpenAI's legacy completion logprobs.

    Returns:
        The logprobs object, and the text offset just after its last token (to start
        the next chunk's offsets from).
    """
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    offset = start
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        token = entry.get("token")
        token = token if isinstance(token, str) else ""
        tokens.append(token)
        token_logprobs.append(_logprob(entry))
        top = entry.get("top_logprobs")
        if top is None:
            top = entry.get("top_probs")
        top_logprobs.append({t["token"]: _logprob(t) for t in top or () if isinstance(t, dict)
                             and isinstance(t.get("token"), str)})
        text_offset.append(offset)
        offset += len(token)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": text_offset}, offset)


def _normalize_choice(choice: dict[str, Any], offsets: dict[int, int] | None) -> None:
    logprobs = choice.get("logprobs")
    if "message" in choice or "delta" in choice:
        if isinstance(logprobs, dict):
            logprobs.setdefault("content", None)
            logprobs.setdefault("refusal", None)
        if "message" in choice:
            if logprobs is None:
                choice["logprobs"] = None
            message = choice["message"]
            if isinstance(message, dict):
                message.setdefault("refusal", None)
        return
    if logprobs is None:
        choice["logprobs"] = None
    elif isinstance(logprobs, dict) and "tokens" not in logprobs and isinstance(logprobs.get("content"), list):
        index = choice.get("index", 0)
        start = offsets.get(index, 0) if offsets is not None else 0
        choice["logprobs"], end = legacy_logprobs(logprobs["content"], start)
        if offsets is not None:
            offsets[index] = end


def normalize_answer(body: dict[str, Any], public_model: str) -> None:
    """Edit a whole (non-streamed) chat or completions answer in place so OpenAI clients accept it.

    ``model`` becomes ``public_model`` (llama-server answers with whatever it has
    loaded); every choice gets ``logprobs`` (null when not asked for); a chat
    message gets ``refusal`` (null) and chat logprobs ``refusal`` (null); legacy
    completion logprobs are converted to OpenAI's legacy shape (see the module's
    note on ``text_offset``). Idempotent; anything else (``timings``) is kept.
    """
    if "model" in body:
        body["model"] = public_model
    choices = body.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict):
            _normalize_choice(choice, None)


def normalize_event(event: dict[str, Any], public_model: str, offsets: dict[int, int] | None = None) -> None:
    """:func:`normalize_answer` for one stream chunk, in place.

    Args:
        event: The decoded ``data:`` JSON of one chunk.
        public_model: The model id the client asked for.
        offsets: One dict per stream, kept by the caller across its chunks: each
            choice's ``text_offset`` continues where its previous chunk ended. Without
            it every chunk's offsets start at 0.
    """
    if "model" in event:
        event["model"] = public_model
    choices = event.get("choices")
    if not choices or not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict) and ("logprobs" in choice or "text" in choice):
            _normalize_choice(choice, offsets)


# The fields that bound one answer's generation, in the order llama-server reads them.
BUDGET_FIELDS = ("n_predict", "max_completion_tokens", "max_tokens", "max_output_tokens")


def completion_budget(body: Any) -> int | None:
    """The completion tokens one answer of a request may generate, as llama-server reads
    them (``n_predict`` first, then ``max_completion_tokens``, ``max_tokens``, and the
    Responses API's ``max_output_tokens``), or None when it names none (or only a
    negative one: llama-server's "until the context is full")."""
    for name in BUDGET_FIELDS:
        value = body.get(name) if isinstance(body, dict) else None
        if _integer(value) and value >= 0:
            return int(value)
    return None


# The prompt's share of a reservation: a token per byte of body. Byte-level tokenizers
# never make more tokens than bytes, and the JSON around the messages (or around each
# prompt of a list: quotes and a comma, more than the BOS token llama-server adds to
# each) outweighs the chat template's own tokens, so the bound holds for every prompt
# of a request together.
BYTES_PER_TOKEN = 1


def generates(route: str) -> bool:
    """Whether a route generates tokens (chat, completions, /completion, /infill,
    Anthropic's messages, Responses); embeddings, rerank and the tokenizer do not."""
    return route in ("/v1/chat/completions", "/v1/completions") or LLAMA_SERVER_ROUTES.get(route) is not None


def completion_bound(route: str, body: Any, unbudgeted: int | None = None) -> int | None:
    """The most completion tokens a request may generate, all its answers together: one
    answer's :func:`completion_budget` (``unbudgeted`` when it names none) times its
    answers (prompts times ``n``, :func:`choices_asked`). 0 on a route that generates
    nothing; None when the body names no budget and ``unbudgeted`` is None."""
    if not generates(route):
        return 0
    budget = completion_budget(body)
    if budget is None:
        budget = unbudgeted
    if budget is None:
        return None
    return budget * choices_asked(body if isinstance(body, dict) else None)[0]


def token_bound(route: str, body: Any, body_bytes: int, unbudgeted: int) -> int:
    """The most tokens a request may cost (what a quota reserves before it runs): a token
    per byte of its body, a bound on all its prompts' tokens (see ``BYTES_PER_TOKEN``),
    plus :func:`completion_bound`, with ``unbudgeted`` for each answer of a body that
    names no budget (which may then use more)."""
    return body_bytes // BYTES_PER_TOKEN + (completion_bound(route, body, unbudgeted) or 0)


def total_tokens(usage: Any) -> int | None:
    """An answer's ``usage.total_tokens``, or None when it is not a sane count (a number >= 0)."""
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    if type(total) is float and math.isfinite(total):
        total = int(total)
    return total if type(total) is int and total >= 0 else None


class UsageSum:
    """One answer's usage from llama-server's reports, which count each choice apart (chat
    sends a usage chunk per choice, completions put usage on each choice's last chunk),
    summed as OpenAI counts: every choice's completion tokens, each prompt's tokens (and
    their details) once. Choice ``i`` answers prompt ``i // per_prompt`` (a prompt list,
    see :func:`choices_asked`); a report without a choice's index is of the one prompt.
    ``total`` is the sum so far (None before the first report): a fresh dict, the first
    report's fields kept, ``total_tokens`` recomputed."""

    def __init__(self, per_prompt: int = 1) -> None:
        self.per_prompt = max(1, per_prompt)
        self.prompts: set[int] = set()
        self.total: dict[str, Any] | None = None

    def add(self, usage: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        """Count the report of one chunk (or whole answer), ``event``; returns the total."""
        choices = event.get("choices")
        index = choices[0].get("index") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
            else None
        prompt = (index if type(index) is int and index >= 0 else 0) // self.per_prompt
        new_prompt = prompt not in self.prompts
        self.prompts.add(prompt)
        total = self.total
        if total is None:
            total = self.total = dict(usage)
            for key in ("prompt_tokens_details", "completion_tokens_details"):
                if isinstance(usage.get(key), dict):
                    total[key] = dict(usage[key])
            return total
        fields = ("prompt_tokens", "completion_tokens") if new_prompt else ("completion_tokens",)
        for key in fields:
            total[key] = _int(total.get(key)) + _int(usage.get(key))
            details, more = total.get(f"{key}_details"), usage.get(f"{key}_details")
            if isinstance(details, dict) and isinstance(more, dict):
                for name, value in more.items():
                    if isinstance(value, int) and isinstance(details.get(name, 0), int):
                        details[name] = details.get(name, 0) + value
        total["total_tokens"] = _int(total.get("prompt_tokens")) + _int(total.get("completion_tokens"))
        return total


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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


# --- what llama-server counted, and how to ask it to stream ----------------------------

_TIMINGS = re.compile(rb'"timings":(\{[^{}]*\})')
_INDEX = re.compile(rb'"index":(\d+)')


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


class Tally:
    """What llama-server counted of an answer so far, from the ``timings`` it puts on
    every chunk when asked: the usage of an answer that ended before its usage chunk.

    It keeps a reference to the last chunk of each choice; nothing is decoded until
    :meth:`usage` is asked, once, at the end. With one choice (the usual case) seeing
    a chunk is one byte search and one assignment.

    Args:
        choices: How many choices the request makes (see :func:`choices_asked`).
        prompts: How many prompts they answer (a completions prompt list): each
            prompt's tokens count once, however many choices share it.
    """

    def __init__(self, choices: int = 1, prompts: int = 1) -> None:
        self.several = choices > 1
        self.per_prompt = max(1, choices // max(1, prompts))  # choices sharing one prompt
        self.last: dict[bytes, bytes] = {}

    def see(self, raw: bytes) -> None:
        if b'"timings"' in raw:
            if self.several:
                index = _INDEX.search(raw)
                self.last[index.group(1) if index else b"0"] = raw
            else:
                self.last[b"0"] = raw

    def usage(self) -> dict[str, int] | None:
        """Prompt tokens (cached and processed) and the tokens generated, all choices."""
        prompt, completion = 0, 0
        for raw in self.last.values():
            found = _TIMINGS.search(raw)
            timings = decode_json(found.group(1)) if found else None
            if not isinstance(timings, dict):
                continue
            prompt += _count(timings.get("cache_n")) + _count(timings.get("prompt_n"))
            completion += _count(timings.get("predicted_n"))
        prompt //= self.per_prompt
        if not prompt and not completion:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(value: Any) -> int:
    """A token count from a backend's JSON: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def prompts_asked(body: dict[str, Any] | None) -> int:
    """How many prompts llama-server makes of a body's ``prompt`` (completions, ``/completion``):
    a non-empty list holding no number is a prompt per item (strings, token-id lists,
    multimodal objects), as its ``tokenize_input_prompts`` reads it; anything else is one
    (a list of token ids, or of tokens and strings mixed, is one prompt)."""
    prompt = body.get("prompt") if body else None
    if isinstance(prompt, list) and prompt and not any(_number(item) for item in prompt):
        return len(prompt)
    return 1


def choices_asked(body: dict[str, Any] | None) -> tuple[int, int]:
    """How many answers (choices) a request makes, and for how many prompts: llama-server's
    ``n_cmpl`` wins over ``n``, and every prompt of a prompt list gets that many."""
    if not body:
        return 1, 1
    n = body.get("n_cmpl") if body.get("n_cmpl") is not None else body.get("n")
    n = int(n) if _integer(n) and n > 1 else 1
    prompts = prompts_asked(body)
    return n * prompts, prompts


def _integer(value: Any) -> bool:
    """A JSON integer (``true`` is not one; ``10.0`` is, as JSON Schema and llama-server read it)."""
    return type(value) is int or (type(value) is float and value.is_integer())


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def decode_json(data: bytes) -> Any:
    """JSON from a backend, or None when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return None


# --- answers in other shapes (Anthropic's messages, OpenAI's Responses, llama-server's own) ---

def usage_of(answer: Any, per_prompt: int = 1) -> dict[str, int] | None:
    """The token counts of an answer or stream event in any shape llama-server speaks, as
    OpenAI's ``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``), or None:

    - OpenAI's (``usage.prompt_tokens``), Responses' (``usage.input_tokens``, also inside
      a ``response.completed`` event's ``response``) and Anthropic's (``usage.input_tokens``
      plus ``cache_read_input_tokens``: Anthropic counts cached input apart; also inside a
      ``message_start`` event's ``message``);
    - llama-server's native ``/completion`` and ``/infill``: ``tokens_evaluated`` and
      ``tokens_predicted``; its answer to a prompt list (or ``n_cmpl``) is a list of such
      answers, one per choice, summed: every choice's completion, each prompt's tokens
      once (``per_prompt`` choices share one, see :func:`choices_asked`).
    """
    if isinstance(answer, list):
        counts = _Counts(per_prompt)
        for position, item in enumerate(answer):
            usage = usage_of(item)
            if usage is not None:
                counts.set(_index(item, position), usage["prompt_tokens"], usage["completion_tokens"])
        return counts.usage()
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    for wrapper in ("response", "message"):  # a Responses or an Anthropic stream event's whole answer
        if not isinstance(usage, dict) and isinstance(answer.get(wrapper), dict):
            usage = answer[wrapper].get("usage")
    if isinstance(usage, dict):
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        else:
            prompt = _count(usage.get("input_tokens")) + _count(usage.get("cache_read_input_tokens"))
            completion = _count(usage.get("output_tokens"))
    elif "tokens_predicted" in answer or "tokens_evaluated" in answer:
        prompt, completion = _count(answer.get("tokens_evaluated")), _count(answer.get("tokens_predicted"))
    else:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _index(item: Any, default: int) -> int:
    index = item.get("index") if isinstance(item, dict) else None
    return index if type(index) is int and index >= 0 else default


class _Counts:
    """The largest counts seen for each choice of an answer, summed as OpenAI counts them:
    every choice's completion tokens, each prompt's tokens once (choice ``i`` answers
    prompt ``i // per_prompt``)."""

    def __init__(self, per_prompt: int = 1) -> None:
        self.per_prompt = max(1, per_prompt)
        self.prompts: dict[int, int] = {}
        self.completions: dict[int, int] = {}

    def set(self, index: int, prompt: int, completion: int) -> None:
        key = index // self.per_prompt
        self.prompts[key] = max(self.prompts.get(key, 0), prompt)
        self.completions[index] = max(self.completions.get(index, 0), completion)

    def usage(self, completion_floor: int = 0) -> dict[str, int] | None:
        prompt = sum(self.prompts.values())
        completion = sum(self.completions.values()) or completion_floor
        if not prompt and not completion:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EventCount:
    """The usage of a stream in another shape: the largest counts its events report
    (Anthropic's ``message_start`` tells the input, ``message_delta`` the output so far,
    Responses' ``response.completed`` both, llama-server's native events their choice's
    so far, each choice apart by its ``index``, summed as :func:`usage_of` sums a list),
    and until one reports output, one completion token per event seen (llama-server
    sends about a token an event), so that a stream left early is still charged about
    what was generated.

    Args:
        choices: How many choices the request makes, and prompts they answer
            (:func:`choices_asked`).
    """

    def __init__(self, choices: int = 1, prompts: int = 1) -> None:
        self.events = 0
        self.counts = _Counts(max(1, choices // max(1, prompts)))

    def see(self, raw: bytes) -> None:
        self.events += 1
        if b'"usage"' not in raw and b'"tokens_predicted"' not in raw:
            return
        start = raw.find(b"data:")
        event = decode_json(raw[start + 5:]) if start >= 0 else None
        usage = usage_of(event)
        if usage is not None:
            self.counts.set(_index(event, 0), usage["prompt_tokens"], usage["completion_tokens"])

    def usage(self) -> dict[str, int] | None:
        return self.counts.usage(completion_floor=self.events)
