"""Falcon resources: thin, each hands its request to :mod:`gateway.web.flow`."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import falcon

from . import flow, openapi
from .exchange import JSON_TYPE
from ..config import PrefixRoute
from ..context import RequestContext, Response
from ..errors import GatewayError, NotFoundError, PermissionDeniedError
from ..fleet import client as fleet
from .state import Gateway


def preflight(gateway: Gateway, req: falcon.Request, resp: falcon.Response, route: str, pipeline_name: str,
              allow: str) -> None:
    """``OPTIONS``: the pipeline may answer (a CORS preflight); else 204 with ``Allow``."""
    flow.serve_locally(gateway, req, resp, route, pipeline_name,
                           lambda ctx: Response(status=204, headers={"Allow": allow}))


def serve_admin(gateway: Gateway, pipeline_name: str, req: falcon.Request, resp: falcon.Response, route: str,
                admin_only: bool, act: Callable[[RequestContext], dict[str, Any]]) -> None:
    """An operator endpoint through ``admin_pipeline`` (whose auth plugin sets the principal):
    ``act(ctx)`` answers for an admin key (``admin_only``) or any key; others get 403."""
    def authorized(ctx: RequestContext) -> Response:
        if ctx.principal is None:
            raise PermissionDeniedError("This endpoint needs an authenticated caller; "
                                        "admin_pipeline has no auth plugin.")
        if admin_only and ctx.principal.role != "admin":
            raise PermissionDeniedError("This endpoint needs an admin key.", code="admin_required")
        ctx.response_headers["Cache-Control"] = "no-store"  # operator data stays out of caches
        return Response(body=act(ctx))

    flow.serve_locally(gateway, req, resp, route, pipeline_name, authorized)


class ModelResource:
    """``POST`` to a route a model's backend serves: OpenAI's chat, completions and
    embeddings (``flow.serve_model``), llama-server's other endpoints
    (``flow.serve_relay``)."""

    def __init__(self, gateway: Gateway, route: str,
                 serve: Callable[[Gateway, falcon.Request, falcon.Response, str], None]) -> None:
        self.gateway = gateway
        self.route = route
        self.serve = serve

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.serve(self.gateway, req, resp, self.route)

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        preflight(self.gateway, req, resp, self.route, self.gateway.config.routes[self.route], "POST, OPTIONS")


class PrefixResource:
    """Every method and sub-path under a prefix, relayed to another HTTP backend."""

    def __init__(self, gateway: Gateway, prefix: str, target: PrefixRoute) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.target = target

    def on_request(self, req: falcon.Request, resp: falcon.Response, rest: str) -> None:
        flow.serve_prefix(self.gateway, req, resp, self.prefix, self.target)

    on_get = on_post = on_put = on_patch = on_delete = on_options = on_request


class ModelsResource:
    """``GET /v1/models`` and ``GET /v1/models/{model}``, from the config; a key
    restricted to some models sees only those."""

    route = "/v1/models"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        file = gateway.config.file
        self.created = int(os.path.getmtime(file)) if os.path.exists(file) else 0

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": self.gateway.config.models[model_id].owned_by}

    def _send(self, req: falcon.Request, resp: falcon.Response, body: Callable[[RequestContext], dict[str, Any]]) -> None:
        flow.serve_locally(self.gateway, req, resp, self.route, self.gateway.config.routes[self.route],
                               lambda ctx: Response(body=body(ctx)))

    @staticmethod
    def visible(ctx: RequestContext, model_id: str) -> bool:
        principal = ctx.principal
        return principal is None or not principal.models or model_id in principal.models

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

    def on_options(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        preflight(self.gateway, req, resp, self.route, self.gateway.config.routes[self.route], "GET, OPTIONS")

    on_options_model = on_options


class ControlResource:
    """Operator endpoints behind ``admin_pipeline`` (which must authenticate):

    * ``GET /admin/status`` (admin): per backend its limit, in flight, queued, and
      per replica readiness, slots and breaker; per pipeline its plugin chain;
    * ``POST /admin/backends/{name}/cancel`` (admin): cancel every request in flight
      on a backend;
    * ``POST /v1/requests/{request_id}/cancel`` (the request's owner or an admin);
    * ``GET /admin/models``, ``POST /admin/models/{id}/load|unload`` (admin): the fleet's
      launched models, from the supervisor (docs/fleet.md).

    With ``shared:`` (Redis) the status lists every worker of every host, and a cancel
    reaches the request on whichever worker holds it; without, each worker reports and
    cancels its own.
    """

    def __init__(self, gateway: Gateway, pipeline_name: str) -> None:
        self.gateway = gateway
        self.pipeline_name = pipeline_name

    def _run(self, req: falcon.Request, resp: falcon.Response, route: str, admin_only: bool,
             act: Callable[[RequestContext], dict[str, Any]]) -> None:
        serve_admin(self.gateway, self.pipeline_name, req, resp, route, admin_only, act)

    def on_get_status(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._run(req, resp, "/admin/status", True, lambda ctx: dict(self.gateway.status(), fleet=self._fleet()))

    def _fleet(self) -> dict[str, Any] | None:
        """The supervisor's view of the launched models (None: the config launches none)."""
        if not self.gateway.config.launched:
            return None
        try:
            return fleet.call("status", timeout=5)
        except GatewayError as exc:
            return {"error": exc.message}

    def on_post_backend_cancel(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        def cancel(ctx: RequestContext) -> dict[str, Any]:
            if name not in self.gateway.upstreams.backends:
                raise NotFoundError(f"No backend named {name!r}.", code="backend_not_found")
            return {"backend": name, "cancelled": self.gateway.cancel_backend_anywhere(name, ctx.principal)}

        self._run(req, resp, "/admin/backends/{name}/cancel", True, cancel)

    def on_post_request_cancel(self, req: falcon.Request, resp: falcon.Response, request_id: str) -> None:
        def cancel(ctx: RequestContext) -> dict[str, Any]:
            if not self.gateway.cancel_anywhere(request_id, ctx.principal):
                raise NotFoundError(f"No request {request_id!r} of yours is in flight.",
                                    code="request_not_found")
            return {"id": request_id, "object": "request.cancelled", "cancelled": True}

        self._run(req, resp, "/v1/requests/{request_id}/cancel", False, cancel)

    def on_get_models(self, req: falcon.Request, resp: falcon.Response) -> None:
        def models(ctx: RequestContext) -> dict[str, Any]:
            config = self.gateway.config
            if not config.launched:  # no supervisor runs: nothing to ask
                return {"models": {}, "swaps": 0, "resident": 0, "memory_budget": config.fleet.memory_budget,
                        "max_resident": config.fleet.max_resident}
            return fleet.call("status")

        self._run(req, resp, "/admin/models", True, models)

    def on_post_model_load(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        self._run(req, resp, "/admin/models/{id}/load", True,
                  lambda ctx: fleet.call("load", self._launched_backend(model_id)))

    def on_post_model_unload(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        self._run(req, resp, "/admin/models/{id}/unload", True,
                  lambda ctx: fleet.call("unload", self._launched_backend(model_id)))

    def _launched_backend(self, name: str) -> str:
        """A model id or alias, or a backend's name, to the launched backend it means."""
        config = self.gateway.config
        public = config.resolve_model(name)
        backend = config.models[public].backend if public is not None else name
        if backend not in config.launched:
            raise NotFoundError(f"No model or backend {name!r} that the gateway launches.", code="model_not_found")
        return backend


class PluginRouteResource:
    """A path a plugin answers from its hooks (say ``/v1/usage``); 404 when none does."""

    def __init__(self, gateway: Gateway, route: str, pipeline_name: str) -> None:
        self.gateway = gateway
        self.route = route
        self.pipeline_name = pipeline_name

    def on_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        def unanswered(ctx: RequestContext) -> Response:
            raise NotFoundError(f"Invalid URL ({req.method} {req.path}): no plugin of pipeline "
                                f"{self.pipeline_name} answers it.", code="unknown_url")

        flow.serve_locally(self.gateway, req, resp, self.route, self.pipeline_name, unanswered, read_body=True)

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


class OpenAPIResource:
    """``GET /openapi.json``: the OpenAPI 3.1 document of this gateway's API."""

    def __init__(self, gateway: Gateway) -> None:
        self.data = json.dumps(openapi.document(gateway.config)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = JSON_TYPE
        resp.data = self.data
