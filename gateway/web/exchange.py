"""One request's life, from its headers to its ``complete`` hooks.

A model request (:func:`serve_model`), in order:

1. **begin**: the request's context; its pipeline's ``request_start`` hooks, on
   headers alone (authentication): a refusal here reads no body;
2. **read**: the body, bounded in size, time and nesting (:mod:`gateway.web.body`);
3. **resolve**: the model alias to its public id; ``request`` hooks (may answer:
   a cache hit);
4. **route**: ``route`` hooks pick a replica, else the gateway's round robin;
5. **send**: ``upstream_request`` hooks edit the payload; chat and completions are
   asked as streams (:func:`gateway.answers.stream_request`); admission, then the
   backend, retried until a replica answers (:mod:`gateway.backends.send`);
6. **relay** a stream event by event (:class:`gateway.web.streaming.Relay`), or
   **assemble** a plain answer and run the ``response`` hooks;
7. **complete**: when the body iterable closes, the lease goes back and every
   plugin's ``complete`` runs, whatever happened (:func:`respond`).

Steps 1 to 5's hooks are :func:`prepare_model_request`, shared with :func:`serve_relay`.

llama-server's other model endpoints (:func:`serve_relay`: Anthropic's messages,
OpenAI's Responses, the native API) take the same steps, their answers relayed in
their own shapes. Prefix routes (:func:`serve_prefix`) and answers made without a backend
(:func:`serve_locally`: models, admin, plugin routes, preflights) take the same
steps, fewer of them. Errors raised anywhere are rendered by the app's error
handlers through :func:`respond` too, so ``complete`` never misses a request.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

import falcon

from ..answers import Assembler, choices_asked, decode_json, normalize_answer, stream_request, usage_of
from ..answers.responses import ResponsesStream, complete_response, echoed
from .body import read_body, read_json_body
from ..config import ModelConfig, PrefixRoute, Timeouts
from ..context import RequestContext, Response
from ..errors import (
    InternalError,
    InvalidRequestError,
    NotFoundError,
    Phase,
    RequestCancelledError,
    UpstreamError,
    from_backend,
)
from ..backends.httpclient import HTTPFailure
from .paths import check_relay_target, raw_target
from ..pipeline import Pipeline
from .state import Gateway
from .streaming import Relay, ResponseBody, collect, read_error, relay_as_is, replay, watch_departure
from ..backends.send import Outgoing, open_lease
from ..backends.upstream import Lease, Replica

JSON_TYPE = "application/json"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RESPONSES_ROUTE = "/v1/responses"


def serve_model(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str) -> None:
    """``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``."""
    prepared = prepare_model_request(gateway, req, resp, route)
    if prepared is None:
        return
    ctx, pipeline, replica, payload = prepared
    if route != "/v1/embeddings":
        stream_request(payload)
    timeouts = gateway.config.timeouts_for(route)
    # A plain answer is written only when whole: until then only a watch on the
    # client's socket can tell that it hung up, and stop the generation.
    on_event = events_for(ctx, pipeline) if ctx.stream else None  # plugin code: before a lease exists
    stop_watching = watch_departure(req.env, lambda: gateway.client_gone(ctx)) if not ctx.stream else None
    try:
        lease = send(gateway, ctx, replica, route, payload,
                     {"Content-Type": JSON_TYPE, "X-Request-Id": ctx.request_id})
        relaying = False  # from respond() on, the body's close() gives the lease back
        try:
            if ctx.stream:
                relay = Relay(ctx, lease, ctx.model, on_event, timeouts, normalize=bool(payload.get("logprobs")))
                resp.content_type = "text/event-stream"
                resp.set_headers(STREAM_HEADERS)
                respond(gateway, ctx, pipeline, resp, relay, lambda: gateway.finish(lease))
                relaying = True
                return
            answer = whole_answer(ctx, lease, timeouts)
        finally:
            if not relaying:
                gateway.finish(lease)
    finally:
        if stop_watching is not None:
            stop_watching()
    ctx.usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
    pipeline.response(ctx, answer)
    data = json.dumps(answer).encode()
    resp.content_type = JSON_TYPE
    resp.content_length = len(data)
    respond(gateway, ctx, pipeline, resp, [data])


def serve_relay(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str) -> None:
    """``POST`` to one of llama-server's other model endpoints (``/v1/messages``,
    ``/v1/responses``, ``/tokenize``...): routed by the body's model like
    :func:`serve_model`, the answer relayed in its own shape, its usage read as it
    passes (``response`` and ``response_event`` hooks do not run: they take OpenAI's
    shapes). The Responses API's answers and events are made what OpenAI's spec
    requires (:mod:`gateway.answers.responses`)."""
    prepared = prepare_model_request(gateway, req, resp, route)
    if prepared is None:
        return
    ctx, pipeline, replica, payload = prepared
    timeouts = gateway.config.timeouts_for(route)
    stop_watching = watch_departure(req.env, lambda: gateway.client_gone(ctx)) if not ctx.stream else None
    try:
        lease = send(gateway, ctx, replica, route, payload,
                     {"Content-Type": JSON_TYPE, "X-Request-Id": ctx.request_id})
        relaying = False
        try:
            upstream = lease.response
            if upstream.content_type.startswith("text/event-stream"):
                resp.content_type = upstream.content_type
                resp.set_headers(STREAM_HEADERS)
                reshape = ResponsesStream(ctx.model, payload) if route == RESPONSES_ROUTE else None
                respond(gateway, ctx, pipeline, resp, relay_as_is(ctx, lease, ctx.model, timeouts, reshape),
                        lambda: gateway.finish(lease))
                relaying = True
                return
            try:
                data = upstream.read()
            except HTTPFailure as exc:
                raise read_error(ctx, exc, timeouts) from exc
            content_type = upstream.content_type or JSON_TYPE
        finally:
            if not relaying:
                gateway.finish(lease)
    finally:
        if stop_watching is not None:
            stop_watching()
    answer = decode_json(data) if content_type.startswith(JSON_TYPE) else None
    if isinstance(answer, (dict, list)):  # a list: llama-server's answers to a prompt list, one per choice
        choices, prompts = choices_asked(ctx.body)
        ctx.usage = usage_of(answer, choices // prompts)
        if route == RESPONSES_ROUTE and isinstance(answer, dict) and answer.get("object") == "response":
            complete_response(answer, ctx.model, echoed(payload))
            data = json.dumps(answer).encode()
        else:
            answers = answer if isinstance(answer, list) else [answer]
            named = [one for one in answers if isinstance(one, dict) and "model" in one]
            for one in named:
                one["model"] = ctx.model
            if named:
                data = json.dumps(answer).encode()
    resp.content_type = content_type
    resp.content_length = len(data)
    respond(gateway, ctx, pipeline, resp, [data])


def serve_prefix(gateway: Gateway, req: falcon.Request, resp: falcon.Response, prefix: str,
                 target: PrefixRoute) -> None:
    """Any method under a prefix route (``/sdapi/*``): relayed to its HTTP backend,
    bodies untouched, with the pipeline in front."""
    route = prefix + "/*"
    ctx, pipeline = begin(gateway, req, route, target.pipeline)
    if answered(gateway, ctx, pipeline, resp, pipeline.request_start(ctx)):
        return
    # The raw target, checked: never req.path (decoded) nor anything outside the prefix.
    path = check_relay_target(raw_target(req.env, req.path, req.query_string), prefix)
    body = read_body(req, ctx, gateway.config)
    if answered(gateway, ctx, pipeline, resp, pipeline.request(ctx, gateway.upstreams.views)):
        return
    ctx.backend = target.backend
    replica = choose_replica(gateway, ctx, pipeline)
    headers = {name: req.get_header(name) for name in ("Content-Type", "Accept") if req.get_header(name)}
    headers["X-Request-Id"] = ctx.request_id
    # the backend's own statuses are the answer: this route relays them as they are
    lease = send(gateway, ctx, replica, path, body, headers, method=req.method, relay_errors=True)
    timeouts = gateway.config.timeouts_for(route)
    lease.set_read_timeout(timeouts.idle)  # not a stream of events: the headers were its first byte

    def relay() -> Any:
        try:
            yield from lease.response.chunks()
        except HTTPFailure as exc:
            ctx.error = read_error(ctx, exc, timeouts)  # the body is cut: nothing else to say

    resp.status = lease.response.status
    if lease.response.content_type:
        resp.content_type = lease.response.content_type
    respond(gateway, ctx, pipeline, resp, relay(), lambda: gateway.finish(lease))


def serve_locally(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str, pipeline_name: str,
                  otherwise: Callable[[RequestContext], Response], read_body: bool = False) -> None:
    """Answer without a backend: the pipeline's hooks may answer (a CORS preflight, a
    plugin route); else ``otherwise(ctx)`` does (it may raise). With ``read_body`` a
    JSON body sent along is decoded into ``ctx.body`` first."""
    ctx, pipeline = begin(gateway, req, route, pipeline_name)
    answer = pipeline.request_start(ctx)
    if answer is None:
        if read_body and req.method in ("POST", "PUT", "PATCH") and req.content_length:
            ctx.body = read_json_body(req, ctx, gateway.config)
        answer = pipeline.request(ctx, gateway.upstreams.views)
    deliver(gateway, ctx, pipeline, resp, answer if answer is not None else otherwise(ctx))


# --- the steps ---------------------------------------------------------------------------

def prepare_model_request(gateway: Gateway, req: falcon.Request, resp: falcon.Response,
                          route: str) -> tuple[RequestContext, Pipeline, Replica, dict[str, Any]] | None:
    """A model request up to what goes to the backend: begin, ``request_start``, read,
    resolve, ``request``, route, ``upstream_request``. None when a hook answered it."""
    config = gateway.config
    ctx, pipeline = begin(gateway, req, route, config.routes[route])
    if answered(gateway, ctx, pipeline, resp, pipeline.request_start(ctx)):
        return None
    ctx.body = read_json_body(req, ctx, config)
    resolve_model(gateway, ctx)
    if answered(gateway, ctx, pipeline, resp, pipeline.request(ctx, gateway.upstreams.views)):
        return None
    model = served_model(gateway, ctx)
    replica = choose_replica(gateway, ctx, pipeline)
    payload = dict(ctx.body, model=model.upstream_model or ctx.model)
    pipeline.upstream_request(ctx, payload)
    return ctx, pipeline, replica, payload


def begin(gateway: Gateway, req: falcon.Request, route: str, pipeline_name: str) -> tuple[RequestContext, Pipeline]:
    """The request's context and pipeline; from here on :func:`respond` must end it."""
    pipeline = gateway.pipelines[pipeline_name]
    ctx = RequestContext(request_id=req.context.request_id, method=req.method, route=route,
                         pipeline=pipeline.name, headers=req.headers, query=req.params,
                         remote_addr=req.remote_addr or "")
    if gateway.pending_counters:
        ctx.counters.update(gateway.pending_counters)
        gateway.pending_counters.clear()
    gateway.active += 1
    req.context.ctx, req.context.pipeline, req.context.gateway = ctx, pipeline, gateway
    return ctx, pipeline


def answered(gateway: Gateway, ctx: RequestContext, pipeline: Pipeline, resp: falcon.Response,
             answer: Response | None) -> bool:
    """Send a hook's answer, if it made one."""
    if answer is None:
        return False
    deliver(gateway, ctx, pipeline, resp, answer)
    return True


def resolve_model(gateway: Gateway, ctx: RequestContext) -> None:
    """``ctx.model`` and the request's stream flags, from its body."""
    body = ctx.body
    assert body is not None
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    ctx.requested_model = requested
    ctx.model = gateway.config.resolve_model(requested)
    ctx.stream = body.get("stream") is True
    options = body.get("stream_options")
    ctx.client_wants_usage = ctx.stream and isinstance(options, dict) and options.get("include_usage") is True


def served_model(gateway: Gateway, ctx: RequestContext) -> ModelConfig:
    """The model the request names, which must exist; sets ``ctx.backend``."""
    if ctx.model is None:
        raise NotFoundError(f"The model `{ctx.requested_model}` does not exist or you do not have access to it.",
                            code="model_not_found", param="model")
    model = gateway.config.models[ctx.model]
    ctx.backend = model.backend
    return model


def choose_replica(gateway: Gateway, ctx: RequestContext, pipeline: Pipeline) -> Replica:
    """The replica to try first: the ``route`` hooks' choice, else the gateway's next in
    turn. Sets ``ctx.backend`` (a hook may pick another backend) and ``ctx.replica``."""
    upstreams = gateway.upstreams
    view = pipeline.route(ctx, upstreams.views)
    if view is None:
        assert ctx.backend is not None
        chosen = upstreams.backends[ctx.backend].candidates()[0]
    else:
        chosen = getattr(view, "_replica", None)
        if not isinstance(chosen, Replica) or chosen.backend not in upstreams.backends:
            raise InternalError(f"A route hook returned {view!r}, not a replica of this gateway "
                                f"(request id {ctx.request_id}).", code="plugin_error")
        ctx.backend = chosen.backend
    ctx._replica = chosen
    ctx.replica = chosen.url
    return chosen


def send(gateway: Gateway, ctx: RequestContext, replica: Replica, path: str, body: bytes | dict[str, Any],
         headers: dict[str, str], method: str = "POST", relay_errors: bool = False) -> Lease:
    """Admit the request and send it to ``ctx.backend`` (``replica`` first) until a
    replica answers; a JSON payload is encoded by the core, with the slot it takes
    (:mod:`gateway.backends.slots`); a backend error status becomes the client's error (unless
    ``relay_errors``). From the moment it is sent it can be cancelled;
    :meth:`Gateway.finish` ends that."""
    assert ctx.backend is not None
    entry = gateway.track(ctx)
    sent_at = time.monotonic()
    try:
        lease = open_lease(ctx, gateway.upstreams.backends[ctx.backend], replica,
                           Outgoing(path, body, headers, gateway.config.timeouts_for(ctx.route), method), entry,
                           gateway.upstreams.retry_after())
    except BaseException:
        gateway.untrack(entry)
        raise
    ctx.upstream_ms = (time.monotonic() - sent_at) * 1000.0
    try:
        if ctx.cancelled:  # cancelled as the answer began
            raise RequestCancelledError()
        if lease.response.status >= 400 and not relay_errors:
            raise from_backend(lease.response, Phase.WAITING, backend=ctx.backend,
                               retry_after=gateway.upstreams.retry_after())
    except BaseException:
        gateway.finish(lease)
        raise
    return lease


def events_for(ctx: RequestContext, pipeline: Pipeline) -> Callable[[dict[str, Any]], bool] | None:
    """The ``response_event`` hooks as the relay's callback, when a plugin wants this
    request's events decoded; None relays the bytes as they come."""
    if not pipeline.wants_events(ctx):
        return None
    return lambda event: pipeline.response_event(ctx, event)


def whole_answer(ctx: RequestContext, lease: Lease, timeouts: Timeouts) -> dict[str, Any]:
    """The backend's answer as one OpenAI object: assembled from its stream, or decoded
    when the backend answered in one piece (embeddings, or a backend that does not stream)."""
    assert ctx.model is not None
    upstream = lease.response
    if upstream.content_type.startswith("text/event-stream"):
        choices, prompts = choices_asked(ctx.body)
        assembler = Assembler(choices // prompts)
        collect(ctx, lease, timeouts, assembler.add)
        answer = assembler.answer()
        if answer is None:
            raise UpstreamError("The backend's streamed answer could not be assembled; it is incomplete.")
    else:
        try:
            answer = json.loads(upstream.read())
        except ValueError:
            answer = None
        except HTTPFailure as exc:
            raise read_error(ctx, exc, timeouts) from exc
        if not isinstance(answer, dict):
            raise UpstreamError("The backend's answer was not a JSON object.")
    normalize_answer(answer, ctx.model)
    return answer


def deliver(gateway: Gateway, ctx: RequestContext, pipeline: Pipeline, resp: falcon.Response,
            answer: Response) -> None:
    """Send an answer a hook (or the gateway itself) made."""
    resp.status = answer.status
    for name, value in answer.headers.items():
        resp.set_header(name, value)
    if answer.content is not None:
        data = answer.content
        resp.content_type = answer.content_type
    elif answer.body is None and answer.events is None:
        data = b""
    elif ctx.stream and answer.events is not None:
        data = replay(answer.events)
        resp.content_type = "text/event-stream"
        resp.set_headers(STREAM_HEADERS)
    else:
        data = json.dumps(answer.body).encode()
        resp.content_type = JSON_TYPE
    resp.content_length = len(data)
    respond(gateway, ctx, pipeline, resp, [data])


def respond(gateway: Gateway, ctx: RequestContext, pipeline: Pipeline, resp: falcon.Response,
            chunks: Iterable[bytes], cleanup: Callable[[], None] | None = None) -> None:
    """Send ``chunks`` as the body; when it closes (sent, or the client gone), clean up
    and run the ``complete`` hooks, exactly once."""

    def on_close(sent_all: bool) -> None:
        gateway.active -= 1
        try:
            if cleanup is not None:
                cleanup()
        finally:
            pipeline.complete(ctx, outcome_of(ctx, sent_all), gateway.upstreams.views)
            gateway.stats.record(ctx)

    resp.stream = ResponseBody(ctx, chunks, on_close)


def outcome_of(ctx: RequestContext, sent_all: bool) -> str:
    """The ``outcome`` the ``complete`` hooks get."""
    if ctx.cancelled:
        return "cancelled"
    if ctx.client_gone:
        return "client_gone"
    if ctx.error is not None:
        return "error"
    return "ok" if sent_all else "client_gone"
