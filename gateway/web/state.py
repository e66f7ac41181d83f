"""What a worker holds: the configuration in force, its pipelines and backends, the
requests in flight, and the figures of the console (:class:`Gateway`); and what
of it outlives a reload (:class:`Carried`). No request flow lives here (that is
:mod:`gateway.web.flow`); only the operations on this state.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .. import lifecycle
from ..config import Config, SharedConfig
from ..context import Principal, RequestContext
from ..pipeline import Pipeline, build_pipelines
from ..storage.shared import Shared, SharedUnavailable
from .stats import Stats, Traffic
from ..backends.upstream import Backend, InFlight, Lease, Upstreams

log = logging.getLogger("llamagate")

LIVE_LISTED = 200  # requests in flight a worker lists for the console (its snapshot stays small)


def may_touch(caller: Principal | None, owner: Principal | None) -> bool:
    """Whether ``caller`` may act on a request made by ``owner``: its owner or an admin."""
    if caller is None:
        return False
    return caller.role == "admin" or (owner is not None and owner.client_id == caller.client_id)


class Carried:
    """What outlives a reload in one worker process: made with its first
    :class:`Gateway` and handed to each one that replaces it (:mod:`gateway.web.reload`).

    Attributes:
        in_flight: The requests with an open (or opening) backend connection, whichever
            gateway they began on: still cancellable after a reload.
        backends: The backends in force by name: an unchanged one is kept whole by the next
            gateway (pools, breakers, admission), a changed one hands on its admission
            (so old and new never admit twice the limit).
        shared: The link to the shared Redis in force (one per process: its listener and
            heartbeat run once), or None.
        traffic: The process's traffic per minute and latest errors, for the console.
    """

    def __init__(self) -> None:
        self.in_flight: set[InFlight] = set()
        self.backends: dict[str, Backend] = {}
        self.shared: Shared | None = None
        self.traffic = Traffic()

    def link(self, config: SharedConfig | None) -> Shared | None:
        """The Redis link for ``config``: the one in force if it is for the same Redis."""
        if config is None:
            return None
        if self.shared is not None and self.shared.config == config:
            return self.shared
        return Shared(config)

    def keep(self, gateway: Gateway) -> None:
        """``gateway`` is now in force: what it holds is what the next one takes over.
        A Redis link it no longer uses stops."""
        if self.shared is not None and self.shared is not gateway.shared:
            self.shared.stop()
        self.backends, self.shared = gateway.upstreams.backends, gateway.shared


class Gateway:
    """The configuration in force and the state of one worker.

    Args:
        config: A checked config.
        pipelines: Built pipelines by name; built from ``config`` when None.
        carried: What outlives a reload (:class:`Carried`), from the gateway this one
            replaces; a new one when None. This gateway takes it over once it is in
            force (:meth:`Carried.keep`).

    Attributes:
        config: The :class:`Config`.
        pipelines: :class:`Pipeline` by name.
        upstreams: The backends (:class:`Upstreams`).
        in_flight: Requests with an open (or opening) backend connection, tracked by
            the gateway's own handle: a client's ``x-request-id`` may be reused or
            collide. The process's (:attr:`Carried.in_flight`).
        active: Requests begun on this gateway and not completed.
        stats: Recent completions, for the console.
        traffic: The process's traffic per minute (:attr:`Carried.traffic`).
        shared: The link to the Redis every worker and host shares (``shared:``), or None.
        pending_counters: Counted on the next request's context, for events outside
            any request (a reload).
    """

    def __init__(self, config: Config, pipelines: dict[str, Pipeline] | None = None,
                 carried: Carried | None = None) -> None:
        self.config = config
        self.pipelines = pipelines if pipelines is not None else build_pipelines(config)
        self.carried = carried if carried is not None else Carried()
        self.shared = self.carried.link(config.shared)
        self.upstreams = Upstreams(config.backends, config.health_interval, self.carried.backends, self.shared)
        self.in_flight = self.carried.in_flight
        self.active = 0
        self.traffic = self.carried.traffic
        self.stats = Stats(self.traffic)
        self.pending_counters: dict[str, int] = {}
        self._shut_down = False

    @property
    def draining(self) -> bool:
        return lifecycle.draining

    def track(self, ctx: RequestContext) -> InFlight:
        """A handle for a request about to be sent to a backend, for cancel."""
        entry = InFlight(ctx)
        self.in_flight.add(entry)
        return entry

    def untrack(self, entry: InFlight) -> None:
        """The request no longer has a backend connection to cancel."""
        self.in_flight.discard(entry)

    def finish(self, lease: Lease) -> None:
        """Give the backend connection and the admission slot back; idempotent."""
        lease.close()
        self.untrack(lease.in_flight)

    def cancel(self, request_id: str, caller: Principal | None) -> int:
        """Cancel the requests in flight with this ``x-request-id`` that ``caller``
        owns (an admin: any); returns how many."""
        entries = [e for e in list(self.in_flight)
                   if e.ctx.request_id == request_id and may_touch(caller, e.ctx.principal)]
        for entry in entries:
            entry.cancel()
        return len(entries)

    def cancel_backend(self, backend: str) -> int:
        """Cancel every request in flight on ``backend``; returns how many."""
        entries = [e for e in list(self.in_flight) if e.ctx.backend == backend]
        for entry in entries:
            entry.cancel()
        return len(entries)

    def cancel_anywhere(self, request_id: str, caller: Principal | None) -> int:
        """:meth:`cancel` on this worker, else on every worker and host that shares Redis;
        returns once the cancels were made, with how many."""
        cancelled = self.cancel(request_id, caller)
        if cancelled or self.shared is None:
            return cancelled
        try:
            return self.shared.cancel(caller, request_id=request_id)
        except SharedUnavailable:
            return 0  # logged by Shared

    def cancel_backend_anywhere(self, backend: str, caller: Principal | None) -> int:
        """:meth:`cancel_backend` on this worker and every worker and host that shares Redis."""
        cancelled = self.cancel_backend(backend)
        if self.shared is None:
            return cancelled
        try:
            return cancelled + self.shared.cancel(caller, backend=backend, done_here=True)
        except SharedUnavailable:
            return cancelled

    def snapshot(self, worker: str) -> dict[str, Any]:
        """This worker's row of the status: what ``/admin/status`` sums over workers, and
        its requests in flight (``live``) for the console."""
        stats = self.stats.snapshot()
        return {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "draining": self.draining,
                "in_flight": len(self.in_flight), "requests": stats["requests"],
                "requests_per_s": stats["requests_per_s"], "errors": stats["errors"],
                "latency_ms": stats["latency_ms"],
                "backends": {name: {"in_flight": b.admission.in_flight, "queued": b.admission.queued}
                             for name, b in self.upstreams.backends.items()},
                "live": self.live()}

    def live(self, most: int = LIVE_LISTED) -> list[dict[str, Any]]:
        """This worker's requests in flight, the ``most`` oldest: who, what, how long, how
        much sent so far (no prompt, no answer)."""
        now = time.monotonic()
        oldest = sorted(list(self.in_flight), key=lambda entry: entry.ctx.started)[:most]
        return [{"request_id": ctx.request_id, "client": ctx.principal.client_id if ctx.principal else None,
                 "model": ctx.model, "route": ctx.route, "backend": ctx.backend, "stream": ctx.stream,
                 "waiting": entry.wake is not None,  # queued for a slot, or for its model to load
                 "age_s": round(now - ctx.started, 1), "bytes_out": ctx.bytes_out,
                 "completion_tokens": (ctx.usage or {}).get("completion_tokens")}
                for entry in oldest for ctx in (entry.ctx,)]

    @property
    def worker(self) -> str:
        """This worker's name in the status."""
        return self.shared.worker if self.shared is not None else f"{socket.gethostname()}/{os.getpid()}"

    def workers(self) -> tuple[list[dict[str, Any]], str]:
        """Every live worker's snapshot (this one's now, the others' from Redis with
        ``shared:``), and the shared Redis's state: ``off``, ``ok`` or ``unreachable``
        (then this worker's alone)."""
        worker = self.worker
        workers, shared = [self.snapshot(worker)], "off"
        if self.shared is not None:
            try:
                others = [w for w in self.shared.workers() if w["worker"] != worker]
                workers, shared = sorted(workers + others, key=lambda w: w["worker"]), "ok"
            except SharedUnavailable:
                shared = "unreachable"
        return workers, shared

    def status(self) -> dict[str, Any]:
        """``/admin/status``: this worker in detail, and a row per live worker of every
        host (from Redis, with ``shared:``; else only this one) with their totals."""
        worker = self.worker
        snapshots, shared = self.workers()
        workers = [{k: v for k, v in w.items() if k != "live"} for w in snapshots]
        totals: dict[str, Any] = {"workers": len(workers), "hosts": len({w["host"] for w in workers}),
                                  "draining": sum(w["draining"] for w in workers)}
        for field in ("in_flight", "requests", "requests_per_s", "errors"):
            totals[field] = round(sum(w[field] for w in workers), 2)
        totals["backends"] = {name: {field: sum(w["backends"].get(name, {}).get(field, 0) for w in workers)
                                     for field in ("in_flight", "queued")} for name in self.upstreams.backends}
        return {"pid": os.getpid(), "worker": worker, "draining": self.draining, "in_flight": len(self.in_flight),
                "stats": self.stats.snapshot(),
                "backends": {name: b.status() for name, b in self.upstreams.backends.items()},
                "pipelines": {name: p.describe() for name, p in self.pipelines.items()},
                "shared": shared, "totals": totals, "workers": workers}

    def client_gone(self, ctx: RequestContext) -> None:
        """The client of ``ctx`` hung up before its answer was ready: stop the work."""
        ctx.client_gone = True
        for entry in list(self.in_flight):
            if entry.ctx is ctx:
                entry.interrupt()

    def shutdown(self) -> None:
        """Run every plugin's ``shutdown`` hook, once."""
        if self._shut_down:
            return
        self._shut_down = True
        for pipeline in self.pipelines.values():
            pipeline.shutdown()
