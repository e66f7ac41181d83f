"""Everything a plugin may import from the gateway, in one module.

A plugin imports from here and nowhere else in ``gateway`` (its tests also from
:mod:`gateway.testing`); ``__all__`` is the whole contract, each name documented in
docs/plugins.md, and a test checks that the built-in and example plugins keep to it.
The modules these names come from are the gateway's own and may change.

The hooks themselves, and :class:`Plugin` (what the gateway reads from a plugin
besides its hooks), are defined in :mod:`gateway.hookspecs`.
"""

from .answers import (
    BUDGET_FIELDS,
    Assembler,
    cached_tokens,
    choice_text,
    choices_asked,
    completion_bound,
    completion_budget,
    normalize_answer,
    normalize_event,
    stream_events,
    token_bound,
    total_tokens,
    usage_of,
)
from .backends.kvstates import conversation_key
from .config import LLAMA_SERVER_ROUTES
from .context import BackendView, Principal, ReplicaView, RequestContext, Response
from .errors import (
    AuthenticationError,
    GatewayError,
    GatewayTimeoutError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)
from .hookspecs import Plugin, hookimpl
from .storage.keydb import KeyMirror, NoSuchKey
from .storage.keydb import add_key as add_db_key
from .storage.keydb import list_keys as list_db_keys
from .storage.keydb import prepare as prepare_keys_db
from .storage.keydb import revoke as revoke_db_key
from .storage.keydb import rotate as rotate_db_key
from .storage.keydb import update_key as update_db_key
from .storage.keys import MAX_KEY_CHARS, key_hash, load_keys_file, parse_env_keys
from .storage.ledger import day_range, new_row_id, top_clients, usage_csv
from .storage.ledger import insert as insert_ledger_rows
from .storage.ledger import prepare as prepare_ledger
from .storage.ledger import usage as usage_report
from .storage.pg import ERRORS as PG_ERRORS
from .storage.pg import Connection as PgConnection
from .storage.pg import connect as pg_connect
from .storage.pg import migrate as pg_migrate
from .storage.pg import parse_url as parse_pg_url
from .redact import FIELD_CHARS, clip, clip_json, redact_url
from .schemas import SCHEMA_DIR, compile_check, compile_schema, format_path
from .settings import Settings
from .settings import current as current_settings
from .storage.stores import Decision, Store, StoreUnavailable, make_store

__all__ = [
    # the contract
    "Plugin",
    "hookimpl",
    # the request and what hooks return
    "BackendView",
    "Principal",
    "ReplicaView",
    "RequestContext",
    "Response",
    "LLAMA_SERVER_ROUTES",
    "conversation_key",
    "cached_tokens",
    # errors
    "AuthenticationError",
    "GatewayError",
    "GatewayTimeoutError",
    "InternalError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UpstreamError",
    # answers
    "Assembler",
    "BUDGET_FIELDS",
    "choice_text",
    "choices_asked",
    "completion_bound",
    "completion_budget",
    "normalize_answer",
    "normalize_event",
    "stream_events",
    "token_bound",
    "total_tokens",
    "usage_of",
    # stores
    "Decision",
    "Store",
    "StoreUnavailable",
    "make_store",
    # settings
    "Settings",
    "current_settings",
    # keys
    "KeyMirror",
    "MAX_KEY_CHARS",
    "key_hash",
    "load_keys_file",
    "parse_env_keys",
    "prepare_keys_db",
    "NoSuchKey",
    "add_db_key",
    "list_db_keys",
    "revoke_db_key",
    "rotate_db_key",
    "update_db_key",
    # PostgreSQL and the usage ledger
    "PG_ERRORS",
    "PgConnection",
    "parse_pg_url",
    "pg_connect",
    "pg_migrate",
    "day_range",
    "insert_ledger_rows",
    "new_row_id",
    "prepare_ledger",
    "top_clients",
    "usage_report",
    "usage_csv",
    # logs and schemas
    "FIELD_CHARS",
    "clip",
    "clip_json",
    "redact_url",
    "SCHEMA_DIR",
    "compile_check",
    "compile_schema",
    "format_path",
]
