"""Llamagate: an OpenAI-compatible gateway for llama.cpp's llama-server.

The public plugin API is what ``__all__`` lists; everything else may change.
"""

from .context import Principal, RequestContext, Response
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

__all__ = [
    "AuthenticationError",
    "GatewayError",
    "GatewayTimeoutError",
    "InternalError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Principal",
    "RateLimitError",
    "RequestContext",
    "Response",
    "ServiceUnavailableError",
    "UpstreamError",
    "hookimpl",
]
