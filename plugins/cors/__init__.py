"""cors: cross-origin access for browsers, from an allowlist of origins.

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed
origin is answered 204 at once; one from another origin gets 403. Other requests
from an allowed origin get ``Access-Control-Allow-Origin`` (the origin itself,
or ``*`` when any origin is allowed without credentials) and ``Vary: Origin``.
A wildcard together with credentials is refused when the config loads.
"""

from __future__ import annotations

from typing import Any

from gateway.plugin import PermissionDeniedError, Response, hookimpl

METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        origins = config["allow_origins"]
        self.any_origin = "*" in origins
        if self.any_origin and config["allow_credentials"]:
            raise ValueError('allow_origins "*" cannot go with allow_credentials: true '
                             "(browsers refuse it, and it would hand any site the user's credentials)")
        self.origins = frozenset(origins)
        self.credentials = config["allow_credentials"]
        self.allow_headers = ", ".join(config["allow_headers"])
        self.expose_headers = ", ".join(config["expose_headers"])
        self.max_age = str(config["max_age"])

    def _headers(self, origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": "*" if self.any_origin else origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    @hookimpl
    def request_start(self, ctx):
        origin = ctx.headers.get("ORIGIN")
        if origin is None:
            return None
        allowed = self.any_origin or origin in self.origins
        preflight = ctx.method == "OPTIONS" and "ACCESS-CONTROL-REQUEST-METHOD" in ctx.headers
        if preflight:
            if not allowed:
                raise PermissionDeniedError(f"Origin {origin} may not call this gateway.", code="origin_not_allowed")
            return Response(status=204, headers={
                **self._headers(origin),
                "Access-Control-Allow-Methods": METHODS,
                "Access-Control-Allow-Headers": self.allow_headers,
                "Access-Control-Max-Age": self.max_age,
            })
        if allowed:
            ctx.response_headers.update(self._headers(origin))
            ctx.response_headers["Access-Control-Expose-Headers"] = self.expose_headers
        return None
