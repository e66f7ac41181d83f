"""router: picks the replica of the model's backend.

Replicas whose last background health check failed (llama-server answers 503
while it loads a model) or whose circuit breaker is open are skipped; among the
rest, ``least_in_flight`` takes the one with the fewest requests in flight, ties in
the gateway's own round-robin order (``BackendView.candidates()``: one rotation for
the whole gateway), and ``round_robin`` the next in that order. The gateway fails
over to the other replicas when the chosen one refuses the connection, before any
byte was sent.
"""

from __future__ import annotations

from typing import Any

from gateway import hookimpl


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.least_in_flight = config["strategy"] == "least_in_flight"

    @hookimpl
    def route(self, ctx, backends):
        backend = backends.get(ctx.backend)
        if backend is None:
            return None
        ready = backend.candidates()
        if not ready:
            return None  # let the gateway try them all: one may have come back
        if self.least_in_flight:
            return min(ready, key=lambda replica: replica.in_flight)  # the first of the fewest
        return ready[0]
