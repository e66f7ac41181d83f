"""Live request figures for the operator's console: a window of this worker's recent
completions (:class:`Stats`), and per-minute totals of the last hour with the latest
errors (:class:`Traffic`), which the shared heartbeat adds to Redis for every worker and
host (:mod:`gateway.storage.shared`)."""

from __future__ import annotations

import time
from collections import Counter, deque
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
    to a few counters; what was recorded since the last :meth:`take` is what the shared
    heartbeat adds to Redis (one pipeline a beat, off the request path). One per process
    (:class:`gateway.web.state.Carried`): a reload loses no count.

    Attributes:
        minutes: Epoch minute to this worker's totals, the last hour (the console's view
            without shared Redis).
        errors: This worker's latest errors, newest last.
    """

    def __init__(self) -> None:
        self.minutes: dict[int, Counter[str]] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self._unsent: dict[int, Counter[str]] = {}
        self._unsent_errors: list[dict[str, Any]] = []

    def record(self, ctx: RequestContext, error: str | None) -> None:
        now = time.time()
        minute = int(now // 60)
        counts = Counter(requests=1, errors=int(error is not None), prompt_tokens=_count(ctx.usage, "prompt_tokens"),
                         completion_tokens=_count(ctx.usage, "completion_tokens"))
        if ctx.ttfb_ms is not None:
            counts.update(first_byte_ms=round(ctx.ttfb_ms), first_byte_count=1)
        queue = ctx.timings.get(f"queue.{ctx.backend}") if ctx.backend else None
        if queue is not None:
            counts.update(queue_ms=round(queue), queue_count=1)
        if minute not in self.minutes:
            self._forget(self.minutes, minute)
        self.minutes.setdefault(minute, Counter()).update(counts)
        self._unsent.setdefault(minute, Counter()).update(counts)
        if error is not None:
            principal = ctx.principal
            entry = {"at": round(now, 3), "request_id": ctx.request_id, "status": ctx.status or 0, "error": error,
                     "route": ctx.route, "model": ctx.model, "client": principal.client_id if principal else None}
            self.errors.append(entry)
            self._unsent_errors = (self._unsent_errors + [entry])[-ERRORS_KEPT:]

    @staticmethod
    def _forget(table: dict[int, Counter[str]], minute: int) -> None:
        for old in [m for m in table if m <= minute - HOUR_MINUTES]:
            del table[old]

    def take(self) -> tuple[dict[int, dict[str, int]], list[dict[str, Any]]]:
        """What was recorded since the last take (per-minute increments, errors), handed
        over: the caller writes it, or gives it back (:meth:`restore`)."""
        minutes, errors = self._unsent, self._unsent_errors
        self._unsent, self._unsent_errors = {}, []
        return {m: dict(c) for m, c in minutes.items()}, errors

    def restore(self, minutes: dict[int, dict[str, int]], errors: list[dict[str, Any]]) -> None:
        """A :meth:`take` that could not be written: kept for the next (at most the last
        hour's minutes and :data:`ERRORS_KEPT` errors)."""
        for minute, counts in minutes.items():
            self._unsent.setdefault(minute, Counter()).update(counts)
        self._forget(self._unsent, int(time.time() // 60))
        self._unsent_errors = (errors + self._unsent_errors)[-ERRORS_KEPT:]
