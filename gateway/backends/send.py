"""Sending a request to a backend, in layers, one concern each (:func:`open_lease`):

1. **fleet lease** (:func:`fleet_lease`): to a launched backend, lease its model from the
   fleet first (:mod:`gateway.fleet`), waiting while it loads;
2. **admission**: at most ``max_in_flight`` requests per backend per worker (default:
   this worker's share of the replicas' llama-server slots, so that all workers together
   fill the slots), the rest in a bounded queue, admins first, then keys by priority, then
   clients in turn, first come first served within a client (:mod:`gateway.backends.turns`); a
   full queue, a client holding its share of it, or a wait past ``queue_timeout`` is a 503
   with ``Retry-After``. With ``admission: redis`` the slots and the queue are the whole
   gateway's (:mod:`gateway.backends.admission`);
3. **restarts**: when every replica of a launched backend refused, the request waits for
   the fleet to restart them (that wait, like a load, comes out of ``first_byte``);
4. **retries**: to a replica whose circuit breaker is closed (or that is due a probe): the
   ``route`` hooks' choice first, then ready replicas round robin; retried, before any byte
   reached the client, when the connection is refused or reset or the replica answers
   502/503 (llama-server answers 503 while it loads), with exponential backoff and jitter,
   on another replica when there is one, until the route's ``retry_deadline``;
5. **attempt**: one replica. On routes whose prompts llama-server caches, it takes a slot
   of the replica and says in the payload which (``id_slot``) and whether it may reuse the
   slot's cache (``cache_prompt``): only a slot its own tenant used last
   (:mod:`gateway.backends.slots`). Before it replaces what the slot holds, the gateway saves
   that conversation and restores the request's own from its saved state (:func:`gateway.backends.warm.keep_warm`,
   :mod:`gateway.backends.kvstates`). The replica counts it in flight (:class:`gateway.backends.upstream.Busy`)
   until it fails or the :class:`gateway.backends.upstream.Lease` of its answer closes.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping

from . import slots, warm
from ..config import Timeouts
from ..context import RequestContext
from ..errors import (
    GatewayError,
    LlamagateError,
    Phase,
    ServiceUnavailableError,
    failure_reason,
    from_backend,
)
from ..fleet import client as fleet
from .httpclient import ConnectFailed, ConnectTimedOut, HTTPFailure
from .turns import QueuePlace
from .upstream import Backend, InFlight, Lease, Replica

RETRIED_STATUSES = (502, 503)
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


@dataclass(slots=True)
class Outgoing:
    """What to send a backend.

    Attributes:
        path: e.g. ``/v1/chat/completions``.
        body: bytes, or a JSON payload, encoded per attempt with its slot's fields.
        headers: The request's headers to the backend.
        timeouts: The route's timeouts.
        method: The HTTP method.
    """

    path: str
    body: bytes | dict[str, Any]
    headers: Mapping[str, str]
    timeouts: Timeouts
    method: str = "POST"


class _LaunchedDown(LlamagateError):
    """Every replica of a launched backend refused the request: its llama-servers died,
    and the fleet is restarting them. ``error`` is the last attempt's."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def open_lease(ctx: RequestContext, backend: Backend, first: Replica | None, outgoing: Outgoing,
               in_flight: InFlight, retry_after: str) -> Lease:
    """Lease a launched backend's model from the fleet (waiting while it loads), admit
    the request, then send it until a replica answers; see the module doc.
    ``retry_after``: the ``Retry-After`` of a backend that cannot take requests now.

    Sets ``ctx.replica``, ``ctx.sent`` and the ``ctx.marks`` of the fleet's lease and of
    admission; counts each retry as ``upstream.retries``, the
    queue depth on arrival as the gauge ``queue.<backend>`` and the wait as the timer of
    the same name.

    Raises:
        ServiceUnavailableError: queue full or timed out, or no replica reachable.
        GatewayTimeoutError: the replica did not start answering in time.
        GatewayError: the last replica's 502/503 once the retry deadline passed.
    """
    return _Send(ctx, backend, outgoing, in_flight, retry_after).open(first)


def fleet_lease(ctx: RequestContext, backend: Backend, timeouts: Timeouts, in_flight: InFlight,
                check: bool = False) -> tuple[fleet.Hold, Timeouts]:
    """Lease a launched backend from the fleet, waiting while it loads; the load
    comes out of the first-byte budget. Counts ``fleet.swaps`` and ``fleet.restarts``
    and times ``fleet.load.<backend>`` on the request that waited for a load.
    ``check``: its llama-servers refused the request (see :func:`fleet.acquire`)."""
    # Requests wait for the fleet before admission: bounded as admission bounds its own.
    if backend.fleet_waiting >= backend.limit + backend.config.max_queue:
        raise ServiceUnavailableError(f"The model of backend {backend.name} is not ready and too many requests "
                                      "wait for it; try again shortly.", code="queue_full",
                                      headers={"Retry-After": "1"})
    start = time.monotonic()
    budget = min(timeouts.first_byte, max(0.001, ctx.started + timeouts.total - start))

    def set_wake(wake: Any) -> None:
        in_flight.wake = wake

    backend.fleet_waiting += 1
    ctx.marks["fleet.asked"] = start
    try:
        hold = fleet.acquire(backend.name, budget, set_wake, lambda: in_flight.stopped, check)
    finally:
        backend.fleet_waiting -= 1
    ctx.marks["fleet.granted"] = granted = time.monotonic()
    waited = granted - start
    if hold.report.get("load_seconds") is not None:
        ctx.timings[f"fleet.load.{backend.name}"] = hold.report["load_seconds"] * 1000.0
        if hold.report.get("swap"):
            ctx.incr("fleet.swaps")
        if hold.report.get("restart"):
            ctx.incr("fleet.restarts")
    return hold, replace(timeouts, first_byte=max(0.001, timeouts.first_byte - waited))


class _Send:
    """One request's send; each method is one layer of the module doc. ``hold`` is the
    fleet's lease while there is one, ``timeouts`` what is left of the route's after the
    fleet's waits."""

    __slots__ = ("ctx", "backend", "outgoing", "in_flight", "retry_after", "timeouts", "hold")

    def __init__(self, ctx: RequestContext, backend: Backend, outgoing: Outgoing, in_flight: InFlight,
                 retry_after: str) -> None:
        self.ctx = ctx
        self.backend = backend
        self.outgoing = outgoing
        self.in_flight = in_flight
        self.retry_after = retry_after
        self.timeouts = outgoing.timeouts
        self.hold: fleet.Hold | None = None

    def open(self, first: Replica | None) -> Lease:
        """Fleet lease, then admission, then the replicas; whatever fails gives both back."""
        ctx, backend = self.ctx, self.backend
        try:
            if backend.config.launch is not None:
                # Before admission: the fleet sees every request for the model, those waiting
                # for a slot too, and serves them all before it swaps the model out.
                self.hold, self.timeouts = fleet_lease(ctx, backend, self.timeouts, self.in_flight)
            ctx.gauges[f"queue.{backend.name}"] = backend.admission.queued
            ctx.marks["admission.asked"] = time.monotonic()
            waited = backend.admission.acquire(QueuePlace.of(ctx.principal), self.in_flight)
            ctx.marks["admission.granted"] = time.monotonic()
        except BaseException:
            self._release_hold()
            raise
        first = self.in_flight.replica or first  # shared admission's slot is on a replica
        ctx.timings[f"queue.{backend.name}"] = waited * 1000.0
        ctx.sent = True
        try:
            lease = self._through_restarts(first)
        except BaseException:
            self._release_hold()
            backend.admission.release(self.in_flight)
            raise
        lease.hold = self.hold
        return lease

    def _release_hold(self) -> None:
        if self.hold is not None:
            self.hold.release()
            self.hold = None

    def _through_restarts(self, first: Replica | None) -> Lease:
        """The retries, again after the fleet restarted a launched backend's llama-servers."""
        retry_until = time.monotonic() + self.timeouts.retry_deadline
        while True:
            try:
                return self._with_retries(first)
            except _LaunchedDown as down:
                if self.hold is None or time.monotonic() >= retry_until:
                    raise down.error from None
                # Its llama-server died: wait for the fleet's restart like for any load (out
                # of first_byte), not for the retries' deadline.
                self._release_hold()
                asked = time.monotonic()
                self.hold, self.timeouts = fleet_lease(self.ctx, self.backend, self.timeouts, self.in_flight,
                                                       check=True)
                retry_until += time.monotonic() - asked

    def _with_retries(self, first: Replica | None) -> Lease:
        """Attempts, with backoff and failover, until one answers or ``retry_deadline`` passes."""
        ctx, backend, body = self.ctx, self.backend, self.outgoing.body
        deadline = time.monotonic() + self.timeouts.retry_deadline
        tried: list[Replica] = []
        pinned = isinstance(body, dict) and ctx.route in slots.PINNED_ROUTES
        unpinned = isinstance(body, dict) and ctx.route in slots.UNPINNED_ROUTES
        if isinstance(body, dict) and not (pinned or unpinned):
            body = json.dumps(body).encode()
        for attempt in itertools.count():
            if self.in_flight.stopped is not None:
                raise self.in_flight.stopped
            replica = _pick(backend, first if attempt == 0 else None, tried)
            if replica is None:
                if tried and backend.config.launch is not None:
                    raise _LaunchedDown(error)  # the fleet restarts it: ask the fleet
                raise self._unavailable()
            tried.append(replica)
            answer = self._attempt(replica, body, pinned and replica is first, pinned or unpinned, unpinned)
            if isinstance(answer, Lease):
                return answer
            error = answer
            self.in_flight.release_socket()
            pause = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + pause > deadline:
                ctx.log(logging.WARNING, "giving up on backend %s after %d attempt(s): %s",
                        backend.name, attempt + 1, error.message)
                raise error
            ctx.incr("upstream.retries")
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _attempt(self, replica: Replica, body: bytes | dict[str, Any], hinted: bool, slotted: bool,
                 unpinned: bool) -> Lease | GatewayError:
        """One replica: take its slot, encode, send, read the status. Returns the answer's
        :class:`Lease`, or the error of a failure worth retrying; raises any other."""
        ctx, backend, in_flight = self.ctx, self.backend, self.in_flight
        ctx.replica = replica.url
        now = time.monotonic()
        replica.breaker.attempt(now)
        first_byte = min(self.timeouts.first_byte, max(0.001, ctx.started + self.timeouts.total - now))
        hold = None
        if slotted:
            assert isinstance(body, dict)
            hold = warm.take_slot(ctx, backend, replica, hinted, unpinned)
            if hold.slot is not None and (hold.state != slots.UNKNOWN or hold.held_state != slots.UNKNOWN):
                warm.keep_warm(ctx, backend, replica, hold)
            data = json.dumps({**body, **hold.fields()}).encode()
        else:
            assert isinstance(body, bytes)
            data = body
        with replica.busy() as busy:
            in_flight.socket = None
            try:
                resp = replica.pool.request(self.outgoing.method, self.outgoing.path, data, self.outgoing.headers,
                                            first_byte, on_socket=in_flight.attach)
            except HTTPFailure as exc:
                if hold is not None:
                    hold.release(clean=False)
                if in_flight.stopped is not None:  # we cut the connection: not the replica's fault
                    raise in_flight.stopped from None
                busy.failed(failure_reason(exc), _counts_against(replica, backend, exc))
                error = from_backend(exc, Phase.SENDING, backend=backend.name, timeout=first_byte,
                                     retry_after=self.retry_after)
                if error.status not in RETRIED_STATUSES:  # a first-byte timeout: the backend is busy
                    raise error from exc
                return error
            except BaseException:
                if hold is not None:
                    hold.release(clean=False)
                raise
            if in_flight.stopped is not None or resp.status in RETRIED_STATUSES:
                if hold is not None:
                    hold.release(clean=False)
            if in_flight.stopped is not None:
                in_flight.release_socket()
                resp.close()
                raise in_flight.stopped
            if resp.status in RETRIED_STATUSES:
                error = from_backend(resp, Phase.WAITING, backend=backend.name, retry_after=self.retry_after)
                # The connection goes back to the pool: another request may take it while
                # this one pauses, so a cancel now must not reach its socket.
                in_flight.release_socket()
                resp.close()
                busy.failed(f"HTTP {resp.status}")
                return error
            replica.breaker.success()
            replica.ready = True
            lease = Lease(backend, busy, resp, in_flight)
            lease.slot_hold = hold
            # A stream's headers come at once: the first-byte budget lasts until
            # its first event (streaming.frames), then idle applies.
            lease.set_read_timeout(max(0.001, first_byte - (time.monotonic() - now)))
            busy.handed_over()
            return lease

    def _unavailable(self) -> ServiceUnavailableError:
        now = time.monotonic()
        wait = min((r.breaker.retry_after(now) for r in self.backend.replicas), default=0.0)
        self.ctx.replica = None
        return ServiceUnavailableError(
            f"No replica of backend {self.backend.name} can take requests now; try again shortly.",
            headers={"Retry-After": str(max(1, round(wait)) if wait else self.retry_after)})


def _counts_against(replica: Replica, backend: Backend, exc: HTTPFailure) -> bool:
    """Whether an attempt that raised counts against the replica's breaker; a refused
    connection marks it not ready (the client's error is errors.from_backend's)."""
    if isinstance(exc, ConnectFailed) and not isinstance(exc, ConnectTimedOut):
        replica.ready = False
        # A launched llama-server that refuses has died; the fleet restarts it and says
        # when it is back, so its breaker must not keep it shut after that.
        return backend.config.launch is None
    return True


def _pick(backend: Backend, first: Replica | None, tried: list[Replica]) -> Replica | None:
    """The next replica to try: ``first`` if it may be used, else an untried
    available one, else any available one."""
    now = time.monotonic()
    usable = [r for r in backend.candidates(first) if r.ready is not False or not tried]
    usable = [r for r in usable if r.breaker.allows(now)]
    untried = [r for r in usable if r not in tried]
    return (untried or usable or [None])[0]
