"""The Falcon app: routes, the request flow and error rendering.

Flow of a POST route: ``request_start`` hooks (headers only: authentication) ->
read the body (bounded in size and time) -> resolve the model -> ``request``
hooks (may answer at once) -> ``route`` hooks pick a replica -> ``upstream_request``
hooks edit the payload -> the backend, streamed -> ``response`` or
``response_event`` hooks -> the client. ``complete`` runs once from the body
iterable's ``close()``, whatever happened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import falcon
import requests
import yaml

from . import lifecycle, openapi
from .body import read_body, read_json_body
from .answers import Assembler, normalize_answer
from .config import Config, ConfigError, PrefixRoute, Timeouts, load_config, parse_config
from .context import Principal, RequestContext, Response
from .errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ServiceUnavailableError,
    UpstreamError,
)
from .logs import setup_logging  # (importing it also bounds the llamagate logger's lines)
from .paths import check_relay_target, raw_target
from .pipeline import Pipeline, build_pipelines
from .stats import Stats
from .streaming import Relay, ResponseBody, collect, read_error, replay, watch_departure
from .upstream import InFlight, Lease, Replica, Upstreams, error_of

log = logging.getLogger("llamagate")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin"}
PROXY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_JSON = "application/json"


def may_touch(caller: Principal | None, owner: Principal | None) -> bool:
    """Whether ``caller`` may act on a request made by ``owner``: its owner or an admin."""
    if caller is None:
        return False
    return caller.role == "admin" or (owner is not None and owner.client_id == caller.client_id)


def outcome_of(ctx: RequestContext, sent_all: bool) -> str:
    """The ``outcome`` the ``complete`` hooks get."""
    if ctx.cancelled:
        return "cancelled"
    if ctx.client_gone:
        return "client_gone"
    if ctx.error is not None:
        return "error"
    return "ok" if sent_all else "client_gone"


class Gateway:
    """The configuration in force: its pipelines and backends.

    Args:
        config: A checked config.
        pipelines: Built pipelines by name; built from ``config`` when None.
    """

    def __init__(self, config: Config, pipelines: dict[str, Pipeline] | None = None,
                 previous: Gateway | None = None) -> None:
        self.config = config
        self.pipelines = pipelines if pipelines is not None else build_pipelines(config)
        self.upstreams = Upstreams(config.backends, config.health_interval,
                                   previous.upstreams if previous is not None else None)
        # Requests with an open (or opening) backend connection. Keyed by object, not
        # by the client's x-request-id, which a client may reuse or collide; shared
        # with the gateway a reload replaces, so its requests stay cancellable.
        self.in_flight: set[InFlight] = previous.in_flight if previous is not None else set()
        # Requests begun on this gateway and not completed: a retired one shuts its
        # plugins down when this reaches zero.
        self.active = 0
        self._shut_down = False
        # Counted on the next request's context, for events outside any request (a reload).
        self.pending_counters: dict[str, int] = {}
        self.stats = Stats()

    def shutdown(self) -> None:
        """Run every plugin's ``shutdown`` hook, once."""
        if self._shut_down:
            return
        self._shut_down = True
        for pipeline in self.pipelines.values():
            pipeline.shutdown()

    @property
    def draining(self) -> bool:
        return lifecycle.draining

    def begin(self, req: falcon.Request, route: str, pipeline_name: str) -> tuple[RequestContext, Pipeline]:
        """Make the request's context and find its pipeline."""
        pipeline = self.pipelines[pipeline_name]
        ctx = RequestContext(
            request_id=req.context.request_id,
            method=req.method,
            route=route,
            pipeline=pipeline.name,
            headers=req.headers,
            query=req.params,
            remote_addr=req.remote_addr or "",
        )
        if self.pending_counters:
            ctx.counters.update(self.pending_counters)
            self.pending_counters.clear()
        self.active += 1
        req.context.ctx = ctx
        req.context.pipeline = pipeline
        return ctx, pipeline

    def route(self, ctx: RequestContext, pipeline: Pipeline) -> Replica:
        """The replica to try first for a request whose ``ctx.backend`` is set: the
        ``route`` hooks' choice, else the gateway's next in turn. Sets ``ctx.replica``."""
        chosen = pipeline.route(ctx, self.upstreams.backends)
        if chosen is not None:
            ctx.backend = chosen.backend
        else:
            chosen = self.upstreams.backends[ctx.backend].candidates()[0]
        ctx._replica = chosen
        ctx.replica = chosen.url
        return chosen

    def open_upstream(self, ctx: RequestContext, chosen: Replica, path: str, body: bytes,
                      headers: dict[str, str], method: str = "POST") -> Lease:
        """Send the request to ``ctx.backend`` (``chosen`` first); see :meth:`Upstreams.open`.

        While the lease is open the request can be cancelled; closing the lease ends that.
        """
        assert ctx.backend is not None
        entry = InFlight(ctx)
        self.in_flight.add(entry)
        sent_at = time.monotonic()
        try:
            lease = self.upstreams.open(ctx, self.upstreams.backends[ctx.backend], chosen, path, body, headers,
                                        self.config.timeouts_for(ctx.route), entry, method)
        except BaseException:
            self.in_flight.discard(entry)
            raise
        ctx.upstream_ms = (time.monotonic() - sent_at) * 1000.0
        if ctx.cancelled:  # cancelled as the answer began
            self.finish(lease)
            raise RequestCancelledError()
        return lease

    def client_gone(self, ctx: RequestContext) -> None:
        """The client of ``ctx`` hung up before its answer was ready: stop the work."""
        ctx.client_gone = True
        for entry in list(self.in_flight):
            if entry.ctx is ctx:
                entry.interrupt()

    def finish(self, lease: Lease) -> None:
        """Give the backend connection and the admission slot back; idempotent."""
        lease.close()
        self.in_flight.discard(lease.in_flight)

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

    def respond(self, ctx: RequestContext, pipeline: Pipeline, resp: falcon.Response,
                chunks: Iterable[bytes], cleanup: Callable[[], None] | None = None) -> None:
        """Send ``chunks`` as the body; when it closes, clean up and run ``complete``."""

        def on_close(sent_all: bool) -> None:
            self.active -= 1
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                pipeline.complete(ctx, outcome_of(ctx, sent_all))
                self.stats.record(ctx)

        resp.stream = ResponseBody(ctx, chunks, on_close)

    def serve_locally(self, req: falcon.Request, resp: falcon.Response, route: str, pipeline_name: str,
                      otherwise: Callable[[RequestContext], Response], read_body: bool = False) -> None:
        """Answer without a backend: the pipeline's ``request`` hooks may answer (a cache,
        a CORS preflight, a plugin route); else ``otherwise(ctx)`` does (it may raise).
        With ``read_body`` a JSON body sent along is decoded into ``ctx.body`` first."""
        ctx, pipeline = self.begin(req, route, pipeline_name)
        answer = pipeline.request_start(ctx)
        if answer is None:
            if read_body and req.method in ("POST", "PUT", "PATCH") and req.content_length:
                ctx.body = read_json_body(req, ctx, self.config)
            answer = pipeline.request(ctx)
        self.answer(ctx, pipeline, resp, answer if answer is not None else otherwise(ctx))

    def options(self, req: falcon.Request, resp: falcon.Response, route: str, pipeline_name: str,
                allow: str) -> None:
        """``OPTIONS``: the pipeline may answer (a CORS preflight); else 204 with ``Allow``."""
        self.serve_locally(req, resp, route, pipeline_name, lambda ctx: Response(status=204, headers={"Allow": allow}))

    def answer(self, ctx: RequestContext, pipeline: Pipeline, resp: falcon.Response, answer: Response) -> None:
        """Send a response a ``request`` hook made."""
        resp.status = answer.status
        for name, value in answer.headers.items():
            resp.set_header(name, value)
        if answer.body is None and answer.events is None:
            data = b""
        elif ctx.stream and answer.events is not None:
            data = replay(answer.events)
            resp.content_type = "text/event-stream"
            resp.set_headers(STREAM_HEADERS)
        else:
            data = json.dumps(answer.body).encode()
            resp.content_type = _JSON
        resp.content_length = len(data)
        self.respond(ctx, pipeline, resp, [data])


class ProxyResource:
    """An OpenAI POST route served by a backend."""

    def __init__(self, gateway: Gateway, route: str) -> None:
        self.gateway = gateway
        self.route = route

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.gateway.options(req, resp, self.route, self.gateway.config.routes[self.route], "POST, OPTIONS")

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        gateway = self.gateway
        config = gateway.config
        ctx, pipeline = gateway.begin(req, self.route, config.routes[self.route])
        answer = pipeline.request_start(ctx)
        if answer is not None:
            gateway.answer(ctx, pipeline, resp, answer)
            return
        body = read_json_body(req, ctx, config)
        ctx.body = body
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise InvalidRequestError("You must provide a model parameter.", param="model")
        ctx.requested_model = requested
        ctx.model = config.resolve_model(requested)
        ctx.stream = body.get("stream") is True
        options = body.get("stream_options")
        ctx.client_wants_usage = ctx.stream and isinstance(options, dict) and options.get("include_usage") is True

        answer = pipeline.request(ctx)
        if answer is not None:
            gateway.answer(ctx, pipeline, resp, answer)
            return
        if ctx.model is None:
            raise NotFoundError(f"The model `{requested}` does not exist or you do not have access to it.",
                                code="model_not_found", param="model")
        model = config.models[ctx.model]
        ctx.backend = model.backend
        chosen = gateway.route(ctx, pipeline)
        payload = dict(body)
        payload["model"] = model.upstream_model or ctx.model
        pipeline.upstream_request(ctx, payload)
        generates = self.route != "/v1/embeddings"
        if generates:
            ask_for_a_stream(payload)
        headers = {"Content-Type": _JSON, "X-Request-Id": ctx.request_id}
        # A plain answer is written only when whole: until then only a watch on the
        # client's socket can tell that it hung up, and stop the generation.
        stop_watching = watch_departure(req.env, lambda: gateway.client_gone(ctx)) if not ctx.stream else None
        try:
            lease = gateway.open_upstream(ctx, chosen, self.route, json.dumps(payload).encode(), headers)
            relaying = False  # once the relay owns the lease, its close() gives it back
            try:
                upstream = lease.response
                timeouts = config.timeouts_for(self.route)
                if upstream.status_code >= 400:
                    raise error_of(upstream, gateway.upstreams.retry_after())
                if ctx.stream:
                    on_event = (lambda event: pipeline.response_event(ctx, event)) if pipeline.wants_events else None
                    # llama-server's logprobs need reshaping (answers.normalize_event); other streams stay undecoded
                    relay = Relay(ctx, lease, ctx.model, on_event, timeouts, normalize=bool(payload.get("logprobs")))
                    resp.content_type = "text/event-stream"
                    resp.set_headers(STREAM_HEADERS)
                    gateway.respond(ctx, pipeline, resp, relay, lambda: gateway.finish(lease))
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
        resp.content_type = _JSON
        resp.content_length = len(data)
        gateway.respond(ctx, pipeline, resp, [data])


def ask_for_a_stream(payload: dict[str, Any]) -> None:
    """Make a chat or completion request one llama-server streams, whatever the client
    asked: only a stream stops generating when its connection closes (cancel, a client
    that left), and ``timings`` on every chunk tell what an answer cut short cost."""
    payload["stream"] = True
    options = payload.get("stream_options")
    payload["stream_options"] = dict(options if isinstance(options, dict) else {}, include_usage=True)
    payload["timings_per_token"] = True
    # Fields that change the shape of llama-server's chunks, which the gateway reads.
    for field in ("return_progress", "response_fields"):
        payload.pop(field, None)


def whole_answer(ctx: RequestContext, lease: Lease, timeouts: Timeouts) -> dict[str, Any]:
    """The backend's answer as one OpenAI object: assembled from its stream, or decoded
    when the backend answered in one piece (embeddings, or a backend that does not stream)."""
    assert ctx.model is not None
    upstream = lease.response
    if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        assembler = Assembler()
        collect(ctx, lease, timeouts, assembler.add)
        answer = assembler.answer()
        if answer is None:
            raise UpstreamError("The backend's streamed answer could not be assembled; it is incomplete.")
    else:
        try:
            answer = json.loads(upstream.content)
        except requests.RequestException as exc:
            raise read_error(ctx, exc, timeouts) from exc
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError("The backend's answer was not a JSON object.")
    normalize_answer(answer, ctx.model)
    return answer


class ModelsResource:
    """``GET /v1/models`` and ``GET /v1/models/{model}``, answered from the config."""

    route = "/v1/models"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.created = int(os.path.getmtime(gateway.config.file)) if os.path.exists(gateway.config.file) else 0

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": self.gateway.config.models[model_id].owned_by}

    def _send(self, req: falcon.Request, resp: falcon.Response,
              body: Callable[[RequestContext], dict[str, Any]]) -> None:
        self.gateway.serve_locally(req, resp, self.route, self.gateway.config.routes[self.route],
                                   lambda ctx: Response(body=body(ctx)))

    @staticmethod
    def visible(ctx: RequestContext, model_id: str) -> bool:
        """A key restricted to some models sees only those."""
        principal = ctx.principal
        return principal is None or not principal.models or model_id in principal.models

    def on_options(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        self.gateway.options(req, resp, self.route, self.gateway.config.routes[self.route], "GET, OPTIONS")

    on_options_model = on_options

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(req, resp, lambda ctx: {"object": "list", "data": [
            self._model(m) for m in self.gateway.config.models if self.visible(ctx, m)]})

    def on_get_model(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        def body(ctx: RequestContext) -> dict[str, Any]:
            public = self.gateway.config.resolve_model(model_id)
            if public is None or not self.visible(ctx, public):
                raise NotFoundError(f"The model `{model_id}` does not exist or you do not have access to it.",
                                    code="model_not_found", param="model")
            return self._model(public)

        self._send(req, resp, body)


class PrefixResource:
    """Relays every method and sub-path under a prefix to another HTTP backend (an
    image server, say), with a pipeline in front. Bodies pass through untouched."""

    FORWARDED = ("Content-Type", "Accept")

    def __init__(self, gateway: Gateway, prefix: str, target: PrefixRoute) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.route = prefix + "/*"
        self.target = target

    def on_request(self, req: falcon.Request, resp: falcon.Response, rest: str) -> None:
        gateway = self.gateway
        ctx, pipeline = gateway.begin(req, self.route, self.target.pipeline)
        # The raw target, checked: never req.path (decoded) nor anything outside the prefix.
        path = check_relay_target(raw_target(req.env, req.path, req.query_string), self.prefix)
        answer = pipeline.request_start(ctx)
        if answer is not None:
            gateway.answer(ctx, pipeline, resp, answer)
            return
        body = read_body(req, ctx, gateway.config)
        answer = pipeline.request(ctx)
        if answer is not None:
            gateway.answer(ctx, pipeline, resp, answer)
            return
        ctx.backend = self.target.backend
        chosen = gateway.route(ctx, pipeline)
        headers = {name: req.get_header(name) for name in self.FORWARDED if req.get_header(name)}
        headers["X-Request-Id"] = ctx.request_id
        lease = gateway.open_upstream(ctx, chosen, path, body, headers, method=req.method)
        timeouts = gateway.config.timeouts_for(self.route)
        lease.set_read_timeout(timeouts.idle)  # not a stream of events: the headers were its first byte

        def relay() -> Any:
            try:
                yield from lease.response.iter_content(chunk_size=None)
            except requests.RequestException as exc:
                ctx.error = read_error(ctx, exc, timeouts)  # the body is cut: nothing else to say

        resp.status = lease.response.status_code
        if lease.response.headers.get("Content-Type"):
            resp.content_type = lease.response.headers["Content-Type"]
        gateway.respond(ctx, pipeline, resp, relay(), lambda: gateway.finish(lease))

    on_get = on_post = on_put = on_patch = on_delete = on_options = on_request


class ControlResource:
    """Operator endpoints behind ``admin_pipeline`` (which must authenticate):

    * ``GET /admin/status`` (admin): per backend its limit, in flight, queued, and
      per replica readiness, slots and breaker; per pipeline its plugin chain;
    * ``POST /admin/backends/{name}/cancel`` (admin): cancel every request in flight
      on a backend;
    * ``POST /v1/requests/{request_id}/cancel`` (the request's owner or an admin).

    State is per gunicorn worker: each worker reports and cancels its own requests.
    """

    def __init__(self, gateway: Gateway, pipeline_name: str) -> None:
        self.gateway = gateway
        self.pipeline_name = pipeline_name

    def _run(self, req: falcon.Request, resp: falcon.Response, route: str, admin_only: bool,
             act: Callable[[RequestContext], dict[str, Any]]) -> None:
        def authorized(ctx: RequestContext) -> Response:
            if ctx.principal is None:
                raise PermissionDeniedError("This endpoint needs an authenticated caller; "
                                            "admin_pipeline has no auth plugin.")
            if admin_only and ctx.principal.role != "admin":
                raise PermissionDeniedError("This endpoint needs an admin key.", code="admin_required")
            return Response(body=act(ctx))

        self.gateway.serve_locally(req, resp, route, self.pipeline_name, authorized)

    def on_get_status(self, req: falcon.Request, resp: falcon.Response) -> None:
        gateway = self.gateway

        def status(ctx: RequestContext) -> dict[str, Any]:
            return {"pid": os.getpid(), "draining": gateway.draining, "in_flight": len(gateway.in_flight),
                    "stats": gateway.stats.snapshot(),
                    "backends": {name: b.status() for name, b in gateway.upstreams.backends.items()},
                    "pipelines": {name: p.describe() for name, p in gateway.pipelines.items()}}

        self._run(req, resp, "/admin/status", True, status)

    def on_post_backend_cancel(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        def cancel(ctx: RequestContext) -> dict[str, Any]:
            if name not in self.gateway.upstreams.backends:
                raise NotFoundError(f"No backend named {name!r}.", code="backend_not_found")
            return {"backend": name, "cancelled": self.gateway.cancel_backend(name)}

        self._run(req, resp, "/admin/backends/{name}/cancel", True, cancel)

    def on_post_request_cancel(self, req: falcon.Request, resp: falcon.Response, request_id: str) -> None:
        def cancel(ctx: RequestContext) -> dict[str, Any]:
            if not self.gateway.cancel(request_id, ctx.principal):
                raise NotFoundError(f"No request {request_id!r} of yours is in flight on this worker.",
                                    code="request_not_found")
            return {"id": request_id, "object": "request.cancelled", "cancelled": True}

        self._run(req, resp, "/v1/requests/{request_id}/cancel", False, cancel)


class OpenAPIResource:
    """``GET /openapi.json``: the OpenAPI 3.1 document of this gateway's API."""

    def __init__(self, gateway: Gateway) -> None:
        self.data = json.dumps(openapi.document(gateway.config)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = _JSON
        resp.data = self.data


class StatusPageResource:
    """``GET /admin/``: the operator's live status page. The page holds no data: its script
    fetches ``/admin/status`` with the admin key given in the URL's fragment
    (``/admin/#key=...``, never sent to the server) or typed into the page."""

    PAGE = (Path(__file__).resolve().parent / "static" / "status.html").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/html; charset=utf-8"
        resp.set_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                   "style-src 'unsafe-inline'; connect-src 'self'")
        resp.data = self.PAGE


class PluginRouteResource:
    """A path a plugin answers from its ``request`` hook (say ``/v1/usage``); 404 when none does."""

    def __init__(self, gateway: Gateway, route: str, pipeline_name: str) -> None:
        self.gateway = gateway
        self.route = route
        self.pipeline_name = pipeline_name

    def on_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        def unanswered(ctx: RequestContext) -> Response:
            raise NotFoundError(f"Invalid URL ({req.method} {req.path}): no plugin of pipeline "
                                f"{self.pipeline_name} answers it.", code="unknown_url")

        self.gateway.serve_locally(req, resp, self.route, self.pipeline_name, unanswered, read_body=True)

    on_get = on_post = on_put = on_patch = on_delete = on_options = on_request


class HealthResource:
    """``GET /health``: 200 when every model has a ready replica, else 503."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        gateway = self.gateway
        backends = {name: backend.status() for name, backend in gateway.upstreams.backends.items()}
        models = {m.id: backends[m.backend]["ready"] for m in gateway.config.models.values()}
        healthy = all(models.values()) and not gateway.draining
        resp.status = 200 if healthy else 503
        if not healthy:
            resp.set_header("Retry-After", gateway.upstreams.retry_after())
        status = "draining" if gateway.draining else "ok" if healthy else "unavailable"
        resp.media = {"status": status, "models": models}
        if gateway.config.health_detail:
            resp.media["backends"] = backends


class RequestIdMiddleware:
    """Keeps a valid incoming ``x-request-id`` or makes one; echoes it on every response."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        incoming = req.get_header("X-Request-Id")
        req.context.request_id = uuid.uuid4().hex
        if incoming is not None:
            if not REQUEST_ID.fullmatch(incoming):
                raise InvalidRequestError("x-request-id must be 1 to 128 of A-Z a-z 0-9 . _ -",
                                          param="x-request-id")
            req.context.request_id = incoming
        if lifecycle.draining and req.path != "/health":
            raise ServiceUnavailableError("This gateway is shutting down; retry the request.",
                                          code="shutting_down", headers={"Retry-After": "1"})

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        resp.set_headers(SECURITY_HEADERS)
        ctx: RequestContext | None = req.context.get("ctx")
        if ctx is not None:
            ctx.status = resp.status_code
            for name, value in ctx.response_headers.items():
                resp.set_header(name, value)


def _render_error(req: falcon.Request, resp: falcon.Response, error: GatewayError, gateway: Gateway) -> None:
    resp.status = error.status
    for name, value in error.headers.items():
        resp.set_header(name, value)
    resp.content_type = _JSON
    data = error.to_json()
    ctx: RequestContext | None = req.context.get("ctx")
    if ctx is None:
        resp.data = data
        return
    ctx.error = error
    resp.content_length = len(data)
    gateway.respond(ctx, req.context.pipeline, resp, [data])


def build_app(gateway: Gateway) -> falcon.App:
    """The Falcon app serving ``gateway``'s routes; starts nothing."""
    config = gateway.config
    app = falcon.App(middleware=[RequestIdMiddleware()], media_type=_JSON)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_route("/health", HealthResource(gateway))
    app.add_route("/openapi.json", OpenAPIResource(gateway))
    for route in config.routes:
        if route in PROXY_ROUTES:
            app.add_route(route, ProxyResource(gateway, route))
    for route, pipeline_name in config.plugin_routes.items():
        app.add_route(route, PluginRouteResource(gateway, route, pipeline_name))
    for prefix, target in config.prefix_routes.items():
        app.add_route(prefix + "/{rest:path}", PrefixResource(gateway, prefix, target))
    if config.admin_pipeline is not None:
        control = ControlResource(gateway, config.admin_pipeline)
        app.add_route("/admin/status", control, suffix="status")
        app.add_route("/admin", StatusPageResource())  # also /admin/: trailing slashes are stripped
        app.add_route("/admin/backends/{name}/cancel", control, suffix="backend_cancel")
        app.add_route("/v1/requests/{request_id}/cancel", control, suffix="request_cancel")
    if "/v1/models" in config.routes:
        models = ModelsResource(gateway)
        app.add_route("/v1/models", models)
        app.add_route("/v1/models/{model_id:path}", models, suffix="model")

    def on_gateway_error(req: falcon.Request, resp: falcon.Response, ex: GatewayError, params: Any) -> None:
        if ex.status >= 500:
            log.warning("[%s] %s %s -> %d %s", req.context.get("request_id"), req.method, req.path, ex.status, ex.message)
        _render_error(req, resp, ex, gateway)

    def on_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any) -> None:
        if ex.status_code == 404:
            error: GatewayError = NotFoundError(f"Invalid URL ({req.method} {req.path})", code="unknown_url")
        elif ex.status_code == 405:
            error = MethodNotAllowedError(f"Method {req.method} is not allowed on {req.path}.",
                                          headers={k: v for k, v in (ex.headers or {}).items()})
        else:
            error = GatewayError(ex.description or ex.title, type="invalid_request_error", status=ex.status_code)
        _render_error(req, resp, error, gateway)

    def on_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
        request_id = req.context.get("request_id", "-")
        log.error("[%s] unexpected error on %s %s", request_id, req.method, req.path, exc_info=ex)
        error = InternalError(f"The gateway failed while handling this request (request id {request_id}).")
        _render_error(req, resp, error, gateway)

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_http_error)
    app.add_error_handler(GatewayError, on_gateway_error)
    return app


def get_app() -> Any:
    """The app gunicorn runs: config from ``GATEWAY_CONFIG`` (default ``pipelines.yaml``),
    reloaded when it changes (``GATEWAY_RELOAD_INTERVAL`` seconds between looks, 0: never).

    When the file is not valid (a bad edit before a restart), the worker serves the
    last configuration the master found good, and logs why.
    """
    from .reload import ReloadingApp

    setup_logging()
    path = os.environ.get("GATEWAY_CONFIG", "pipelines.yaml")
    try:
        config = load_config(path)
        pipelines = build_pipelines(config)
    except ConfigError as exc:
        if lifecycle.last_good_config is None:
            raise
        log.error("%s is not valid; serving the last good configuration instead:\n%s", path, exc)
        config = parse_config(yaml.safe_load(lifecycle.last_good_config), file=path)
        pipelines = build_pipelines(config)
    gateway = Gateway(config, pipelines)
    gateway.upstreams.start_health_checks()
    app = ReloadingApp(gateway)
    interval = float(os.environ.get("GATEWAY_RELOAD_INTERVAL", "1"))
    if interval > 0:
        app.watch(interval)
    return app
