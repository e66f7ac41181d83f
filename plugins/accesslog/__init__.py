"""accesslog: one JSON line per request when it completes.

Fields: time, request_id, client, pipeline, route, model, backend, replica, routing, status,
latency_ms, ttfb_ms, prompt_tokens, cached_tokens, completion_tokens, cache, bytes_in,
bytes_out, outcome, error_type, kv (the saved KV states' work for the request: ``saves``,
``save_bytes``, ``save_ms``, ``restores``, ``restore_bytes``, ``restore_ms``,
``restored_tokens``, ``moves``, ``restore_failures``... as counted in ``ctx.counters`` and
``ctx.timings`` under ``kv.``; null when there was none). With ``log_bodies: true`` also ``request`` (the body) and
``completion`` (the answer's text). API keys are never written.

The plugin runs before auth, so it logs what unauthenticated clients send: every
string field is cut to ``FIELD_CHARS`` (a 4 MB ``model`` must not make a 4 MB line),
``request`` and ``completion`` to ``max_body_chars`` (a body too long is logged as its
JSON text, cut), each cut ending in ``…[+N chars]``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from gateway.plugin import FIELD_CHARS, cached_tokens, choice_text, clip, clip_json, hookimpl, redact_url


def answer_text(ctx) -> str | None:
    """The text of a non-streamed answer, or the text a stream assembled, if any."""
    return ctx.state.get("accesslog.text")


def kv_fields(ctx) -> dict[str, Any] | None:
    """The request's saved-KV-state counts and milliseconds (``kv.*``), or None."""
    fields: dict[str, Any] = {name[3:]: count for name, count in ctx.counters.items() if name.startswith("kv.")}
    fields.update((f"{name[3:]}_ms", round(ms, 2)) for name, ms in ctx.timings.items() if name.startswith("kv."))
    return fields or None


class UTCClock:
    """The time as ``datetime.now(timezone.utc).isoformat(timespec="milliseconds")``
    writes it (``2026-12-02T12:00:00.123+00:00``), the date and time formatted once a
    second rather than a datetime made and formatted per line."""

    def __init__(self) -> None:
        self.second, self.prefix = -1, ""

    def now(self) -> str:
        second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
        if second != self.second:
            self.second, self.prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{nanoseconds // 1_000_000:03d}+00:00"


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        path = config["path"]
        self.stream: TextIO = sys.stdout if path in (None, "-") else open(path, "a", buffering=1)
        self.log_bodies = config["log_bodies"]
        self.max_body_chars = config["max_body_chars"]
        self.lock = threading.Lock()
        self.clock = UTCClock()
        # Made once: json.dumps with options builds an encoder per call.
        self.encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self.replicas: dict[str, str] = {}  # a replica's URL -> as logged (its userinfo redacted)

    def wants_events(self, ctx) -> bool:
        # Without log_bodies nothing of a stream is logged: its events stay undecoded.
        return self.log_bodies

    @hookimpl
    def response(self, ctx, body):
        if self.log_bodies:
            ctx.state["accesslog.text"] = "".join(
                choice_text(c) for c in body.get("choices") or [] if isinstance(c, dict))

    @hookimpl
    def response_event(self, ctx, event):
        if self.log_bodies:
            for choice in event.get("choices") or []:
                piece = choice_text(choice)
                text = ctx.state.get("accesslog.text", "")
                if len(text) <= self.max_body_chars:  # keep no more than gets logged
                    ctx.state["accesslog.text"] = text + piece
                else:
                    ctx.state["accesslog.dropped"] = ctx.state.get("accesslog.dropped", 0) + len(piece)

    @hookimpl
    def complete(self, ctx, outcome):
        usage = ctx.usage or {}
        error = ctx.error
        record = {
            "time": self.clock.now(),
            "request_id": ctx.request_id,
            "client": ctx.principal.client_id if ctx.principal else None,
            "pipeline": ctx.pipeline,
            "route": ctx.route,
            "model": ctx.model or ctx.requested_model,
            "backend": ctx.backend,
            "replica": self._replica(ctx.replica) if ctx.replica else None,
            "routing": ctx.routing,
            "status": ctx.status,
            "latency_ms": round(ctx.latency_ms, 2),
            "ttfb_ms": round(ctx.ttfb_ms, 2) if ctx.ttfb_ms is not None else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": cached_tokens(usage),
            "completion_tokens": usage.get("completion_tokens"),
            "cache": ctx.cache,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "outcome": outcome,
            "error_type": error.code or error.type if error else None,
            "kv": kv_fields(ctx),
        }
        for name, value in record.items():
            if isinstance(value, str) and len(value) > FIELD_CHARS:  # (most fields are short: no call)
                record[name] = clip(value, FIELD_CHARS)
        if self.log_bodies:
            record["request"] = clip_json(ctx.body, self.max_body_chars)
            record["completion"] = self._completion(ctx)
        line = self.encode(record) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()

    def _replica(self, url: str) -> str:
        """The replica's URL as logged, redacted once per URL (replicas are the config's)."""
        logged = self.replicas.get(url)
        if logged is None:
            logged = self.replicas[url] = redact_url(url)
        return logged

    def _completion(self, ctx) -> str | None:
        text = answer_text(ctx)
        if text is None:
            return None
        dropped = ctx.state.get("accesslog.dropped", 0)
        if len(text) + dropped <= self.max_body_chars:
            return text
        return f"{text[:self.max_body_chars]}…[+{len(text) + dropped - self.max_body_chars} chars]"
