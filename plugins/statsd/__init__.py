"""statsd: request metrics over UDP with the ``statsd`` package.

Every name is Graphite-safe: dots only separate parts, any other character of a
route, model, backend or error type becomes ``_``. Requests only add lines to a
batch; a background greenlet sends the batch every ``flush_interval`` seconds, in
packets of at most 512 bytes, so no request pays a send (three per request cost a
tenth of a pass-through's CPU). The in-flight gauges change as requests start and
end. A send error is swallowed: metrics never fail a request. More than
``MAX_PENDING_LINES`` unsent lines (StatsD unreachable for long never grows it:
UDP sends do not wait) are dropped and counted in the next batch.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from typing import Any, Callable

import statsd

from gateway.plugin import cached_tokens, hookimpl

log = logging.getLogger("llamagate")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# Names are made once per distinct input (a request makes about ten; the inputs are the
# config's routes, models and backends, and the names plugins count under), bounded, as a
# client's unknown model name is an input too.
NAMES_KEPT = 4096


@functools.lru_cache(maxsize=NAMES_KEPT)
def safe(part: str | None) -> str:
    """One Graphite path segment: ``/v1/chat/completions`` -> ``v1_chat_completions``."""
    return _UNSAFE.sub("_", part or "none").strip("_") or "none"


@functools.lru_cache(maxsize=NAMES_KEPT)
def metric(name: str) -> str:
    """A dotted name from a plugin or the core, each part made safe."""
    return ".".join(safe(part) for part in name.split("."))


@functools.lru_cache(maxsize=NAMES_KEPT)
def route_name(route: str) -> str:
    return safe(route.removeprefix("/v1/"))


MAX_PENDING_LINES = 100_000


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        # The client resolves the host once and sends without waiting: UDP never blocks.
        self.client = statsd.StatsClient(config["host"], config["port"], prefix=config["prefix"])
        self.interval = config["flush_interval"]
        self.batch = self.client.pipeline()
        self.pending = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._flusher_pid: int | None = None

    def _send(self, fill: Callable[[Any], None], lines: int) -> None:
        """Add ``lines`` metric lines to the batch (``fill`` writes them)."""
        if self._flusher_pid != os.getpid():  # first use in this (forked) worker
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._flush_every_interval, name="llamagate-statsd", daemon=True).start()
        if self.pending >= MAX_PENDING_LINES:
            self.dropped += lines
            return
        self.pending += lines
        fill(self.batch)

    def _flush_every_interval(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        """Send the lines gathered so far."""
        batch, self.batch, self.pending = self.batch, self.client.pipeline(), 0
        if self.dropped:
            batch.incr("statsd.dropped", self.dropped)
            self.dropped = 0
        try:
            batch.send()
        except OSError as exc:  # nothing listening, no route: metrics must not fail requests
            log.debug("statsd send failed: %s", exc)

    @hookimpl
    def shutdown(self):
        self._stop.set()
        self.flush()

    @hookimpl
    def request_start(self, ctx):
        ctx.state["statsd"] = None
        self._send(lambda b: b.gauge("inflight", 1, delta=True), 1)

    @hookimpl
    def upstream_request(self, ctx, payload):
        backend = safe(ctx.backend)
        ctx.state["statsd"] = backend
        self._send(lambda b: b.gauge(f"inflight.{backend}", 1, delta=True), 1)

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
            cached = cached_tokens(usage)
            if cached:
                batch.incr(f"tokens.cached.{model}", cached)
            for name, count in ctx.counters.items():
                batch.incr(metric(name), count)
            for name, ms in ctx.timings.items():
                batch.timing(metric(name), ms)
            for name, level in ctx.gauges.items():
                batch.gauge(metric(name), level)

        self._send(fill, 16 + len(ctx.counters) + len(ctx.timings) + len(ctx.gauges))  # a bound, for the cap
