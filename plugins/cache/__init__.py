"""cache: exact-match answers for chat, completions and embeddings.

The key is a hash of the route, the model and the canonical body (without
``stream``, ``stream_options`` and ``user``), and the client id when
``per_client``. An answer is stored once the request completed normally, whole:
a streamed answer is assembled from its events, so a later request may be served
streamed or not from either. Errors, truncated and abandoned streams are never
stored. ``x-cache: HIT`` or ``MISS`` tells which happened.
"""

from __future__ import annotations

import hashlib
import logging
import json
from typing import Any

from gateway import Response, hookimpl
from gateway.stores import StoreUnavailable, make_store

IGNORED_FIELDS = ("stream", "stream_options", "user")


def cacheable(route: str, body: dict[str, Any], only_deterministic: bool) -> bool:
    if route == "/v1/embeddings" or not only_deterministic:
        return True
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(ctx, per_client: bool) -> str:
    canonical = {k: v for k, v in ctx.body.items() if k not in IGNORED_FIELDS}
    canonical["model"] = ctx.model
    material = json.dumps([ctx.route, canonical, ctx.principal.client_id if per_client and ctx.principal else None],
                          sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def stream_events(answer: dict[str, Any], with_usage: bool) -> list[dict[str, Any]]:
    """A cached whole answer as the chunks a stream of it would have had."""
    chat = answer.get("object") == "chat.completion"
    base = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for choice in answer.get("choices", []):
        if chat:
            content = {"role": "assistant", "content": (choice.get("message") or {}).get("content")}
            events.append(dict(base, choices=[{"index": choice["index"], "delta": content, "logprobs": None,
                                               "finish_reason": None}]))
            events.append(dict(base, choices=[{"index": choice["index"], "delta": {}, "logprobs": None,
                                               "finish_reason": choice.get("finish_reason")}]))
        else:
            events.append(dict(base, choices=[{"index": choice["index"], "text": choice.get("text", ""),
                                               "logprobs": None, "finish_reason": choice.get("finish_reason")}]))
    if with_usage and answer.get("usage"):
        events.append(dict(base, choices=[], usage=answer["usage"]))
    return events


class Assembler:
    """Builds the whole answer from a stream's events."""

    def __init__(self) -> None:
        self.base: dict[str, Any] = {}
        self.chat = True
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}

    def add(self, event: dict[str, Any]) -> None:
        if not self.base:
            self.base = {k: event[k] for k in ("id", "created", "model", "system_fingerprint") if k in event}
            self.chat = event.get("object") == "chat.completion.chunk"
        for choice in event.get("choices") or []:
            index = choice.get("index", 0)
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            self.texts.setdefault(index, []).append(piece or "")
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]

    def answer(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The whole answer, or None when some choice never finished."""
        if not self.texts or set(self.finish) != set(self.texts):
            return None
        choices = []
        for index in sorted(self.texts):
            text = "".join(self.texts[index])
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": self.finish[index]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choices.append(choice)
        obj = "chat.completion" if self.chat else "text_completion"
        return dict(self.base, object=obj, choices=choices, usage=usage)


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.ttl = config["ttl"]
        self.per_client = config["per_client"]
        self.only_deterministic = config["only_deterministic"]
        self.store = make_store(config, "cache")

    @hookimpl
    def request(self, ctx):
        if ctx.body is None or ctx.model is None or not cacheable(ctx.route, ctx.body, self.only_deterministic):
            return None
        key = cache_key(ctx, self.per_client)
        try:
            data = self.store.get(key)
        except StoreUnavailable as exc:
            ctx.incr("cache.store_unavailable")
            ctx.log(logging.WARNING, "cache store unreachable, bypassing the cache: %s", exc)
            return None
        ctx.cache = "HIT" if data is not None else "MISS"
        ctx.response_headers["x-cache"] = ctx.cache
        if data is None:
            ctx.state["cache"] = {"key": key, "answer": None, "assembler": Assembler() if ctx.stream else None}
            return None
        answer = json.loads(data)
        return Response(body=answer, events=stream_events(answer, ctx.client_wants_usage) if ctx.stream else None)

    @hookimpl
    def response(self, ctx, body):
        pending = ctx.state.get("cache")
        if pending is not None:
            pending["answer"] = body

    @hookimpl
    def response_event(self, ctx, event):
        pending = ctx.state.get("cache")
        if pending is not None and pending["assembler"] is not None:
            pending["assembler"].add(event)

    @hookimpl
    def complete(self, ctx, outcome):
        pending = ctx.state.get("cache")
        if pending is None or outcome != "ok" or ctx.status != 200:
            return
        answer = pending["answer"] if pending["assembler"] is None else pending["assembler"].answer(ctx.usage)
        if answer is None:
            return
        try:
            self.store.set(pending["key"], json.dumps(answer).encode(), self.ttl)
        except StoreUnavailable:
            ctx.incr("cache.store_unavailable")
