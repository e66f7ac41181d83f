"""The per-request state that plugins read and write."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import logs  # noqa: F401 - importing it bounds every line of the llamagate logger
from .errors import GatewayError

log = logging.getLogger("llamagate")


@dataclass(eq=False)
class Response:
    """A response a ``request`` hook answers with instead of calling a backend.

    Args:
        body: The JSON body for a non-streamed answer.
        events: For a request with ``"stream": true``: the SSE events (dicts) to send,
            followed by ``data: [DONE]``. When None, ``body`` is sent as plain JSON.
        status: HTTP status.
        headers: Extra response headers.
        content: A body that is not JSON (Prometheus' text format, say), sent as it
            is with ``content_type``; it wins over ``body`` and ``events``.
        content_type: The media type of ``content``.
    """

    body: dict[str, Any] | None = None
    events: list[dict[str, Any]] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"


class ReplicaView:
    """A read-only look at one replica of a backend, for ``route`` hooks. Its figures are
    live: they read the replica as it is now.

    Attributes:
        url: The replica's base URL (credentials removed).
        ready: True after a good health check, False after a failed one, None before the first.
        available: Worth sending to: not known to be down, and its circuit breaker lets requests through.
        in_flight: Requests this worker has open on it.
        slots: llama-server's slot count (from ``/props``), once known.
        breaker: ``closed``, ``open`` or ``half_open``.

    ``fetch(path)`` and ``request(method, path, ...)`` call the replica off the request
    path's pool, with the gateway's credentials for it.
    """

    __slots__ = ("_replica", "url")

    def __init__(self, replica: Any, url: str) -> None:
        self._replica = replica
        self.url = url

    ready = property(lambda self: self._replica.ready)
    available = property(lambda self: self._replica.available)
    in_flight = property(lambda self: self._replica.in_flight)
    slots = property(lambda self: self._replica.slots)
    breaker = property(lambda self: self._replica.breaker.state)

    def fetch(self, path: str, timeout: float = 2.0) -> Any:
        """``GET path`` on the replica (its ``/metrics``, ``/slots``...), ``timeout`` seconds
        to read; see :meth:`request`."""
        return self.request("GET", path, timeout=(self._replica.connect_timeout, timeout))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """``method path`` on the replica with the gateway's credentials for it, off the
        request path's pool; ``kwargs`` as requests takes them, ``timeout`` by default the
        backend's ``connect_timeout`` to connect and 30 s to read.

        Returns:
            The ``requests.Response``. Raises ``requests.RequestException`` as requests does.
        """
        replica = self._replica
        kwargs.setdefault("timeout", (replica.connect_timeout, 30))
        return replica.session.request(method, replica.url + path, **kwargs)

    def __repr__(self) -> str:
        return f"ReplicaView({self.url!r})"


class BackendView:
    """A read-only look at one backend, for ``route`` hooks.

    Attributes:
        name: The backend's name in ``pipelines.yaml``.
        replicas: Its replicas (:class:`ReplicaView`), in configured order.
        in_flight: Requests this worker has admitted to it, now.
        queued: Requests of this worker waiting for a slot, now.
        limit: The most requests this worker admits at once.

    ``kv_scope(principal)`` says whose cached prompts a caller may reuse on it.
    """

    __slots__ = ("_backend", "name", "replicas")

    in_flight = property(lambda self: self._backend.admission.in_flight)
    queued = property(lambda self: self._backend.admission.queued)
    limit = property(lambda self: self._backend.limit)

    def kv_scope(self, principal: Principal | None) -> str:
        """Whose cached prompts a request of ``principal`` may reuse on this backend, from
        its ``kv_sharing``: ``client:<id>``, ``group:<name>``, ``global`` or ``anonymous``
        (no principal). The core keeps slots apart by it; a router keys conversations by it."""
        return self._backend.kv_scope(principal)

    def __init__(self, backend: Any, replicas: tuple[ReplicaView, ...]) -> None:
        self._backend = backend
        self.name = backend.name
        self.replicas = replicas

    def candidates(self) -> list[ReplicaView]:
        """The available replicas in the gateway's own round-robin order for this
        request (it takes a turn): a plugin that ranks replicas breaks ties by taking
        the first, and so shares the gateway's one rotation."""
        return [r.view for r in self._backend.candidates() if r.available]

    def __repr__(self) -> str:
        return f"BackendView({self.name!r})"


MAX_PRIORITY = 100  # a key's highest queue priority


@dataclass(frozen=True)
class Principal:
    """Who is calling, as an auth plugin established it.

    Attributes:
        client_id: Stable id of the client (never the key itself).
        role: ``user`` or ``admin``.
        models: Public model ids the client may use; empty means every model.
        limits: Per-client limit overrides, e.g. ``{"requests_per_minute": 10}``.
        key_id: The public id of the key used (the first hex digits of its hash), for
            ledgers and logs; None when the auth plugin has none.
        priority: 0 to 100; a higher priority goes first in a backend's admission
            queue (after admins; :mod:`gateway.backends.turns`).
    """

    client_id: str
    role: str = "user"
    models: frozenset[str] = frozenset()
    limits: Mapping[str, Any] = field(default_factory=dict)
    key_id: str | None = None
    priority: int = 0


@dataclass(eq=False)
class RequestContext:
    """Everything the gateway tells a request's plugins about it.

    Plugins may read every field. They may set ``principal``, ``model`` (before
    routing), ``cache``, ``routing`` and ``slot_hint`` (from ``route``); add to
    ``response_headers``, and to ``counters`` (:meth:`incr`), ``timings`` and ``gauges``;
    and keep their own state under ``state[<plugin name>]``. The core fills in the rest:
    plugins read those, and do not set them. What the core keeps of a request for itself
    (the replica object, the backend's answer, the HTTP request) is not here but on its
    exchange (:class:`gateway.web.exchange.Exchange`).

    Attributes:
        request_id: The client's valid ``x-request-id``, or one made for it.
        method: HTTP method.
        route: The route template, e.g. ``/v1/chat/completions``.
        pipeline: Name of the pipeline that serves the route.
        headers: Request headers, names upper-cased as Falcon gives them.
        query: The query string's parameters.
        remote_addr: The client's address.
        body: The decoded JSON body (POST routes), else None.
        model: Public model id, after alias resolution; None when the body names
            no model or one the gateway doesn't serve.
        requested_model: The model string exactly as the client sent it.
        stream: True when the client asked for a streamed answer.
        client_wants_usage: True when a streaming client asked for the final usage
            chunk (``stream_options.include_usage``). The gateway always asks the
            backend for it, records it in ``usage``, and drops it otherwise.
        principal: Who is calling (a :class:`Principal`); set by an auth plugin,
            None until then.
        backend: Name of the backend serving the request, once routed.
        replica: Base URL of the backend replica, once routed (after a failover, the
            replica that took over).
        replica_view: The replica routed to (a :class:`ReplicaView`), once routed: the one
            :meth:`call_backend` calls.
        routing: How the replica was chosen, as the ``route`` plugin that chose it says
            (the router: ``affinity``, ``spill``, ``load``, ``turn``); None when no
            plugin chose (the gateway's round robin).
        slot_hint: The llama-server slot a ``route`` hook would like the request to run
            in on the replica it chose (the router's prefix affinity: the slot holding
            the conversation). The core takes it if it is one of the replica's slots and
            decides on its own whether the slot's cache may be reused
            (:mod:`gateway.backends.slots`: only when the request's own tenant used it last); a
            failover to another replica ignores it.
        status: HTTP status sent to the client, once known.
        error: The error that ended the request, if one did.
        usage: The ``usage`` object of the answer, when the backend sent one.
        finish_reasons: Why the answer's choices ended (``stop``, ``length``,
            ``tool_calls``...), as the backend said, in the order it said it: read from a
            chat or completion stream's events as they pass (undecoded ones too), relayed or
            assembled into one answer.
        cache: Cache outcome for logs and headers (``HIT``/``MISS``), set by a plugin.
        response_headers: Headers to add to the client's response.
        upstream_headers: Headers to add to the request to the backend (a trace's
            ``traceparent``), set by the ``upstream_request`` hooks at the latest; the
            core's own (``Content-Type``, ``X-Request-Id``) win over a plugin's.
        started: ``time.monotonic()`` when the request arrived.
        first_byte_at: ``time.monotonic()`` when the first body byte went out.
        upstream_ms: Milliseconds the backend took to start answering (headers).
        marks: Moments of the request's life (``time.monotonic()``) as the core passes
            them, for plugins that draw it on a timeline (traces); a step the request did
            not take has no mark. ``fleet.asked``/``fleet.granted``: a launched backend's
            lease from the fleet (the timing ``fleet.load.<backend>`` says how much of it
            was a model load); ``admission.asked``/``admission.granted``: the wait for a
            backend slot; ``upstream.headers``: the backend's answer's headers read (after
            retries); ``upstream.first_event``: its stream's first event.
        sent: Set when the request left the admission queue for a backend: from then
            on the backend may be working on it.
        bytes_in: Request body size.
        bytes_out: Response body bytes sent so far.
        state: Scratch space, one key per plugin.
        counters: Named events to count (``ctx.incr("ratelimit.store_down")``);
            a metrics plugin sends them when the request completes.
        timings: Named durations in milliseconds (``queue.<backend>``), sent likewise.
        gauges: Named levels (``queue.<backend>``: queue depth on arrival), sent likewise.
        cancelled: Set when the request was cancelled (``POST /v1/requests/{id}/cancel``).
        client_gone: Set when the client hung up while its plain (non-streamed)
            answer was still being generated; the generation was stopped.
    """

    request_id: str
    method: str
    route: str
    pipeline: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, Any] = field(default_factory=dict)
    remote_addr: str = ""
    body: dict[str, Any] | None = None
    model: str | None = None
    requested_model: str | None = None
    stream: bool = False
    client_wants_usage: bool = False
    principal: Principal | None = None
    backend: str | None = None
    replica: str | None = None
    routing: str | None = None
    slot_hint: int | None = None
    status: int | None = None
    error: GatewayError | None = None
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    cache: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    upstream_headers: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    upstream_ms: float | None = None
    marks: dict[str, float] = field(default_factory=dict)
    sent: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    client_gone: bool = False
    replica_view: ReplicaView | None = field(default=None, repr=False)

    def call_backend(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the replica routed to (``ctx.replica_view``, known from the ``upstream_request``
        hook on) with the gateway's credentials for it (:meth:`ReplicaView.request`), e.g.
        ``ctx.call_backend("POST", "/tokenize", json={"content": text})``.

        Returns:
            The ``requests.Response``. Raises ``requests.RequestException`` as requests does.
        """
        if self.replica_view is None:
            raise RuntimeError("no replica chosen yet: call_backend works from upstream_request on")
        return self.replica_view.request(method, path, **kwargs)

    def incr(self, name: str, count: int = 1) -> None:
        """Count an event for the metrics plugin (Graphite-safe name, dots as separators)."""
        self.counters[name] = self.counters.get(name, 0) + count

    @property
    def latency_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return (time.monotonic() - self.started) * 1000.0

    @property
    def ttfb_ms(self) -> float | None:
        """Milliseconds from arrival to the first body byte, once sent."""
        if self.first_byte_at is None:
            return None
        return (self.first_byte_at - self.started) * 1000.0

    def log(self, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        """Log a line that carries this request's id."""
        log.log(level, "[%s] " + message, self.request_id, *args, **kwargs)
