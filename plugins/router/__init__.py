"""router: picks the replica of the model's backend.

Replicas whose last background health check failed (llama-server answers 503
while it loads a model) or whose circuit breaker is open are skipped; among the rest, the one with the fewest
requests in flight wins, ties in turn. The gateway fails over to the other
replicas when the chosen one refuses the connection, before any byte was sent.
"""

from __future__ import annotations

import itertools
from typing import Any

from gateway import hookimpl


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.least_in_flight = config["strategy"] == "least_in_flight"
        self.turn = itertools.count()

    @hookimpl
    def route(self, ctx, backends):
        backend = backends.get(ctx.backend)
        if backend is None:
            return None
        ready = [r for r in backend.replicas if r.available]
        if not ready:
            return None  # let the gateway try them all: one may have come back
        if self.least_in_flight:
            fewest = min(r.in_flight for r in ready)
            ready = [r for r in ready if r.in_flight == fewest]
        return ready[next(self.turn) % len(ready)]
