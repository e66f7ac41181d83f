"""One request's flow, from its headers to its ``complete`` hooks: each kind of request's
path told top to bottom, step by step, through its :class:`gateway.web.exchange.Exchange`
(what the core keeps of one request, one method a step).

A model request (:func:`serve_model`), in order:

1. **begin** (:class:`Exchange`): the request's context; from here on
   :meth:`Exchange.respond` must end it. Its pipeline's ``request_start`` hooks run on
   headers alone (authentication): a refusal here reads no body;
2. **read**: the body, bounded in size, time and nesting (:mod:`gateway.web.body`);
3. **resolve**: the model alias to its public id; ``request`` hooks (:meth:`Exchange.ask`;
   may answer: a cache hit);
4. **route**: ``route`` hooks pick a replica, else the gateway's round robin;
5. **send**: ``upstream_request`` hooks edit the payload; chat and completions are
   asked as streams (:func:`gateway.answers.stream_request`); admission, then the
   backend, retried until a replica answers (:mod:`gateway.backends.send`);
6. **relay** a stream event by event (:class:`gateway.web.streaming.Relay`), or
   **assemble** a plain answer and run the ``response`` hooks;
7. **complete**: when the body iterable closes, the backend's answer goes back and every
   plugin's ``complete`` runs, whatever happened (:meth:`Exchange.respond`).

Steps 1 to 5 are :func:`prepare_model_request`, shared with :func:`serve_relay`.

llama-server's other model endpoints (:func:`serve_relay`: Anthropic's messages,
OpenAI's Responses, the native API) take the same steps, their answers relayed in
their own shapes. Prefix routes (:func:`serve_prefix`) and answers made without a backend
(:func:`serve_locally`: models, admin, plugin routes, preflights) take the same
steps, fewer of them. Errors raised anywhere are rendered by the app's error
handlers through :meth:`Exchange.fail`, which responds too, so ``complete`` never
misses a request.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import falcon

from ..answers import choices_asked, decode_json, stream_request, usage_of
from ..answers.responses import ResponsesStream, complete_response, echoed
from ..config import PrefixRoute
from ..context import RequestContext, Response
from .exchange import JSON_TYPE, Exchange
from .paths import check_relay_target, raw_target
from .state import Gateway
from .streaming import Relay, relay_as_is

RESPONSES_ROUTE = "/v1/responses"


def serve_model(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str) -> None:
    """``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``."""
    prepared = prepare_model_request(gateway, req, resp, route)
    if prepared is None:
        return
    exchange, payload = prepared
    ctx = exchange.ctx
    if route != "/v1/embeddings":
        stream_request(payload)
    on_event = exchange.event_hook() if ctx.stream else None  # plugin code: before a lease exists
    if not ctx.stream:
        # A plain answer is written only when whole: until then only a watch on the
        # client's socket can tell that it hung up, and stop the generation.
        exchange.watch_departure()
    try:
        lease = exchange.send(route, payload, {"Content-Type": JSON_TYPE})
        if ctx.stream:
            exchange.relay(Relay(ctx, lease, ctx.model, on_event, exchange.timeouts,
                                 normalize=bool(payload.get("logprobs"))))
            return
        answer = exchange.assemble()
    finally:
        exchange.settle()
    exchange.response(answer)


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
    exchange, payload = prepared
    ctx = exchange.ctx
    if not ctx.stream:
        exchange.watch_departure()
    try:
        lease = exchange.send(route, payload, {"Content-Type": JSON_TYPE})
        upstream = lease.response
        if upstream.content_type.startswith("text/event-stream"):
            reshape = ResponsesStream(ctx.model, payload) if route == RESPONSES_ROUTE else None
            exchange.relay(relay_as_is(ctx, lease, ctx.model, exchange.timeouts, reshape), upstream.content_type)
            return
        data = exchange.read_answer()
        content_type = upstream.content_type or JSON_TYPE
    finally:
        exchange.settle()
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
    exchange.respond_whole(data, content_type)


def serve_prefix(gateway: Gateway, req: falcon.Request, resp: falcon.Response, prefix: str,
                 target: PrefixRoute) -> None:
    """Any method under a prefix route (``/sdapi/*``): relayed to its HTTP backend,
    bodies untouched, with the pipeline in front."""
    exchange = Exchange(gateway, req, resp, prefix + "/*", target.pipeline)
    if exchange.request_start():
        return
    # The raw target, checked: never req.path (decoded) nor anything outside the prefix.
    path = check_relay_target(raw_target(req.env, req.path, req.query_string), prefix)
    body = exchange.read_raw()
    if exchange.ask():
        return
    exchange.route(target.backend)
    headers = {name: req.get_header(name) for name in ("Content-Type", "Accept") if req.get_header(name)}
    # the backend's own statuses are the answer: this route relays them as they are
    lease = exchange.send(path, body, headers, method=req.method, relay_errors=True)
    lease.set_read_timeout(exchange.timeouts.idle)  # not a stream of events: the headers were its first byte
    resp.status = lease.response.status
    if lease.response.content_type:
        resp.content_type = lease.response.content_type
    exchange.respond(exchange.body_as_is())


def serve_locally(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str, pipeline_name: str,
                  otherwise: Callable[[RequestContext], Response], read_body: bool = False) -> None:
    """Answer without a backend: the pipeline's hooks may answer (a CORS preflight, a
    plugin route); else ``otherwise(ctx)`` does (it may raise). With ``read_body`` a
    JSON body sent along is decoded into ``ctx.body`` first."""
    exchange = Exchange(gateway, req, resp, route, pipeline_name)
    if exchange.request_start():
        return
    if read_body and req.method in ("POST", "PUT", "PATCH") and req.content_length:
        exchange.read()
    if exchange.ask():
        return
    exchange.deliver(otherwise(exchange.ctx))


def prepare_model_request(gateway: Gateway, req: falcon.Request, resp: falcon.Response,
                          route: str) -> tuple[Exchange, dict[str, Any]] | None:
    """A model request up to what goes to the backend: begin, ``request_start``, read,
    resolve, ``request``, route, ``upstream_request``. None when a hook answered it."""
    exchange = Exchange(gateway, req, resp, route, gateway.config.routes[route])
    if exchange.request_start():
        return None
    exchange.read()
    exchange.resolve()
    if exchange.ask():
        return None
    model = exchange.served_model()
    exchange.route(model.backend)
    ctx = exchange.ctx
    return exchange, exchange.upstream_request(dict(ctx.body, model=model.upstream_model or ctx.model))
