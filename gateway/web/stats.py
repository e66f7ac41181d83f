"""Live request figures for the operator's status page: a window of recent completions."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..context import RequestContext


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

    def __init__(self, size: int = 20_000) -> None:
        self.completions: deque[Completion] = deque(maxlen=size)
        self.started = time.monotonic()

    def record(self, ctx: RequestContext) -> None:
        error = ctx.error.code or ctx.error.type if ctx.error is not None else None
        self.completions.append(Completion(time.monotonic(), ctx.route, ctx.status or 0, ctx.latency_ms,
                                           ctx.cache, error, ctx.request_id))

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
