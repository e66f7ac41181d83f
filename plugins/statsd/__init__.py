"""statsd: request metrics over UDP with the ``statsd`` package.

Every name is Graphite-safe: dots only separate parts, any other character of a
route, model, backend or error type becomes ``_``. The metrics of one request go
out in one UDP packet when it completes; the in-flight gauges change as requests
start and end. A send error is swallowed: metrics never fail a request.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import statsd

from gateway import hookimpl

log = logging.getLogger("llamagate")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe(part: str | None) -> str:
    """One Graphite path segment: ``/v1/chat/completions`` -> ``v1_chat_completions``."""
    return _UNSAFE.sub("_", part or "none").strip("_") or "none"


def metric(name: str) -> str:
    """A dotted name from a plugin or the core, each part made safe."""
    return ".".join(safe(part) for part in name.split("."))


def route_name(route: str) -> str:
    return safe(route.removeprefix("/v1/"))


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        # The client resolves the host once and sends without waiting: UDP never blocks.
        self.client = statsd.StatsClient(config["host"], config["port"], prefix=config["prefix"])

    def _send(self, fill) -> None:
        try:
            with self.client.pipeline() as batch:
                fill(batch)
        except OSError as exc:  # nothing listening, no route: metrics must not fail requests
            log.debug("statsd send failed: %s", exc)

    @hookimpl
    def request_start(self, ctx):
        ctx.state["statsd"] = None
        self._send(lambda b: b.gauge("inflight", 1, delta=True))

    @hookimpl
    def upstream_request(self, ctx, payload):
        backend = safe(ctx.backend)
        ctx.state["statsd"] = backend
        self._send(lambda b: b.gauge(f"inflight.{backend}", 1, delta=True))

    @hookimpl
    def complete(self, ctx, outcome):
        route = route_name(ctx.route)
        model = safe(ctx.model or ctx.requested_model)
        backend = ctx.state.get("statsd")
        error = ctx.error

        def fill(batch) -> None:
            batch.incr(f"requests.{route}.{ctx.status}")
            batch.timing(f"latency.{route}", ctx.latency_ms)
            if "statsd" in ctx.state:  # request_start ran: it raised the gauge
                batch.gauge("inflight", -1, delta=True)
            if backend is not None:
                batch.gauge(f"inflight.{backend}", -1, delta=True)
                if ctx.upstream_ms is not None:
                    batch.timing(f"upstream.{backend}", ctx.upstream_ms)
                if error is not None and error.status >= 500:
                    batch.incr(f"upstream.{backend}.errors")
            if error is not None:
                batch.incr(f"errors.{safe(error.code or error.type)}")
                if error.status == 429:
                    batch.incr("ratelimit.rejected")
            if ctx.cache in ("HIT", "MISS"):
                batch.incr(f"cache.{ctx.cache.lower()}")
            if ctx.ttfb_ms is not None and ctx.model and outcome == "ok":
                batch.timing(f"ttfb.{model}", ctx.ttfb_ms)
            usage = ctx.usage or {}
            if usage.get("prompt_tokens"):
                batch.incr(f"tokens.prompt.{model}", usage["prompt_tokens"])
            if usage.get("completion_tokens"):
                batch.incr(f"tokens.completion.{model}", usage["completion_tokens"])
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if isinstance(cached, int) and cached > 0:
                batch.incr(f"tokens.cached.{model}", cached)
            for name, count in ctx.counters.items():
                batch.incr(metric(name), count)
            for name, ms in ctx.timings.items():
                batch.timing(metric(name), ms)
            for name, level in ctx.gauges.items():
                batch.gauge(metric(name), level)

        self._send(fill)
