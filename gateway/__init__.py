"""Llamagate: an OpenAI-compatible gateway for llama.cpp's llama-server.

The public plugin API is what ``__all__`` lists, plus the modules of
``PUBLIC_MODULES`` (each documented in docs/plugins.md); everything else may change.
Plugins import nothing else (a test checks the built-in and example plugins).
"""

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
from .hookspecs import hookimpl

PUBLIC_MODULES = (
    "gateway",
    "gateway.answers",  # llama-server answer shapes: normalise, assemble streams, replay
    "gateway.keydb",  # keys in PostgreSQL: table, add, revoke, rotate, the in-memory mirror
    "gateway.keys",  # keys files: hashes, load, add, revoke
    "gateway.ledger",  # the usage ledger in PostgreSQL: table, batched inserts, usage reports
    "gateway.pg",  # PostgreSQL connections (pg8000, green under gevent) and versioned migrations
    "gateway.redact",  # credentials out of URLs, bounded strings for logs
    "gateway.schemas",  # JSON Schema helpers and the gateway's request schemas
    "gateway.settings",  # the environment's settings, read once
    "gateway.stores",  # memory and Redis stores: byte cache and GCRA limits
    "gateway.testing",  # Harness, FakeBackend, the canned llama-server
)

__all__ = [
    "AuthenticationError",
    "BackendView",
    "GatewayError",
    "GatewayTimeoutError",
    "InternalError",
    "InvalidRequestError",
    "LLAMA_SERVER_ROUTES",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Principal",
    "RateLimitError",
    "ReplicaView",
    "RequestContext",
    "Response",
    "ServiceUnavailableError",
    "UpstreamError",
    "hookimpl",
]
