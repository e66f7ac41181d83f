"""The Falcon app: its routes, the request id and security headers, and how errors
are rendered (always OpenAI-shaped, always through the request's exchange once it
began, :meth:`gateway.web.exchange.Exchange.fail`, so its ``complete`` hooks run). The
request flow itself is :mod:`gateway.web.flow`; the resources are :mod:`gateway.web.resources`.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import falcon

from . import flow
from .. import lifecycle
from ..config import LLAMA_SERVER_ROUTES
from ..errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServiceUnavailableError,
)
from .exchange import JSON_TYPE, Exchange
from .resources import (
    ControlResource,
    HealthResource,
    ModelResource,
    ModelsResource,
    OpenAPIResource,
    PluginRouteResource,
    PrefixResource,
)
from .console import ConsoleApiResource, ConsoleAssetResource, ConsolePageResource
from .state import Gateway

log = logging.getLogger("llamagate")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin"}
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


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
        exchange: Exchange | None = req.context.get("exchange")
        if exchange is not None:
            ctx = exchange.ctx
            ctx.status = resp.status_code
            for name, value in ctx.response_headers.items():
                resp.set_header(name, value)
        if req.path.startswith("/admin/"):  # the console's and operator's answers: never for other origins
            for name in [n for n in resp.headers if n.lower().startswith("access-control-")]:
                resp.delete_header(name)


def _render_error(req: falcon.Request, resp: falcon.Response, error: GatewayError) -> None:
    exchange: Exchange | None = req.context.get("exchange")
    if exchange is not None:  # the request began: it ends through its exchange, complete hooks and all
        exchange.fail(error)
        return
    # refused before the request began (a bad x-request-id, draining)
    resp.status = error.status
    for name, value in error.headers.items():
        resp.set_header(name, value)
    resp.content_type = JSON_TYPE
    resp.data = error.to_json()


def build_app(gateway: Gateway) -> falcon.App:
    """The Falcon app serving ``gateway``'s routes; starts nothing."""
    config = gateway.config
    app = falcon.App(middleware=[RequestIdMiddleware()], media_type=JSON_TYPE)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_route("/health", HealthResource(gateway))
    app.add_route("/openapi.json", OpenAPIResource(gateway))
    for route in config.routes:
        if route in MODEL_ROUTES:
            app.add_route(route, ModelResource(gateway, route, flow.serve_model))
        elif route in LLAMA_SERVER_ROUTES:
            app.add_route(route, ModelResource(gateway, route, flow.serve_relay))
    for route, pipeline_name in config.plugin_routes.items():
        app.add_route(route, PluginRouteResource(gateway, route, pipeline_name))
    for prefix, target in config.prefix_routes.items():
        app.add_route(prefix + "/{rest:path}", PrefixResource(gateway, prefix, target))
    if config.admin_pipeline is not None:
        control = ControlResource(gateway, config.admin_pipeline)
        app.add_route("/admin/status", control, suffix="status")
        app.add_route("/admin", ConsolePageResource())  # also /admin/: trailing slashes are stripped
        app.add_route("/admin/assets/{name:path}", ConsoleAssetResource())
        console = ConsoleApiResource(gateway, config.admin_pipeline)
        app.add_route("/admin/api/overview", console, suffix="overview")
        app.add_route("/admin/api/live", console, suffix="live")
        app.add_route("/admin/api/errors", console, suffix="errors")
        app.add_route("/admin/api/requests/{request_id}/cancel", console, suffix="cancel")
        app.add_route("/admin/backends/{name}/cancel", control, suffix="backend_cancel")
        app.add_route("/v1/requests/{request_id}/cancel", control, suffix="request_cancel")
        app.add_route("/admin/models", control, suffix="models")
        app.add_route("/admin/models/{model_id}/load", control, suffix="model_load")
        app.add_route("/admin/models/{model_id}/unload", control, suffix="model_unload")
    if "/v1/models" in config.routes:
        models = ModelsResource(gateway)
        app.add_route("/v1/models", models)
        app.add_route("/v1/models/{model_id:path}", models, suffix="model")

    def on_gateway_error(req: falcon.Request, resp: falcon.Response, ex: GatewayError, params: Any) -> None:
        if ex.status >= 500:
            log.warning("[%s] %s %s -> %d %s", req.context.get("request_id"), req.method, req.path, ex.status, ex.message)
        _render_error(req, resp, ex)

    def on_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any) -> None:
        if ex.status_code == 404:
            error: GatewayError = NotFoundError(f"Invalid URL ({req.method} {req.path})", code="unknown_url")
        elif ex.status_code == 405:
            error = MethodNotAllowedError(f"Method {req.method} is not allowed on {req.path}.",
                                          headers={k: v for k, v in (ex.headers or {}).items()})
        else:
            error = GatewayError(ex.description or ex.title, type="invalid_request_error", status=ex.status_code)
        _render_error(req, resp, error)

    def on_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
        request_id = req.context.get("request_id", "-")
        log.error("[%s] unexpected error on %s %s", request_id, req.method, req.path, exc_info=ex)
        error = InternalError(f"The gateway failed while handling this request (request id {request_id}).")
        _render_error(req, resp, error)

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_http_error)
    app.add_error_handler(GatewayError, on_gateway_error)
    return app
