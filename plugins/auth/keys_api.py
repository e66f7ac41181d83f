"""The operator console's keys API (docs/console.md#keys), answered by the auth plugin on
the plugin routes under ``console_keys_route`` (say ``/admin/api/keys``):

* ``GET  <route>[?all=true]``: every key: the keys database's (revoked ones too with
  ``all``), then the keys file's and the env variables' (``read_only``: change them
  where they are written);
* ``POST <route>``: a new key in the keys database; the answer holds its secret, the
  only time it is shown (only its hash is stored);
* ``POST <route>/revoke`` ``{"key_id"}``: the key is refused from then on;
* ``POST <route>/rotate`` ``{"key_id"}``: a new secret (shown once) in place of the
  old one, which is refused from then on;
* ``POST <route>/limits`` ``{"key_id", "limits"?, "priority"?, "models"?}``: replaces
  those given.

Admin keys only (any other key gets 403). The same operations as ``llamagate keys --db``
(:mod:`gateway.storage.keydb` through the plugin facade), so keys made here and there are
alike. CSRF: the key is read only from the request's headers (the auth plugin's
``request_start``), which a cross-site form or link cannot set, and a ``POST`` must say
``Content-Type: application/json``, which a form cannot send either.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from gateway.plugin import (
    PG_ERRORS,
    InvalidRequestError,
    MethodNotAllowedError,
    NoSuchKey,
    NotFoundError,
    PermissionDeniedError,
    PgConnection,
    Principal,
    Response,
    ServiceUnavailableError,
    add_db_key,
    list_db_keys,
    prepare_keys_db,
    revoke_db_key,
    rotate_db_key,
    update_db_key,
)

KEY_ID = re.compile(r"[0-9a-f]{8,64}")
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month", "requests_per_day")
MAX_MODELS = 64
MAX_MODEL_CHARS = 128
MAX_EXPIRES_DAYS = 3650
NO_STORE = {"Cache-Control": "no-store"}  # an answer may hold a secret, and every one lists keys


def _fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for name in body:
        if name not in allowed:
            raise InvalidRequestError(f"Unknown field `{name}` (known: {', '.join(allowed)}).", param=name)


def _key_id(body: dict[str, Any]) -> str:
    value = body.get("key_id")
    if not isinstance(value, str) or not KEY_ID.fullmatch(value):
        raise InvalidRequestError("key_id must be a key id: 8 to 64 lower-case hex digits.", param="key_id")
    return value


def _whole(value: Any, name: str, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be null or an integer {bound}.", param=name)
    return value


def _limits(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"limits must be an object of {', '.join(LIMIT_FIELDS)}.", param="limits")
    checked = {}
    for name, number in value.items():
        if name not in LIMIT_FIELDS:
            raise InvalidRequestError(f"Unknown limit `{name}` (known: {', '.join(LIMIT_FIELDS)}).",
                                      param=f"limits.{name}")
        if _whole(number, f"limits.{name}", 1) is not None:
            checked[name] = number
    return checked


def _models(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise InvalidRequestError(f"models must be null or a list of at most {MAX_MODELS} model ids.", param="models")
    for i, model in enumerate(value):
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS or model != model.strip() \
                or any(unicodedata.category(c).startswith("C") for c in model):
            raise InvalidRequestError(f"models[{i}] must be a model id of 1 to {MAX_MODEL_CHARS} characters, "
                                      "without blanks around it or control characters.", param=f"models[{i}]")
    return list(dict.fromkeys(value))


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def db_key(row: Any, now: datetime) -> dict[str, Any]:
    state = "revoked" if row.revoked else "expired" if row.expires is not None and row.expires <= now else "live"
    return {"key_id": row.key_id, "client": row.client, "role": row.role, "models": list(row.models),
            "limits": row.limits, "priority": row.priority, "created": _moment(row.created),
            "expires": _moment(row.expires), "revoked": _moment(row.revoked), "state": state, "source": "db",
            "read_only": False}


def fixed_key(principal: Principal, source: str, origin: str) -> dict[str, Any]:
    return {"key_id": principal.key_id, "client": principal.client_id, "role": principal.role,
            "models": sorted(principal.models), "limits": dict(principal.limits), "priority": principal.priority,
            "created": None, "expires": None, "revoked": None, "state": "live", "source": source,
            "origin": origin, "read_only": True}


class KeysApi:
    """The keys API on ``route`` and its action routes.

    Args:
        route: The base route (``console_keys_route``).
        database: The keys database's URL, or None (then only the fixed keys are listed).
        fixed: The keys of the keys file and env variables: ``(principal, source, origin)``
            by hash, ``source`` ``file`` or ``env``, ``origin`` the file or the variable.
        timeout: Seconds for each database operation.
    """

    def __init__(self, route: str, database: str | None, fixed: dict[str, tuple[Principal, str, str]],
                 timeout: float = 5.0) -> None:
        self.handlers: dict[str, dict[str, Callable[[Any], Response]]] = {
            route: {"GET": self.list, "POST": self.add}, f"{route}/revoke": {"POST": self.revoke},
            f"{route}/rotate": {"POST": self.rotate}, f"{route}/limits": {"POST": self.limits}}
        self.conn = PgConnection(database, timeout) if database else None
        self.prepared = False
        self.fixed = fixed
        self.fixed_ids = {principal.key_id: source for principal, source, _ in fixed.values()}

    def answer(self, ctx: Any) -> Response | None:
        """The answer when ``ctx.route`` is one of the API's, else None."""
        handler = self.handlers.get(ctx.route)
        if handler is None:
            return None
        if ctx.principal is None or ctx.principal.role != "admin":
            raise PermissionDeniedError("This endpoint needs an admin key.", code="admin_required")
        act = handler.get(ctx.method)
        if act is None:
            allowed = ", ".join(handler)
            raise MethodNotAllowedError(f"Use {allowed}.", headers={"Allow": allowed})
        if ctx.method == "POST":
            content_type = (ctx.headers.get("CONTENT-TYPE") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise InvalidRequestError("Send a JSON body with Content-Type: application/json.",
                                          code="unsupported_media_type")
            if not isinstance(ctx.body, dict):
                raise InvalidRequestError("Send a JSON object.")
        return act(ctx)

    def database(self, work: Callable[[Any], Any], param: str | None = None) -> Any:
        """``work(conn)`` on the keys database: 400 without one or for a ``ValueError``
        (about ``param``), 404 when no such key, 503 when it does not answer. pg8000's
        socket is gevent's: the worker serves other requests meanwhile."""
        if self.conn is None:
            raise InvalidRequestError("This gateway has no keys database (the auth plugin's keys_db): its keys "
                                      "are read-only here.", code="read_only")
        try:
            with self.conn.session() as conn:
                if not self.prepared:
                    prepare_keys_db(conn)
                    self.prepared = True
                return work(conn)
        except NoSuchKey:
            raise NotFoundError("No live key has that id.", code="key_not_found", param="key_id") from None
        except ValueError as exc:
            raise InvalidRequestError(f"{exc}.", param=param) from None
        except (*PG_ERRORS, RuntimeError):
            raise ServiceUnavailableError("The keys database is unreachable; try again shortly.",
                                          headers={"Retry-After": "5"}) from None

    def _writable(self, key_id: str) -> None:
        """Refuses a key of the keys file or an env variable by its id (or a prefix of it)."""
        for fixed_id, source in self.fixed_ids.items():
            if fixed_id.startswith(key_id) or key_id.startswith(fixed_id):
                where = "the keys file (llamagate keys --file)" if source == "file" else "an env variable"
                raise InvalidRequestError(f"Key {fixed_id} is read-only here: change it in {where}.",
                                          code="read_only", param="key_id")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def list(self, ctx: Any) -> Response:
        everything = ctx.query.get("all", "false")
        if everything not in ("true", "false"):
            raise InvalidRequestError("all must be true or false.", param="all")
        now = datetime.now(timezone.utc)
        rows = self.database(lambda conn: list_db_keys(conn, include_revoked=everything == "true")) \
            if self.conn is not None else []
        data = [db_key(row, now) for row in rows]
        data += [fixed_key(principal, source, origin) for principal, source, origin in self.fixed.values()]
        return Response(body={"object": "list", "keys_db": self.conn is not None, "data": data}, headers=NO_STORE)

    def add(self, ctx: Any) -> Response:
        body = ctx.body
        _fields(body, ("client", "role", "models", "limits", "priority", "expires_days"))
        client = body.get("client")
        if not isinstance(client, str):
            raise InvalidRequestError("client must be a string.", param="client")
        role = body.get("role", "user")
        if role not in ("user", "admin"):
            raise InvalidRequestError("role must be user or admin.", param="role")
        models, limits = _models(body.get("models")), _limits(body.get("limits"))
        priority = _whole(body.get("priority"), "priority", 0, 100)
        days = _whole(body.get("expires_days"), "expires_days", 1, MAX_EXPIRES_DAYS)
        expires = datetime.now(timezone.utc) + timedelta(days=days) if days is not None else None
        secret, row = self.database(lambda conn: add_db_key(conn, client, role, models, limits, priority, expires),
                                    param="client")  # the only field left for the storage to refuse
        return Response(status=201, headers=NO_STORE,
                        body={"object": "key", "secret": secret, "key": db_key(row, datetime.now(timezone.utc))})

    def revoke(self, ctx: Any) -> Response:
        _fields(ctx.body, ("key_id",))
        key_id = _key_id(ctx.body)
        self._writable(key_id)
        if not self.database(lambda conn: revoke_db_key(conn, key_id, key_id_only=True)):
            raise NotFoundError("No live key has that id.", code="key_not_found", param="key_id")
        return Response(body={"object": "key.revoked", "key_id": key_id}, headers=NO_STORE)

    def rotate(self, ctx: Any) -> Response:
        _fields(ctx.body, ("key_id",))
        key_id = _key_id(ctx.body)
        self._writable(key_id)
        secret, row = self.database(lambda conn: rotate_db_key(conn, key_id, key_id_only=True))
        return Response(body={"object": "key", "secret": secret, "replaces": key_id,
                              "key": db_key(row, datetime.now(timezone.utc))}, headers=NO_STORE)

    def limits(self, ctx: Any) -> Response:
        body = ctx.body
        _fields(body, ("key_id", "limits", "priority", "models"))
        key_id = _key_id(body)
        self._writable(key_id)
        changes: dict[str, Any] = {}
        if "limits" in body:
            changes["limits"] = _limits(body["limits"])
        if "priority" in body:
            changes["priority"] = _whole(body["priority"], "priority", 0, 100)
        if "models" in body:
            changes["models"] = _models(body["models"])
        if not changes:
            raise InvalidRequestError("Give limits, priority and/or models to change.")
        row = self.database(lambda conn: update_db_key(conn, key_id, **changes))
        return Response(body={"object": "key", "key": db_key(row, datetime.now(timezone.utc))}, headers=NO_STORE)
