"""One request as the core keeps it: an :class:`Exchange`, one method a step of its life.

What the core keeps of a request for itself (the gateway it began on, Falcon's request and
response, its pipeline, the replica chosen, the backend's answer while it is held, the
route's timeouts) lives here, beside the :class:`RequestContext` its plugins see. The steps,
in the order a model request takes them: begin (the constructor), :meth:`~Exchange.request_start`,
:meth:`~Exchange.read`, :meth:`~Exchange.resolve`, :meth:`~Exchange.ask` (the ``request``
hooks), :meth:`~Exchange.route`, :meth:`~Exchange.upstream_request`, :meth:`~Exchange.send`,
:meth:`~Exchange.relay` or :meth:`~Exchange.assemble` and :meth:`~Exchange.response`, then
:meth:`~Exchange.respond` and, when the body closes, :meth:`~Exchange.complete`. Which steps a
request takes, and in what order, is :mod:`gateway.web.flow`'s story.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

import falcon

from ..answers import Assembler, choices_asked, normalize_answer
from .body import read_body, read_json_body
from ..config import ModelConfig
from ..context import RequestContext, Response
from ..errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    Phase,
    RequestCancelledError,
    UpstreamError,
    from_backend,
)
from ..backends.httpclient import HTTPFailure
from .state import Gateway
from .streaming import ResponseBody, collect, read_error, replay, watch_departure
from ..backends.send import Outgoing, open_lease
from ..backends.upstream import Lease, Replica

JSON_TYPE = "application/json"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Exchange:
    """One request, as the core keeps it: one method a step of its life.

    Creating it begins the request: its :class:`RequestContext`, counted in
    ``gateway.active``, found by the app's error handlers (``req.context.exchange``);
    from then on :meth:`respond` must end it.

    Attributes:
        gateway: The gateway the request began on (a reload does not change it).
        req: Falcon's request, until :meth:`complete`.
        resp: Falcon's response, until :meth:`complete`.
        pipeline: The route's :class:`Pipeline`.
        ctx: What its plugins see (:class:`RequestContext`).
        timeouts: The route's :class:`Timeouts`.
        replica: The replica to try first, once routed.
        lease: The backend's answer (:class:`Lease`) from :meth:`send` until it is given
            back: by :meth:`settle`, or, once a body relays it, when that body closes.
    """

    __slots__ = ("gateway", "req", "resp", "pipeline", "ctx", "timeouts", "replica", "lease", "relaying",
                 "stop_watching")

    def __init__(self, gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str,
                 pipeline_name: str) -> None:
        self.gateway = gateway
        self.req = req
        self.resp = resp
        self.pipeline = pipeline = gateway.pipelines[pipeline_name]
        self.ctx = ctx = RequestContext(request_id=req.context.request_id, method=req.method, route=route,
                                        pipeline=pipeline.name, headers=req.headers, query=req.params,
                                        remote_addr=req.remote_addr or "")
        self.timeouts = gateway.config.timeouts_for(route)
        self.replica: Replica | None = None
        self.lease: Lease | None = None
        self.relaying = False  # the body holds the lease: its close() gives it back
        self.stop_watching: Callable[[], None] | None = None
        if gateway.pending_counters:
            ctx.counters.update(gateway.pending_counters)
            gateway.pending_counters.clear()
        gateway.active += 1
        req.context.exchange = self

    def request_start(self) -> bool:
        """The ``request_start`` hooks, on headers alone; True when one answered (sent)."""
        return self._answered(self.pipeline.request_start(self.ctx))

    def read(self) -> None:
        """The body, a JSON object, into ``ctx.body`` (:func:`gateway.web.body.read_json_body`)."""
        self.ctx.body = read_json_body(self.req, self.ctx, self.gateway.config)

    def read_raw(self) -> bytes:
        """The body as it came (:func:`gateway.web.body.read_body`)."""
        return read_body(self.req, self.ctx, self.gateway.config)

    def resolve(self) -> None:
        """``ctx.model`` and the request's stream flags, from its body."""
        ctx = self.ctx
        body = ctx.body
        assert body is not None
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise InvalidRequestError("You must provide a model parameter.", param="model")
        ctx.requested_model = requested
        ctx.model = self.gateway.config.resolve_model(requested)
        ctx.stream = body.get("stream") is True
        options = body.get("stream_options")
        ctx.client_wants_usage = ctx.stream and isinstance(options, dict) and options.get("include_usage") is True

    def ask(self) -> bool:
        """The ``request`` hooks; True when one answered (sent)."""
        return self._answered(self.pipeline.request(self.ctx, self.gateway.upstreams.views))

    def served_model(self) -> ModelConfig:
        """The model the request names (after the ``request`` hooks), which must exist."""
        ctx = self.ctx
        if ctx.model is None:
            raise NotFoundError(f"The model `{ctx.requested_model}` does not exist or you do not have access to it.",
                                code="model_not_found", param="model")
        return self.gateway.config.models[ctx.model]

    def route(self, backend: str) -> None:
        """The replica to try first on ``backend``: the ``route`` hooks' choice (a hook may
        pick another backend's), else the gateway's next in turn. Sets ``ctx.backend``,
        ``ctx.replica`` and what ``ctx.call_backend`` calls."""
        ctx, upstreams = self.ctx, self.gateway.upstreams
        ctx.backend = backend
        view = self.pipeline.route(ctx, upstreams.views)
        if view is None:
            chosen = upstreams.backends[backend].candidates()[0]
        else:
            found = upstreams.replica_of(view)
            if found is None:
                raise InternalError(f"A route hook returned {view!r}, not a replica of this gateway "
                                    f"(request id {ctx.request_id}).", code="plugin_error")
            chosen = found
            ctx.backend = chosen.backend
        self.replica = chosen
        ctx.replica = chosen.url
        ctx.replica_view = chosen.view

    def upstream_request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The ``upstream_request`` hooks, which edit ``payload``; returns it."""
        self.pipeline.upstream_request(self.ctx, payload)
        return payload

    def event_hook(self) -> Callable[[dict[str, Any]], bool] | None:
        """The ``response_event`` hooks as the relay's callback, when a plugin wants this
        request's events decoded; None relays the bytes as they come."""
        ctx, pipeline = self.ctx, self.pipeline
        if not pipeline.wants_events(ctx):
            return None
        return lambda event: pipeline.response_event(ctx, event)

    def watch_departure(self) -> None:
        """Stop the work if the client hangs up before its plain answer is ready, until
        :meth:`settle` (:func:`gateway.web.streaming.watch_departure`)."""
        gateway, ctx = self.gateway, self.ctx
        self.stop_watching = watch_departure(self.req.env, lambda: gateway.client_gone(ctx))

    def send(self, path: str, body: bytes | dict[str, Any], headers: dict[str, str], method: str = "POST",
             relay_errors: bool = False) -> Lease:
        """Admit the request and send it to ``ctx.backend`` (the routed replica first)
        until a replica answers; a JSON payload is encoded by the core, with the slot it
        takes (:mod:`gateway.backends.slots`); ``headers`` get the request id and the plugins'
        ``ctx.upstream_headers``. A backend
        error status becomes the client's error (unless ``relay_errors``). From the moment
        it is sent it can be cancelled; the exchange holds the answer (:attr:`lease`)."""
        ctx, gateway = self.ctx, self.gateway
        assert ctx.backend is not None and self.replica is not None
        if ctx.upstream_headers:  # a plugin's (a trace's traceparent): the core's own win
            headers = {**ctx.upstream_headers, **headers}
        headers["X-Request-Id"] = ctx.request_id
        entry = gateway.track(ctx)
        sent_at = time.monotonic()
        try:
            lease = open_lease(ctx, gateway.upstreams.backends[ctx.backend], self.replica,
                               Outgoing(path, body, headers, self.timeouts, method), entry,
                               gateway.upstreams.retry_after())
        except BaseException:
            gateway.untrack(entry)
            raise
        self.lease = lease
        ctx.marks["upstream.headers"] = answered = time.monotonic()
        ctx.upstream_ms = (answered - sent_at) * 1000.0
        try:
            if ctx.cancelled:  # cancelled as the answer began
                raise RequestCancelledError()
            if lease.response.status >= 400 and not relay_errors:
                raise from_backend(lease.response, Phase.WAITING, backend=ctx.backend,
                                   retry_after=gateway.upstreams.retry_after())
        except BaseException:
            self.release()
            raise
        return lease

    def relay(self, chunks: Iterable[bytes], content_type: str = "text/event-stream") -> None:
        """Respond with a stream relayed from the backend's answer, which the body holds
        from here: its close() gives it back."""
        self.resp.content_type = content_type
        self.resp.set_headers(STREAM_HEADERS)
        self.respond(chunks)

    def assemble(self) -> dict[str, Any]:
        """The backend's answer as one OpenAI object: assembled from its stream, or decoded
        when the backend answered in one piece (embeddings, or a backend that does not stream)."""
        ctx, lease = self.ctx, self.lease
        assert ctx.model is not None and lease is not None
        upstream = lease.response
        if upstream.content_type.startswith("text/event-stream"):
            choices, prompts = choices_asked(ctx.body)
            assembler = Assembler(choices // prompts)
            collect(ctx, lease, self.timeouts, assembler.add)
            answer = assembler.answer()
            if answer is None:
                raise UpstreamError("The backend's streamed answer could not be assembled; it is incomplete.")
        else:
            try:
                answer = json.loads(self.read_answer())
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise UpstreamError("The backend's answer was not a JSON object.")
        normalize_answer(answer, ctx.model)
        return answer

    def read_answer(self) -> bytes:
        """The backend's answer, whole, as it came."""
        assert self.lease is not None
        try:
            return self.lease.response.read()
        except HTTPFailure as exc:
            raise read_error(self.ctx, exc, self.timeouts) from exc

    def body_as_is(self) -> Iterable[bytes]:
        """The backend's answer's body, chunk by chunk as it comes; a failure cuts it
        (nothing else can be said once the status went out) and is kept in ``ctx.error``."""
        assert self.lease is not None
        try:
            yield from self.lease.response.chunks()
        except HTTPFailure as exc:
            self.ctx.error = read_error(self.ctx, exc, self.timeouts)

    def settle(self) -> None:
        """The handler is done with the backend: stop watching the client and give the
        answer back, unless a body relays it (its close() does then)."""
        if self.stop_watching is not None:
            self.stop_watching()
            self.stop_watching = None
        if not self.relaying:
            self.release()

    def release(self) -> None:
        """Give the backend's answer back: its connection, admission slot, fleet lease."""
        lease = self.lease
        if lease is not None:
            self.lease = None
            self.gateway.finish(lease)

    def response(self, answer: dict[str, Any]) -> None:
        """A whole answer's usage, its ``response`` hooks, and the answer as JSON."""
        ctx = self.ctx
        ctx.usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        self.pipeline.response(ctx, answer)
        self.respond_whole(json.dumps(answer).encode(), JSON_TYPE)

    def deliver(self, answer: Response) -> None:
        """Send an answer a hook (or the gateway itself) made."""
        resp = self.resp
        resp.status = answer.status
        for name, value in answer.headers.items():
            resp.set_header(name, value)
        if answer.content is not None:
            self.respond_whole(answer.content, answer.content_type)
        elif answer.body is None and answer.events is None:
            self.respond_whole(b"")
        elif self.ctx.stream and answer.events is not None:
            resp.set_headers(STREAM_HEADERS)
            self.respond_whole(replay(answer.events), "text/event-stream")
        else:
            self.respond_whole(json.dumps(answer.body).encode(), JSON_TYPE)

    def fail(self, error: GatewayError) -> None:
        """End the request with ``error``, in OpenAI's shape (the app's error handlers)."""
        self.ctx.error = error
        resp = self.resp
        resp.status = error.status
        for name, value in error.headers.items():
            resp.set_header(name, value)
        self.respond_whole(error.to_json(), JSON_TYPE)

    def respond_whole(self, data: bytes, content_type: str | None = None) -> None:
        """Respond with one chunk, its length known."""
        if content_type is not None:
            self.resp.content_type = content_type
        self.resp.content_length = len(data)
        self.respond([data])

    def respond(self, chunks: Iterable[bytes]) -> None:
        """Send ``chunks`` as the body; a lease still held is the body's from here. When
        the body closes (sent, or the client gone), :meth:`complete` runs, exactly once."""
        self.relaying = self.lease is not None
        self.resp.stream = ResponseBody(self.ctx, chunks, self.complete)

    def complete(self, sent_all: bool) -> None:
        """The body closed: give back what the request held, then the ``complete`` hooks
        with its outcome, and the console's record."""
        gateway = self.gateway
        gateway.active -= 1
        try:
            self.release()
        finally:
            self.pipeline.complete(self.ctx, self.outcome(sent_all), gateway.upstreams.views)
            gateway.stats.record(self.ctx)
            # Falcon's request and response refer back to the exchange (req.context, the
            # body): without these links all of it is freed now, not by the cycle collector.
            del self.req, self.resp

    def outcome(self, sent_all: bool) -> str:
        """The ``outcome`` the ``complete`` hooks get."""
        ctx = self.ctx
        if ctx.cancelled:
            return "cancelled"
        if ctx.client_gone:
            return "client_gone"
        if ctx.error is not None:
            return "error"
        return "ok" if sent_all else "client_gone"

    def _answered(self, answer: Response | None) -> bool:
        """Send a hook's answer, if it made one."""
        if answer is None:
            return False
        self.deliver(answer)
        return True
