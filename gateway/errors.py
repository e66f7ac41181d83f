"""Every exception the gateway raises on purpose, and the one mapping from what
backends say and do to the errors clients see.

One root, :class:`LlamagateError`; under it the errors that reach clients
(:class:`GatewayError`, in OpenAI's shape) and the internal families, which never
reach a client as they are: an ``except GatewayError`` does not catch them. The
client's errors and the backend transport's are declared here (the transport's so
that :func:`from_backend` needs no import from the HTTP client, which re-exports
them); each other family next to what raises it. This module imports nothing of the
gateway, so any module may import it::

    LlamagateError
    ├── GatewayError [status]              what a client sees (the tree below)
    ├── HTTPFailure                        a backend request that got no complete answer
    │   ├── ConnectFailed                  never connected (``refused`` when refused)
    │   │   └── ConnectTimedOut
    │   ├── ReadTimedOut                   nothing came for the read timeout
    │   └── ConnectionBroken               reset, closed early, or not HTTP
    ├── ConfigError                        config.py: a config file that cannot be used
    ├── SettingsError (also ValueError)    settings.py: bad LLAMAGATE_* environment values
    ├── StoreUnavailable                   stores.py: a plugin's store (Redis) is unreachable
    ├── SharedUnavailable                  shared.py: the workers' shared Redis is unreachable
    ├── NoSuchKey (also ValueError)        storage/keydb.py: no live key to rotate or update
    ├── IllegalTransition (also RuntimeError)  fleet/states.py: a supervisor bug
    ├── SlotActionFailed                   backends/kvstates.py: a slot's save or restore failed (the turn runs cold)
    └── signals that never leave their module:
        httpclient._StaleConnection (a keep-alive connection the backend had closed),
        send._LaunchedDown (a launched backend's llama-servers all refused)

Every error a client sees is a :class:`GatewayError`, rendered as::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Plugins reject a request by raising one of these; anything else a plugin raises
becomes an :class:`InternalError` that carries the request id.

The client's tree (HTTP status in brackets)::

    GatewayError
    ├── InvalidRequestError [400]      invalid_request_error
    │   ├── RequestTimeoutError [408]  request_timeout: the body came too slowly
    │   ├── PayloadTooLargeError [413]
    │   ├── RequestCancelledError [499] request_cancelled
    │   └── ClientGoneError [499]      client_closed_request (never seen: the client left)
    ├── AuthenticationError [401]      invalid_api_key
    ├── PermissionDeniedError [403]
    ├── NotFoundError [404]            model_not_found, unknown_url
    ├── MethodNotAllowedError [405]
    ├── RateLimitError [429]           rate_limit_exceeded
    ├── InternalError [500]
    ├── UpstreamError [502]            a backend answered with nonsense
    ├── ServiceUnavailableError [503]  no backend reachable (Retry-After)
    │   └── ModelUnavailableError [503] model_unavailable: a launched model that cannot start
    └── GatewayTimeoutError [504]

What a backend's failure becomes (:func:`from_backend`; the request's own end
comes first: a cancel is 499 ``request_cancelled``, a client that left 499
``client_closed_request``)::

    failure             SENDING                 WAITING             READING
    ConnectFailed       503 (retried)           -                   -
    ConnectionBroken    503 (retried)           502 bad_gateway     502 bad_gateway
    ReadTimedOut        504 timeout, first byte 504, first byte     504, idle
    an error status     the backend's error in OpenAI's shape (401/403: 502
                        backend_auth_failed; 503 with Retry-After)
"""

from __future__ import annotations

import enum
import json
from typing import Any, Protocol


class BackendAnswer(Protocol):
    """What the mapping reads of a backend's error answer (``httpclient.Response`` is one);
    declared here so that errors.py imports nothing of the gateway."""

    status: int

    def json(self) -> Any: ...


class LlamagateError(Exception):
    """The root of every exception the gateway raises on purpose (see the module's tree)."""


class HTTPFailure(LlamagateError):
    """A request to a backend that got no complete answer."""


class ConnectFailed(HTTPFailure):
    """The connection was never made: nothing reached the backend.

    Attributes:
        refused: The backend's host refused it (nothing listens on the port).
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ConnectTimedOut(ConnectFailed):
    """Connecting took longer than the connect timeout."""


class ReadTimedOut(HTTPFailure):
    """The backend sent nothing for the read timeout."""


class ConnectionBroken(HTTPFailure):
    """The connection was reset or closed before the answer ended, or carried no HTTP."""


class GatewayError(LlamagateError):
    """Base of every error a client sees.

    Args:
        message: Human-readable explanation, safe to show a client (default: the
            class's ``default_message``).
        type: OpenAI error type, e.g. ``invalid_request_error``.
        code: Machine-readable code, e.g. ``model_not_found``, or None.
        param: The request field at fault (``messages[0].role``), or None.
        status: HTTP status.
        headers: Extra response headers, e.g. ``{"Retry-After": "1"}``.
    """

    status = 500
    type = "api_error"
    code: str | None = None
    default_message = "The gateway could not handle this request."

    def __init__(
        self,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = message or self.default_message
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {...}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    def to_response_event(self) -> dict[str, Any]:
        """The Responses API's stream ``error`` event (without its ``sequence_number``)."""
        return {"type": "error", "code": self.code, "message": self.message, "param": self.param}

    def to_response_error(self) -> dict[str, Any]:
        """A failed Response's ``error``: the spec allows a few codes only, of which these two fit."""
        return {"code": "rate_limit_exceeded" if self.status == 429 else "server_error", "message": self.message}


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    status = 408
    code = "request_timeout"


class RequestCancelledError(InvalidRequestError):
    """The request was cancelled through a cancel endpoint (499, nginx's "client closed")."""

    status = 499
    code = "request_cancelled"
    default_message = "The request was cancelled."


class ClientGoneError(InvalidRequestError):
    """The client hung up before its answer was ready; nobody reads this error, but
    the request's outcome (``client_gone``) and its logs do."""

    status = 499
    code = "client_closed_request"
    default_message = "The client closed the connection before the answer was ready."


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimitError(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class InternalError(GatewayError):
    status = 500
    type = "server_error"


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class ServiceUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ModelUnavailableError(ServiceUnavailableError):
    """A launched model that cannot start (it failed, or no fleet supervisor runs)."""

    code = "model_unavailable"


class GatewayTimeoutError(GatewayError):
    status = 504
    type = "server_error"
    code = "timeout"


def from_upstream(status: int, payload: Any) -> GatewayError:
    """Turn a llama-server error answer into OpenAI's shape.

    llama-server sends ``{"error": {"code": 400, "message": ..., "type": ...}}``:
    ``code`` is the HTTP status as an int and ``param`` is missing. OpenAI clients
    expect ``code`` to be a string or null, so an int code is dropped.

    Args:
        status: The backend's HTTP status.
        payload: The backend's decoded JSON body, or anything else it sent.
    """
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {}
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"The backend answered with HTTP {status}."
    code = error.get("code")
    param = error.get("param")
    kind = error.get("type")
    if not isinstance(kind, str):
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return GatewayError(
        message,
        type=kind,
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
        status=status if 400 <= status < 600 else 502,
    )


# --- the one mapping: what backends say and do, as the client's errors ---------------------

class Phase(enum.Enum):
    """How far a backend request had come when it failed: the same failure means
    something else to the client at each step."""

    SENDING = "sending"  # no answer yet: nothing reached the client, another replica may take it
    WAITING = "waiting"  # the answer's headers came, not its first event (a stream's come at once)
    READING = "reading"  # the answer had begun: what the client has is incomplete


def stopped(cancelled: bool, client_gone: bool) -> GatewayError | None:
    """The error of a request the gateway itself ended (a cancel, a client that left), else None."""
    if cancelled:
        return RequestCancelledError()
    if client_gone:
        return ClientGoneError()
    return None


def failure_reason(failure: HTTPFailure) -> str:
    """A transport failure in a few words: a replica's ``detail``, and the client's message."""
    if isinstance(failure, ConnectTimedOut):
        return "connect timeout"
    if isinstance(failure, ConnectFailed):
        return "connection refused" if failure.refused else "unreachable"
    if isinstance(failure, ReadTimedOut):
        return "first byte timeout"
    return "connection reset"


def from_backend(failure: HTTPFailure | BackendAnswer, phase: Phase, *, backend: str, timeout: float = 0.0,
                 retry_after: str = "1", cancelled: bool = False, client_gone: bool = False) -> GatewayError:
    """The client's error for a backend request that failed (the table in the module's doc).

    Args:
        failure: The transport's failure, or the backend's error answer (status >= 400).
        phase: How far the request had come.
        backend: The backend's name, for the message.
        timeout: The read timeout that ran: first_byte before the answer's first
            event, idle after it.
        retry_after: The ``Retry-After`` of a 503.
        cancelled: The gateway cut the connection for a cancel.
        client_gone: The gateway cut it because the client left.
    """
    ended = stopped(cancelled, client_gone)
    if ended is not None:
        return ended
    if not isinstance(failure, HTTPFailure):
        return _from_backend_status(failure, retry_after)
    if isinstance(failure, ReadTimedOut):
        if phase is Phase.READING:
            return GatewayTimeoutError(f"The backend sent nothing for {timeout:g} s; the answer was abandoned.")
        return GatewayTimeoutError(f"The backend {backend} did not start answering within {timeout:g} s.")
    if phase is Phase.SENDING:
        return ServiceUnavailableError(f"The backend {backend} is unreachable ({failure_reason(failure)}); "
                                       "try again shortly.", headers={"Retry-After": retry_after})
    return UpstreamError("The connection to the backend broke mid-answer; the answer is incomplete.")


def _from_backend_status(resp: BackendAnswer, retry_after: str) -> GatewayError:
    """A backend's error answer (status >= 400) as the client's error."""
    try:
        payload = resp.json()
    except (ValueError, HTTPFailure):
        payload = None
    if resp.status in (401, 403):
        # The backend refused the gateway's own credentials (backends.<name>.api_key),
        # not the client's: a gateway fault.
        return UpstreamError("The backend refused the gateway's credentials; check the backend's api_key.",
                             code="backend_auth_failed")
    error = from_upstream(resp.status, payload)
    if error.status == 503:
        error.headers["Retry-After"] = retry_after
    return error


def queue_full(backend: str, mine: bool) -> ServiceUnavailableError:
    """No place left in a backend's admission queue, for everyone or for this client."""
    message = (f"Too many of your requests are waiting for the backend {backend}; try again shortly." if mine
               else f"The backend {backend} is at capacity and its queue is full; try again shortly.")
    return ServiceUnavailableError(message, code="queue_full", headers={"Retry-After": "1"})


def queue_timeout(backend: str, seconds: float) -> ServiceUnavailableError:
    """A request waited ``seconds`` in a backend's admission queue, in vain."""
    return ServiceUnavailableError(f"The backend {backend} stayed at capacity for {seconds:g} s; try again shortly.",
                                   code="queue_timeout", headers={"Retry-After": "1"})
