"""cache: exact-match answers for chat, completions and embeddings.

The key is a hash of the route, the pipeline, the model and the canonical body
(without ``stream``, ``stream_options`` and ``user``), and the client id unless
``per_client`` is off. An answer is stored once the request completed normally,
whole: a streamed answer is assembled from its events by ``gateway.answers.Assembler``
(tool calls, logprobs, refusal and usage included; an answer it cannot assemble
whole is not stored), and replayed by ``gateway.answers.stream_events``, so a later
request may be served streamed or not from either. Errors, truncated and abandoned
streams are never stored. ``x-cache: HIT`` or ``MISS`` tells which happened.
"""

from __future__ import annotations

import hashlib
import logging
import json
from typing import Any

from gateway.plugin import (
    Assembler,
    Response,
    StoreUnavailable,
    choices_asked,
    hookimpl,
    make_store,
    normalize_answer,
    stream_events,
)

IGNORED_FIELDS = ("stream", "stream_options", "user")
# llama.cpp's seed is a uint32 whose largest value (also written -1) means "a random seed".
RANDOM_SEED = 0xFFFFFFFF


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def deterministic(body: dict[str, Any]) -> bool:
    """Greedy sampling (temperature 0) or a fixed seed; -1 (llama.cpp's random seed),
    other negative and non-integer seeds are not fixed."""
    temperature, seed = body.get("temperature"), body.get("seed")
    if _number(temperature) and temperature == 0:
        return True
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < RANDOM_SEED


CACHED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")  # answers in OpenAI's shapes


def cacheable(route: str, body: dict[str, Any], only_deterministic: bool) -> bool:
    if route not in CACHED_ROUTES:
        return False
    if route == "/v1/embeddings" or not only_deterministic:
        return True
    return deterministic(body)


def cache_key(ctx, per_client: bool) -> str:
    canonical = {k: v for k, v in ctx.body.items() if k not in IGNORED_FIELDS}
    canonical["model"] = ctx.model
    client = ctx.principal.client_id if per_client and ctx.principal else None
    material = json.dumps([ctx.route, ctx.pipeline, canonical, client], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def whole(route: str, answer: Any) -> bool:
    """Whether a non-streamed answer is complete enough to serve again."""
    if not isinstance(answer, dict):
        return False
    if route == "/v1/embeddings":
        return isinstance(answer.get("data"), list) and bool(answer["data"])
    choices = answer.get("choices")
    return (isinstance(choices, list) and bool(choices)
            and all(isinstance(c, dict) and c.get("finish_reason") for c in choices))


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
            choices, prompts = choices_asked(ctx.body)
            assembler = Assembler(choices // prompts) if ctx.stream else None
            ctx.state["cache"] = {"key": key, "answer": None, "assembler": assembler}
            return None
        answer = json.loads(data)
        return Response(body=answer, events=stream_events(answer, ctx.client_wants_usage) if ctx.stream else None)

    @hookimpl
    def response(self, ctx, body):
        pending = ctx.state.get("cache")
        if pending is not None:
            pending["answer"] = body

    def wants_events(self, ctx) -> bool:
        # Only a streamed miss that may be stored needs its events decoded.
        pending = ctx.state.get("cache")
        return pending is not None and pending["assembler"] is not None

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
        if pending["assembler"] is None:
            answer = pending["answer"]
            if not whole(ctx.route, answer):
                return
        else:
            # None: a choice never finished, or a chunk carried what the assembler
            # does not understand; such an answer is never stored.
            answer = pending["assembler"].answer(ctx.usage)
            if answer is None:
                return
            normalize_answer(answer, ctx.model)
        try:
            self.store.set(pending["key"], json.dumps(answer).encode(), self.ttl)
        except StoreUnavailable:
            ctx.incr("cache.store_unavailable")
