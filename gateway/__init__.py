"""Llamagate: an OpenAI-compatible gateway for llama.cpp's llama-server.

The public plugin API is :mod:`gateway.plugin` (its ``__all__``, documented whole in
docs/plugins.md) and, for tests, :mod:`gateway.testing`: ``PUBLIC_MODULES``.
Everything else may change. Plugins import nothing else (a test checks the built-in
and example plugins and their tests). This package's own ``__all__`` re-exports the
names it always had, for plugins written as ``from gateway import hookimpl``.
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
    "gateway.plugin",  # everything a plugin imports
    "gateway.testing",  # Harness, FakeBackend, the canned llama-server, for plugins' tests
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
