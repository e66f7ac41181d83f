"""auth: API keys, held and compared only as SHA-256 hashes.

The key comes from ``Authorization: Bearer <key>`` or ``x-api-key`` and is checked
in ``request_start``, before the body is read. A missing or wrong key gets 401
``invalid_api_key``; a model the key may not use gets 403 (in ``request``, once
the body named the model). The
caller's :class:`gateway.Principal` goes on ``ctx.principal`` for later plugins.
"""

from __future__ import annotations

import os
from typing import Any

from gateway import AuthenticationError, PermissionDeniedError, Principal, hookimpl
from gateway.keys import key_hash, load_keys_file, parse_env_keys


class Plugin:
    """Authenticates each request by API key."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.principals: dict[str, Principal] = {}
        for variable, role in config["env_keys"].items():
            self.principals.update(parse_env_keys(os.environ.get(variable, ""), role))
        keys_file = config["keys_file"]
        # Watched by the gateway: a key added or revoked reloads the configuration.
        self.watch_files = [keys_file] if keys_file else []
        if keys_file:
            if not os.path.exists(keys_file) and not config["allow_missing_keys_file"]:
                raise ValueError(f"keys_file {keys_file} does not exist (create it with `llamagate keys add`)")
            self.principals.update(load_keys_file(keys_file))

    @staticmethod
    def presented_key(headers: Any) -> str | None:
        authorization = headers.get("AUTHORIZATION")
        if authorization:
            scheme, _, key = authorization.partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
        return headers.get("X-API-KEY") or None

    @hookimpl
    def request_start(self, ctx):
        # Before the body is read: a client without a valid key costs no parsing.
        key = self.presented_key(ctx.headers)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key`.")
        principal = self.principals.get(key_hash(key))
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        ctx.principal = principal

    @hookimpl
    def request(self, ctx):
        principal = ctx.principal
        if principal is not None and principal.models and ctx.model is not None \
                and ctx.model not in principal.models:
            raise PermissionDeniedError(f"This API key may not use the model `{ctx.requested_model}`.",
                                        code="model_not_allowed", param="model")
