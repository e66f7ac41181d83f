"""auth: API keys, held and compared only as SHA-256 hashes.

The key comes from ``Authorization: Bearer <key>`` (scheme in any case, any blanks
around the key) or ``x-api-key``; both at once must carry the same key. It is checked
in ``request_start``, before the body is read. A missing or wrong key gets 401
``invalid_api_key`` (a key over 512 characters is wrong without being hashed); a model
the key may not use gets 403 (in ``request``, once the body named the model). The
caller's :class:`gateway.Principal` goes on ``ctx.principal`` for later plugins.

Keys come from the env variables of ``env_keys``, the keys file and the keys database
(``keys_db``, see :mod:`gateway.storage.keydb`); an item without a key (``:alice``) or the
same key for two different principals refuses the config. The database's keys are
mirrored in memory and refreshed in the background when they change (a revoke takes
effect within ``keys_db_poll_interval``); a database that is down leaves the last
known keys serving. Before the first read from it (a worker just started and the
database down) a key found nowhere else gets 503, not 401: it may well be valid.

The plugin also answers the operator console's keys API (``console_keys_route``, see
:mod:`plugins.auth.keys_api`): list, add, revoke, rotate and limits, for admin keys.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.plugin import (
    MAX_KEY_CHARS,
    AuthenticationError,
    KeyMirror,
    PermissionDeniedError,
    Principal,
    ServiceUnavailableError,
    hookimpl,
    key_hash,
    load_keys_file,
    parse_env_keys,
)

from .keys_api import KeysApi

FIRST_READ_WAIT = 5.0  # seconds the first request of a worker waits for the keys database


class Plugin:
    """Authenticates each request by API key."""

    def __init__(self, config: dict[str, Any]) -> None:
        sources: list[tuple[str, str, dict[str, Principal]]] = []
        for variable, role in config["env_keys"].items():
            try:
                sources.append(("env", variable, parse_env_keys(os.environ.get(variable, ""), role)))
            except ValueError as exc:
                raise ValueError(f"env_keys: {variable}: {exc}") from None
        keys_file = config["keys_file"]
        # Watched by the gateway: a key added or revoked reloads the configuration.
        self.watch_files = [keys_file] if keys_file else []
        if keys_file:
            if not os.path.exists(keys_file) and not config["allow_missing_keys_file"]:
                raise ValueError(f"keys_file {keys_file} does not exist (create it with `llamagate keys add`)")
            sources.append(("file", keys_file, load_keys_file(keys_file)))
        # One key, one principal: a key given twice (an env variable and the keys file,
        # say) with different clients or roles would otherwise depend on the order.
        self.principals: dict[str, Principal] = {}
        origin: dict[str, tuple[str, str]] = {}
        for kind, source, principals in sources:
            for digest, principal in principals.items():
                if self.principals.get(digest, principal) != principal:
                    raise ValueError(f"the same key is in {origin[digest][1]} (client "
                                     f"{self.principals[digest].client_id}) and in {source} (client "
                                     f"{principal.client_id})")
                self.principals[digest] = principal
                origin[digest] = (kind, source)
        self.keys_db: KeyMirror | None = None
        if config["keys_db"]:
            try:
                self.keys_db = KeyMirror(config["keys_db"], config["keys_db_poll_interval"])
            except ValueError as exc:
                raise ValueError(f"keys_db: {exc}") from None
        self.keys_api = KeysApi(config["console_keys_route"], config["keys_db"],
                                {digest: (self.principals[digest], *origin[digest]) for digest in self.principals}) \
            if config["console_keys_route"] else None

    def lookup(self, ctx, digest: str) -> Principal | None:
        principal = self.principals.get(digest)
        mirror = self.keys_db
        if principal is not None or mirror is None:
            return principal
        # Started on the first request, not in __init__: `llamagate check` builds plugins too.
        mirror.start(wait=0 if mirror.snapshot is not None else FIRST_READ_WAIT)
        if mirror.stale:
            ctx.incr("auth.keys_db_stale")
        if mirror.snapshot is None:
            raise ServiceUnavailableError("The keys database is unreachable; try again shortly.",
                                          headers={"Retry-After": "5"})
        return mirror.lookup(digest)

    @hookimpl
    def shutdown(self):
        if self.keys_db is not None:
            self.keys_db.stop()
        if self.keys_api is not None:
            self.keys_api.close()

    @staticmethod
    def presented_key(headers: Any) -> str | None:
        """The key of ``Authorization: Bearer <key>`` (any case, any blanks) or of ``x-api-key``.

        Raises:
            AuthenticationError: both headers carry a key, and not the same one.
        """
        bearer = None
        authorization = headers.get("AUTHORIZATION")
        if authorization:
            parts = authorization.strip().split(None, 1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                bearer = parts[1].strip() or None
        api_key = (headers.get("X-API-KEY") or "").strip() or None
        if bearer and api_key and bearer != api_key:
            raise AuthenticationError("Two different API keys were sent (Authorization and x-api-key); send one.")
        return bearer or api_key

    @hookimpl
    def request_start(self, ctx):
        # Before the body is read: a client without a valid key costs no parsing.
        key = self.presented_key(ctx.headers)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key`.")
        # No key is that long: refuse it without hashing it.
        principal = self.lookup(ctx, key_hash(key)) if len(key) <= MAX_KEY_CHARS else None
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        ctx.principal = principal

    @hookimpl
    def request(self, ctx):
        if self.keys_api is not None:
            answer = self.keys_api.answer(ctx)
            if answer is not None:
                return answer
        principal = ctx.principal
        if principal is not None and principal.models and ctx.model is not None \
                and ctx.model not in principal.models:
            raise PermissionDeniedError(f"This API key may not use the model `{ctx.requested_model}`.",
                                        code="model_not_allowed", param="model")
