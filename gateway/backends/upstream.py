"""Backends: replicas with pooled connections, circuit breakers, health; leases of answers.

Each replica has its own keep-alive pool (:mod:`gateway.backends.httpclient`) that keeps up to
``max_connections`` connections, so a busy worker does not reconnect per request.

The send itself, in layers (fleet lease, admission, retries, one attempt), is
:mod:`gateway.backends.send`'s; it counts an attempt in its replica's ``in_flight`` through
:class:`Busy`, the one place that count moves, and leaves the answer in a :class:`Lease`.

A background loop polls each replica's ``/health`` and learns its slots from ``/props``.
"""

from __future__ import annotations

import itertools
import math
import socket
import threading
import time
from typing import Any, Iterable, Mapping

import requests

from .. import settings
from . import kvstates, slots
from ..config import BackendConfig
from ..context import BackendView, ReplicaView, RequestContext
from .httpclient import Pool, Response
from ..redact import redact_url  # a URL's userinfo is a credential: never shown
from .admission import Admission, admission_for
from ..storage.shared import Shared
from ..errors import GatewayError, stopped
from ..fleet import client as fleet

DEFAULT_SLOTS = 4  # a replica's slots until /props has told us


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

    def busy(self) -> Busy:
        """Count an attempt on the replica as in flight until it ends (:class:`Busy`)."""
        return Busy(self)

    def status(self) -> dict[str, Any]:
        return {"url": self.view.url, "ready": bool(self.ready), "in_flight": self.in_flight, "slots": self.slots,
                "breaker": self.breaker.state, "detail": self.detail}

    def __repr__(self) -> str:
        return f"Replica({self.url!r}, ready={self.ready})"


class Busy:
    """One attempt's count in its replica's ``in_flight``, from the moment it is sent
    until it ends: the one place that count moves. A context manager: on leaving it the
    attempt is over, whatever ended it (the replica failed it: :meth:`failed`; cancelled;
    interrupted), unless the replica answered and the count was :meth:`handed_over` to the
    :class:`Lease`, which ends it when it closes.
    """

    __slots__ = ("replica", "_leased")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._leased = False
        replica.in_flight += 1

    def __enter__(self) -> Busy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._leased:
            self.end()

    def failed(self, reason: str, counted: bool = True) -> None:
        """The replica failed the attempt: its breaker learns of it (unless not ``counted``:
        that only ends a probe)."""
        self.replica.breaker.failure(time.monotonic(), counted)
        self.replica.detail = reason

    def handed_over(self) -> None:
        """The replica answered: the count is the :class:`Lease`'s now."""
        self._leased = True

    def end(self) -> None:
        self.replica.in_flight -= 1


class Backend:
    """A named group of replicas that serve the same models.

    Args:
        config: Its config.
        shared: The Redis link, for ``admission: redis``.
        admission: The admission of the backend this one replaces on a reload: the
            requests it admitted still count against the limit (:func:`gateway.backends.admission.admission_for`).
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
        """Whose cached prompts a request of ``principal`` may reuse here (:func:`gateway.backends.slots.kv_scope`)."""
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
        busy: The attempt's count in the replica's ``in_flight`` (:class:`Busy`).
        response: Its answer, status and headers read, body not yet
            (:class:`gateway.backends.httpclient.Response`).
        in_flight: The request's :class:`InFlight` entry.
    """

    def __init__(self, backend: Backend, busy: Busy, response: Response, in_flight: InFlight) -> None:
        self.backend = backend
        self.replica = busy.replica
        self.busy = busy
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
            clean = self.response.ended and 200 <= self.response.status < 300
            if clean and self.slot_hold.restored:
                kvstates.check_restored_turn(self.in_flight.ctx, self.slot_hold.restored)
            self.slot_hold.release(clean=clean)
        self.response.close()
        self.busy.end()
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
        # a route hook's choice back to its replica: by the view's identity, so only this gateway's own
        self._replica_by_view = {replica.view: replica for replica in self.replicas()}
        self.health_interval = health_interval
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None

    def replicas(self) -> Iterable[Replica]:
        for backend in self.backends.values():
            yield from backend.replicas

    def replica_of(self, view: object) -> Replica | None:
        """The replica of one of these backends that ``view`` (a route hook's choice) shows, else None."""
        return self._replica_by_view.get(view) if isinstance(view, ReplicaView) else None

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
