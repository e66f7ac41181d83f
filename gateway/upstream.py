"""Backends: pooled connections, admission, retries, circuit breakers, health.

Each replica has its own keep-alive pool (:mod:`gateway.httpclient`) that keeps up to
``max_connections`` connections, so a busy worker does not reconnect per request.

A request to a backend (:meth:`Upstreams.open`):

0. to a launched backend, leases its model from the fleet first (:mod:`gateway.fleet`),
   waiting while it loads;
1. waits for admission: at most ``max_in_flight`` requests per backend per worker
   (default: this worker's share of the replicas' llama-server slots, so that all
   workers together fill the slots), the rest in a bounded queue, admins
   first, then keys by priority, then clients in turn, first come first served within
   a client (:mod:`gateway.turns`); a full queue, a client holding its share of it, or a
   wait past ``queue_timeout`` is a 503 with ``Retry-After``. With ``admission:
   redis`` the slots and the queue are the whole gateway's (:mod:`gateway.admission`);
2. goes to a replica whose circuit breaker is closed (or that is due a probe):
   the ``route`` hooks' choice first, then ready replicas round robin;
3. is retried, before any byte reached the client, when the connection is refused
   or reset or the replica answers 502/503 (llama-server answers 503 while it
   loads), with exponential backoff and jitter, on another replica when there is
   one, until the route's ``retry_deadline``; when every replica of a launched
   backend refused, the request waits for the fleet to restart them (that wait, like
   a load, comes out of ``first_byte``);
4. on routes whose prompts llama-server caches, takes a slot of the replica for each
   attempt and says in the payload which (``id_slot``) and whether it may reuse the
   slot's cache (``cache_prompt``): only a slot its own tenant used last
   (:mod:`gateway.slots`).

A background loop polls each replica's ``/health`` and learns its slots from ``/props``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Iterable, Mapping

import requests

from . import settings, slots
from .config import BackendConfig, Timeouts
from .context import BackendView, ReplicaView, RequestContext
from .httpclient import ConnectFailed, ConnectTimedOut, HTTPFailure, Pool, Response
from .redact import redact_url  # a URL's userinfo is a credential: never shown
from .admission import Admission, admission_for
from .shared import Shared
from .turns import QueuePlace
from .errors import (
    GatewayError,
    LlamagateError,
    Phase,
    ServiceUnavailableError,
    failure_reason,
    from_backend,
    stopped,
)
from .fleet import client as fleet

log = logging.getLogger("llamagate")

DEFAULT_SLOTS = 4  # a replica's slots until /props has told us
RETRIED_STATUSES = (502, 503)
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


class _LaunchedDown(LlamagateError):
    """Every replica of a launched backend refused the request: its llama-servers died,
    and the fleet is restarting them. ``error`` is the last attempt's."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class InFlight:
    """One request's hold on the backend, for cancellation: the socket of the attempt
    in progress (known from the moment it connects, long before llama-server sends
    headers) and the admission wait, if it is queued.

    Args:
        ctx: The request.
    """

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.socket: socket.socket | None = None
        self.wake: Any = None  # set while queued: wakes the waiting request
        self.replica: Replica | None = None  # the replica shared admission gave a slot on

    def attach(self, sock: socket.socket) -> None:
        """The connection the request is being sent on (called by the connection)."""
        self.socket = sock
        if self.stopped is not None:
            _shut(sock)

    def cancel(self) -> None:
        """Stop the request for whoever cancelled it (the client gets an error)."""
        self.ctx.cancelled = True
        self.interrupt()

    def interrupt(self) -> None:
        """Stop the request now: leave the queue, or cut the backend connection, so
        llama-server stops generating and the request's reader wakes with an error."""
        if self.wake is not None:
            self.wake()
        if self.socket is not None:
            _shut(self.socket)

    def release_socket(self) -> None:
        """The connection is (about to be) given back to the pool, where another request
        may take it: from now on a cancel must not touch it."""
        self.socket = None

    @property
    def stopped(self) -> GatewayError | None:
        """The error that ends a cancelled or abandoned request, else None."""
        return stopped(self.ctx.cancelled, self.ctx.client_gone)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Breaker:
    """A replica's circuit breaker: closed, open (skipped for ``cooldown``), half_open
    (one probe request in flight decides)."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def allows(self, now: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            return now - self.opened_at >= self.cooldown
        return not self.probing

    def attempt(self, now: float) -> None:
        """A request is about to go out: an open breaker past its cool-down lets it probe."""
        if self.state != "closed" and self.allows(now):
            self.state, self.probing = "half_open", True

    def success(self) -> None:
        self.state, self.failures, self.probing = "closed", 0, False

    def failure(self, now: float, counted: bool = True) -> None:
        """An attempt failed; one not ``counted`` only ends a probe (another may go)."""
        self.probing = False
        if not counted:
            return
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.state, self.opened_at = "open", now

    def retry_after(self, now: float) -> float:
        return max(0.0, self.opened_at + self.cooldown - now) if self.state == "open" else 0.0


class Replica:
    """One llama-server base URL of a backend.

    Attributes:
        url: Base URL, e.g. ``http://127.0.0.1:8081``.
        backend: Name of the backend it belongs to.
        ready: True after a good health check, False after a failed one or a
            refused connection, None before the first check.
        in_flight: Requests this worker has open on it now.
        slots: llama-server's ``total_slots``, once read from ``/props``.
        breaker: Its :class:`Breaker`.
        detail: The last health check's result, for ``/health``.
    """

    def __init__(self, url: str, config: BackendConfig) -> None:
        self.url = url
        self.backend = config.name
        self.connect_timeout = config.connect_timeout
        credentials = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.pool = Pool(url, config.max_connections, config.connect_timeout, credentials)  # the request path's
        # health checks and plugins' ctx.call_backend: requests, off the request path's pool
        self.session = requests.Session()
        self.session.trust_env = False  # proxies are not for loopback backends; scanning costs
        self.session.headers.update(credentials)
        self.ready: bool | None = None
        self.in_flight = 0
        self.slots: int | None = config.launch.parallel if config.launch is not None else None
        self.breaker = Breaker(config.breaker_failures, config.breaker_cooldown)
        self.detail = "not checked yet"
        self.view = ReplicaView(self, redact_url(url))

    @property
    def available(self) -> bool:
        """Worth sending to: not known to be down, and its breaker lets requests through."""
        return self.ready is not False and self.breaker.allows(time.monotonic())

    def check(self) -> None:
        """Ask the replica's ``/health`` whether it can take requests (and ``/props`` its slots)."""
        try:
            resp = self.session.get(self.url + "/health", timeout=(self.connect_timeout, 5))
            self.ready = resp.status_code == 200
            self.detail = "ok" if self.ready else f"HTTP {resp.status_code}"
            if self.ready and self.slots is None:
                props = self.session.get(self.url + "/props", timeout=(self.connect_timeout, 5))
                if props.ok:
                    self.slots = int(props.json().get("total_slots") or 0) or None
        except (requests.RequestException, ValueError) as exc:
            self.ready = False
            self.detail = f"unreachable: {type(exc).__name__}"

    def status(self) -> dict[str, Any]:
        return {"url": self.view.url, "ready": bool(self.ready), "in_flight": self.in_flight, "slots": self.slots,
                "breaker": self.breaker.state, "detail": self.detail}

    def __repr__(self) -> str:
        return f"Replica({self.url!r}, ready={self.ready})"


class Backend:
    """A named group of replicas that serve the same models.

    Args:
        config: Its config.
        shared: The Redis link, for ``admission: redis``.
        admission: The admission of the backend this one replaces on a reload: the
            requests it admitted still count against the limit (:func:`gateway.admission.admission_for`).
    """

    def __init__(self, config: BackendConfig, shared: Shared | None = None, admission: Admission | None = None) -> None:
        self.name = config.name
        self.config = config
        self.replicas = [Replica(url, config) for url in config.urls]
        self.admission = admission_for(self, config.max_queue, config.queue_timeout,
                                       shared if config.admission == "redis" else None, admission)
        self._turn = itertools.count()
        self.kv_groups = dict(config.kv_groups)
        self.fleet_state: str | None = None  # a launched backend's state, from the health loop
        self.fleet_waiting = 0  # this worker's requests waiting for the fleet to grant the model
        self.view = BackendView(self, tuple(r.view for r in self.replicas))

    @property
    def ready(self) -> bool:
        if self.config.launch is not None:  # the fleet starts it on demand unless it failed
            return self.fleet_state != "failed"
        return any(r.ready for r in self.replicas)

    @property
    def limit(self) -> int:
        """Requests this worker sends the backend at once on its own: ``max_in_flight``,
        else its share of the replicas' slots (each gunicorn worker admits on its own);
        with ``admission: redis``, its share of :attr:`shared_limit` (while Redis is down)."""
        if self.config.max_in_flight is not None and self.config.admission == "local":
            return self.config.max_in_flight
        return max(1, math.ceil(self.shared_limit / settings.current().workers))

    @property
    def shared_limit(self) -> int:
        """Requests the whole gateway sends the backend at once with shared admission."""
        return sum(self.replica_slots())

    def replica_slots(self) -> list[int]:
        """Each replica's share of the gateway-wide limit: its slots, or ``max_in_flight``
        shared out between the replicas."""
        if self.config.max_in_flight is None:
            return [r.slots or DEFAULT_SLOTS for r in self.replicas]
        share, extra = divmod(self.config.max_in_flight, len(self.replicas))
        return [share + (i < extra) for i in range(len(self.replicas))]

    def kv_scope(self, principal: Any) -> str:
        """Whose cached prompts a request of ``principal`` may reuse here (:func:`gateway.slots.kv_scope`)."""
        return slots.kv_scope(self.config.kv_sharing, self.kv_groups, principal)

    def candidates(self, first: Replica | None = None) -> list[Replica]:
        """Replicas in the order to try them: ``first``, then the ones not known to be
        down (ready, or not checked yet) in turn, then those whose last check failed
        (which may have come back since)."""
        # Only a fresh choice takes a turn: ordering around a given first replica (for
        # failover) must not skew the rotation for the next request.
        start = next(self._turn) % len(self.replicas) if first is None else 0
        rotated = self.replicas[start:] + self.replicas[:start]
        ordered = sorted(rotated, key=lambda r: r.ready is False)
        if first is not None:
            ordered = [first] + [r for r in ordered if r is not first]
        return ordered

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "fleet_state": self.fleet_state, "admission": self.config.admission,
                "limit": self.shared_limit if self.admission.shared is not None else self.limit, "in_flight": self.admission.in_flight,
                "queued": self.admission.queued, "replicas": [r.status() for r in self.replicas]}


class Lease:
    """An open upstream response and everything it holds; :meth:`close` gives it all back.

    Attributes:
        replica: The replica that answered.
        response: Its answer, status and headers read, body not yet
            (:class:`gateway.httpclient.Response`).
        in_flight: The request's :class:`InFlight` entry.
    """

    def __init__(self, backend: Backend, replica: Replica, response: Response, in_flight: InFlight) -> None:
        self.backend = backend
        self.replica = replica
        self.response = response
        self.in_flight = in_flight
        self.socket = in_flight.socket
        self.hold: fleet.Hold | None = None  # a launched backend's lease
        self.slot_hold: slots.SlotHold | None = None  # the replica's slot(s) the request runs in
        self._closed = False

    def set_read_timeout(self, seconds: float) -> None:
        """From now on, a read that waits longer than ``seconds`` fails."""
        if self.socket is not None:
            self.socket.settimeout(seconds)

    def release_socket(self) -> None:
        """The answer was read to its end and its connection returned to the pool: it is
        no longer this request's to cut or time out."""
        self.socket = None
        self.in_flight.release_socket()

    def abort(self) -> None:
        """Cut the connection now: llama-server stops generating, and a reader
        blocked on it wakes up with an error."""
        if self.socket is not None:
            _shut(self.socket)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.slot_hold is not None:
            # read to its end with success: the slot holds this prompt; else nobody knows
            self.slot_hold.release(clean=self.response.ended and 200 <= self.response.status < 300)
        self.response.close()
        self.replica.in_flight -= 1
        self.backend.admission.release(self.in_flight)
        if self.hold is not None:
            self.hold.release()


class Upstreams:
    """Every backend of a config, with their background health checks."""

    def __init__(self, configs: Mapping[str, BackendConfig], health_interval: float,
                 previous: Mapping[str, Backend] | None = None, shared: Shared | None = None) -> None:
        old = previous or {}
        # A reload keeps each unchanged backend whole (replicas, pools, breakers,
        # admission) and the admission of a changed one: never two limits at once.
        self.backends = {name: old[name] if name in old and old[name].config == cfg
                         and old[name].admission.shared is (shared if cfg.admission == "redis" else None)
                         else Backend(cfg, shared, old[name].admission if name in old else None)
                         for name, cfg in configs.items()}
        self.views = {name: backend.view for name, backend in self.backends.items()}  # for route hooks
        self.health_interval = health_interval
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None

    def replicas(self) -> Iterable[Replica]:
        for backend in self.backends.values():
            yield from backend.replicas

    def check_all(self) -> None:
        for replica in self.replicas():
            replica.check()
        launched = [b for b in self.backends.values() if b.config.launch is not None]
        if launched:
            try:
                states = fleet.call("status", timeout=5)["models"]
            except (GatewayError, OSError, ValueError, KeyError):
                states = {}
            for backend in launched:
                backend.fleet_state = states.get(backend.name, {}).get("state")

    def start_health_checks(self) -> None:
        """Poll every replica now and then every ``health_interval`` seconds.

        Under gunicorn's gevent worker ``threading`` is patched, so this is a greenlet.
        """
        if self._checker is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self.check_all()
                self._stop.wait(self.health_interval)

        self._checker = threading.Thread(target=loop, name="llamagate-health", daemon=True)
        self._checker.start()

    def stop(self) -> None:
        self._stop.set()

    def retry_after(self) -> str:
        return str(max(1, round(self.health_interval)))

    def open(self, ctx: RequestContext, backend: Backend, first: Replica | None, path: str,
             body: bytes | dict[str, Any],
             headers: Mapping[str, str], timeouts: Timeouts, in_flight: InFlight, method: str = "POST") -> Lease:
        """Lease a launched backend's model from the fleet (waiting while it loads), admit
        the request, then send it until a replica answers; see the module doc.
        ``body`` is bytes, or a JSON payload, encoded per attempt with its slot's fields.

        Sets ``ctx.replica``; counts each retry as ``upstream.retries``, the queue
        depth on arrival as the gauge ``queue.<backend>`` and the wait as the timer
        of the same name.

        Raises:
            ServiceUnavailableError: queue full or timed out, or no replica reachable.
            GatewayTimeoutError: the replica did not start answering in time.
            GatewayError: the last replica's 502/503 once the retry deadline passed.
        """
        hold = None
        try:
            if backend.config.launch is not None:
                # Before admission: the fleet sees every request for the model, those waiting
                # for a slot too, and serves them all before it swaps the model out.
                hold, timeouts = self._hold(ctx, backend, timeouts, in_flight)
            ctx.gauges[f"queue.{backend.name}"] = backend.admission.queued
            waited = backend.admission.acquire(QueuePlace.of(ctx.principal), in_flight)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        first = in_flight.replica or first  # shared admission's slot is on a replica
        ctx.timings[f"queue.{backend.name}"] = waited * 1000.0
        ctx.sent = True
        retry_until = time.monotonic() + timeouts.retry_deadline
        try:
            while True:
                try:
                    lease = self._send(ctx, backend, first, path, body, headers, timeouts, in_flight, method)
                    break
                except _LaunchedDown as down:
                    if hold is None or time.monotonic() >= retry_until:
                        raise down.error from None
                    # Its llama-server died: wait for the fleet's restart like for any load (out
                    # of first_byte), not for the retries' deadline.
                    hold.release()
                    hold = None
                    asked = time.monotonic()
                    hold, timeouts = self._hold(ctx, backend, timeouts, in_flight, check=True)
                    retry_until += time.monotonic() - asked
            lease.hold = hold
            return lease
        except BaseException:
            if hold is not None:
                hold.release()
            backend.admission.release(in_flight)
            raise

    @staticmethod
    def _hold(ctx: RequestContext, backend: Backend, timeouts: Timeouts, in_flight: InFlight,
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
        try:
            hold = fleet.acquire(backend.name, budget, set_wake, lambda: in_flight.stopped, check)
        finally:
            backend.fleet_waiting -= 1
        waited = time.monotonic() - start
        if hold.report.get("load_seconds") is not None:
            ctx.timings[f"fleet.load.{backend.name}"] = hold.report["load_seconds"] * 1000.0
            if hold.report.get("swap"):
                ctx.incr("fleet.swaps")
            if hold.report.get("restart"):
                ctx.incr("fleet.restarts")
        return hold, replace(timeouts, first_byte=max(0.001, timeouts.first_byte - waited))

    def _send(self, ctx: RequestContext, backend: Backend, first: Replica | None, path: str,
              body: bytes | dict[str, Any], headers: Mapping[str, str], timeouts: Timeouts, in_flight: InFlight,
              method: str) -> Lease:
        deadline = time.monotonic() + timeouts.retry_deadline
        tried: list[Replica] = []
        pinned = isinstance(body, dict) and ctx.route in slots.PINNED_ROUTES
        unpinned = isinstance(body, dict) and ctx.route in slots.UNPINNED_ROUTES
        if isinstance(body, dict) and not (pinned or unpinned):
            body = json.dumps(body).encode()
        for attempt in itertools.count():
            if in_flight.stopped is not None:
                raise in_flight.stopped
            replica = self._pick(backend, first if attempt == 0 else None, tried)
            if replica is None:
                if tried and backend.config.launch is not None:
                    raise _LaunchedDown(error)  # the fleet restarts it: ask the fleet
                raise self._unavailable(ctx, backend)
            tried.append(replica)
            ctx.replica = replica.url
            now = time.monotonic()
            replica.breaker.attempt(now)
            first_byte = min(timeouts.first_byte, max(0.001, ctx.started + timeouts.total - now))
            hold = None
            if pinned or unpinned:
                hold = self._take_slot(ctx, backend, replica, pinned and replica is first, unpinned)
                data = json.dumps({**body, **hold.fields()}).encode()
            else:
                data = body
            replica.in_flight += 1
            in_flight.socket = None
            try:
                resp = replica.pool.request(method, path, data, headers, first_byte, on_socket=in_flight.attach)
            except HTTPFailure as exc:
                if hold is not None:
                    hold.release(clean=False)
                if in_flight.stopped is not None:  # we cut the connection: not the replica's fault
                    replica.in_flight -= 1
                    raise in_flight.stopped from None
                self._attempt_failed(replica, backend, exc)
                error = from_backend(exc, Phase.SENDING, backend=backend.name, timeout=first_byte,
                                     retry_after=self.retry_after())
                if error.status not in RETRIED_STATUSES:  # a first-byte timeout: the backend is busy
                    raise error from exc
            except BaseException:
                replica.in_flight -= 1
                if hold is not None:
                    hold.release(clean=False)
                raise
            else:
                if in_flight.stopped is not None or resp.status in RETRIED_STATUSES:
                    if hold is not None:
                        hold.release(clean=False)
                if in_flight.stopped is not None:
                    replica.in_flight -= 1
                    in_flight.release_socket()
                    resp.close()
                    raise in_flight.stopped
                if resp.status not in RETRIED_STATUSES:
                    replica.breaker.success()
                    replica.ready = True
                    lease = Lease(backend, replica, resp, in_flight)
                    lease.slot_hold = hold
                    # A stream's headers come at once: the first-byte budget lasts until
                    # its first event (streaming.frames), then idle applies.
                    lease.set_read_timeout(max(0.001, first_byte - (time.monotonic() - now)))
                    return lease
                error = from_backend(resp, Phase.WAITING, backend=backend.name, retry_after=self.retry_after())
                # The connection goes back to the pool: another request may take it while
                # this one pauses, so a cancel now must not reach its socket.
                in_flight.release_socket()
                resp.close()
                self._failed(replica, f"HTTP {resp.status}")
            in_flight.release_socket()
            pause = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + pause > deadline:
                ctx.log(logging.WARNING, "giving up on backend %s after %d attempt(s): %s",
                        backend.name, attempt + 1, error.message)
                raise error
            ctx.incr("upstream.retries")
            time.sleep(pause)
        raise AssertionError("unreachable")

    @staticmethod
    def _take_slot(ctx: RequestContext, backend: Backend, replica: Replica, hinted: bool,
                   unpinned: bool) -> slots.SlotHold:
        """The attempt's hold on the replica's slots: all of them for a route llama-server
        places itself; else one, the route hook's ``ctx.slot_hint`` when it chose this
        replica, else a client's own ``id_slot`` (when validate lets it through)."""
        table = slots.table()
        if unpinned:
            return table.take_all(replica.url, replica.slots)
        preferred = ctx.slot_hint if hinted else None
        asked = ctx.body.get("id_slot") if isinstance(ctx.body, dict) else None
        if preferred is None and isinstance(asked, int) and not isinstance(asked, bool):
            preferred = asked
        hold = table.take(replica.url, replica.slots, backend.kv_scope(ctx.principal), preferred)
        if hold.reuse and isinstance(ctx.body, dict) and ctx.body.get("cache_prompt") is False:
            hold.reuse = False  # the client's own wish not to reuse its cache
        return hold

    def _attempt_failed(self, replica: Replica, backend: Backend, exc: HTTPFailure) -> None:
        """The replica's share of an attempt that raised (the client's error is errors.from_backend's)."""
        counted = True
        if isinstance(exc, ConnectFailed) and not isinstance(exc, ConnectTimedOut):
            replica.ready = False
            # A launched llama-server that refuses has died; the fleet restarts it and says
            # when it is back, so its breaker must not keep it shut after that.
            counted = backend.config.launch is None
        self._failed(replica, failure_reason(exc), counted)

    @staticmethod
    def _pick(backend: Backend, first: Replica | None, tried: list[Replica]) -> Replica | None:
        """The next replica to try: ``first`` if it may be used, else an untried
        available one, else any available one."""
        now = time.monotonic()
        usable = [r for r in backend.candidates(first) if r.ready is not False or not tried]
        usable = [r for r in usable if r.breaker.allows(now)]
        untried = [r for r in usable if r not in tried]
        return (untried or usable or [None])[0]

    @staticmethod
    def _failed(replica: Replica, reason: str, counted: bool = True) -> None:
        replica.in_flight -= 1
        replica.breaker.failure(time.monotonic(), counted)
        replica.detail = reason

    def _unavailable(self, ctx: RequestContext, backend: Backend) -> ServiceUnavailableError:
        now = time.monotonic()
        wait = min((r.breaker.retry_after(now) for r in backend.replicas), default=0.0)
        ctx.replica = None
        return ServiceUnavailableError(
            f"No replica of backend {backend.name} can take requests now; try again shortly.",
            headers={"Retry-After": str(max(1, round(wait)) if wait else self.retry_after())})


def wait_until_ready(urls: Iterable[str], timeout: float) -> bool:
    """Poll each URL's ``/health`` until all answer 200 or ``timeout`` passes."""
    pending = list(urls)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            if requests.get(pending[0] + "/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return not pending
