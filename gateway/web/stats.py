"""Live request figures for the operator's console: a window of this worker's recent
completions (:class:`Stats`), and per-minute totals of the last hour with the latest
errors (:class:`Traffic`), which the shared heartbeat adds to Redis for every worker and
host (:mod:`gateway.storage.shared`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..context import RequestContext
from ..storage.shared import ERRORS_KEPT

HOUR_MINUTES = 60
# What Traffic counts per minute (integers: Redis adds them with HINCRBY).
TRAFFIC_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens",
                  "first_byte_ms", "first_byte_count", "queue_ms", "queue_count")


@dataclass(frozen=True)
class Completion:
    at: float
    route: str
    status: int
    latency_ms: float
    cache: str | None
    error: str | None
    request_id: str


class Stats:
    """The last ``size`` completed requests of this worker; recording is an append."""

    def __init__(self, traffic: Traffic | None = None, size: int = 20_000) -> None:
        self.completions: deque[Completion] = deque(maxlen=size)
        self.started = time.monotonic()
        self.traffic = traffic if traffic is not None else Traffic()

    def record(self, ctx: RequestContext) -> None:
        error = ctx.error.code or ctx.error.type if ctx.error is not None else None
        self.completions.append(Completion(time.monotonic(), ctx.route, ctx.status or 0, ctx.latency_ms,
                                           ctx.cache, error, ctx.request_id))
        if not ctx.route.startswith("/admin/"):  # the console does not chart its own polling
            self.traffic.record(ctx, error)

    def snapshot(self, window: float = 60.0, recent_errors: int = 10) -> dict[str, Any]:
        """Requests/s, latency percentiles, cache hit rate over the last ``window`` seconds,
        and the latest errors."""
        now = time.monotonic()
        recent = [c for c in self.completions if now - c.at <= window]
        latencies = sorted(c.latency_ms for c in recent)
        lookups = [c for c in recent if c.cache in ("HIT", "MISS")]
        span = max(1.0, min(window, now - self.started))

        def percentile(fraction: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(fraction * len(latencies)))], 1) if latencies else None

        errors = [c for c in self.completions if c.error is not None][-recent_errors:]
        return {
            "window_s": window,
            "requests": len(recent),
            "requests_per_s": round(len(recent) / span, 2),
            "latency_ms": {"p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)},
            "errors": sum(1 for c in recent if c.error is not None),
            "cache_hit_rate": round(sum(c.cache == "HIT" for c in lookups) / len(lookups), 3) if lookups else None,
            "recent_errors": [{"seconds_ago": round(now - c.at, 1), "route": c.route, "status": c.status,
                               "error": c.error, "request_id": c.request_id} for c in reversed(errors)],
        }


def _count(usage: Any, name: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if type(value) is int and 0 <= value < 2**31 else 0


class Traffic:
    """This worker's completions per minute (:data:`TRAFFIC_FIELDS`: requests, errors,
    tokens, the time to the first byte out, which for a stream is its first token, and
    the admission queue's wait) for the last hour, and its latest errors. Recording adds
    to one row of integers; what was recorded since the last :meth:`take` is what the
    shared heartbeat adds to Redis (one round trip a beat, off the request path). One per
    process (:class:`gateway.web.state.Carried`): a reload loses no count.

    Attributes:
        minutes: Epoch minute to this worker's totals in :data:`TRAFFIC_FIELDS` order, the
            last hour (the console's view without shared Redis).
        errors: This worker's latest errors, newest last.
    """

    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self._sent: dict[int, list[int]] = {}  # what take() handed over of each minute
        self._unsent_errors: list[dict[str, Any]] = []

    def record(self, ctx: RequestContext, error: str | None) -> None:
        now = time.time()
        minute = int(now // 60)
        row = self.minutes.get(minute)
        if row is None:
            self._forget(self.minutes, minute)
            row = self.minutes[minute] = [0] * len(TRAFFIC_FIELDS)
        usage = ctx.usage
        row[0] += 1
        if usage is not None:
            row[2] += _count(usage, "prompt_tokens")
            row[3] += _count(usage, "completion_tokens")
        if ctx.first_byte_at is not None:
            row[4] += round((ctx.first_byte_at - ctx.started) * 1000.0)
            row[5] += 1
        queue = ctx.timings.get("queue." + ctx.backend) if ctx.backend else None
        if queue is not None:
            row[6] += round(queue)
            row[7] += 1
        if error is not None:
            row[1] += 1
            principal = ctx.principal
            entry = {"at": round(now, 3), "request_id": ctx.request_id, "status": ctx.status or 0, "error": error,
                     "route": ctx.route, "model": ctx.model, "client": principal.client_id if principal else None}
            self.errors.append(entry)
            self._unsent_errors = (self._unsent_errors + [entry])[-ERRORS_KEPT:]

    @staticmethod
    def _forget(table: dict[int, list[int]], minute: int) -> None:
        for old in [m for m in table if m <= minute - HOUR_MINUTES]:
            del table[old]

    def counts(self) -> dict[int, dict[str, int]]:
        """This worker's totals of the last hour, by epoch minute and field."""
        return {minute: dict(zip(TRAFFIC_FIELDS, row)) for minute, row in self.minutes.items()}

    def take(self) -> tuple[dict[int, dict[str, int]], list[dict[str, Any]]]:
        """What was recorded since the last take (per-minute increments, errors), handed
        over: the caller writes it, or gives it back (:meth:`restore`)."""
        minutes: dict[int, dict[str, int]] = {}
        current = int(time.time() // 60)
        self._forget(self.minutes, current)
        self._forget(self._sent, current)
        for minute, row in list(self.minutes.items()):
            sent = self._sent.get(minute)
            added = row if sent is None else [now - before for now, before in zip(row, sent)]
            if any(added):
                minutes[minute] = dict(zip(TRAFFIC_FIELDS, added))
                self._sent[minute] = list(row)
        errors, self._unsent_errors = self._unsent_errors, []
        return minutes, errors

    def restore(self, minutes: dict[int, dict[str, int]], errors: list[dict[str, Any]]) -> None:
        """A :meth:`take` that could not be written: handed over again by the next (at
        most the last hour's minutes and :data:`ERRORS_KEPT` errors)."""
        for minute, added in minutes.items():
            sent = self._sent.get(minute)
            if sent is not None:
                self._sent[minute] = [before - added[field] for before, field in zip(sent, TRAFFIC_FIELDS)]
        self._unsent_errors = (errors + self._unsent_errors)[-ERRORS_KEPT:]
