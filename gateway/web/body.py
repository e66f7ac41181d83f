"""Reading a request body: bounded in size, in time and in nesting.

The body is read only after the pipeline's ``request_start`` hooks accepted the
request, so a client without a key never makes the gateway read or parse one. A
client that sent ``Expect: 100-continue`` is invited to send its body only then
(the worker holds gunicorn's own ``100 Continue`` back), and never when its
``Content-Length`` is over the limit. Such a body is refused unread; the worker then
discards it within bounds (``lifecycle.DISCARD_ALLOWANCE``, ``gateway.web.worker.linger``) so that the
client, still sending it, reads its 413 instead of a reset.

Time: gunicorn's worker puts a timeout on each socket read, which a client defeats
by trickling one byte at a time. Here the whole body must arrive within
``body_timeout``, and at ``body_min_rate`` bytes per second after a short grace;
under gevent a ``gevent.Timeout`` enforces it however the reads are split.
"""

from __future__ import annotations

import json
import time
from typing import Any

import falcon

from .. import lifecycle
from ..config import Config
from ..context import RequestContext
from ..errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError

CHUNK = 16384
GRACE = 2.0  # seconds before the minimum rate applies
# The worker marks requests that expect "100 Continue" and leaves sending it to us.
INVITE_HEADER = "HTTP_LLAMAGATE_EXPECT_CONTINUE"
# How much of a body refused by size the worker may discard after the 413 so that the
# client, still sending it, can read its answer: times max_body_bytes (lifecycle.DISCARD_ALLOWANCE).
DISCARD_FACTOR = 16  # times max_body_bytes: 64 MiB by default


def gevent_patched() -> bool:
    """Whether gevent patched the standard library (a gunicorn gevent worker): only then
    is there a hub to interrupt a blocked read or to watch a socket."""
    from gevent import monkey

    return monkey.is_module_patched("socket")


def gevent_timeout(seconds: float) -> Any:
    """A started ``gevent.Timeout`` under gevent, else None (a plain thread has no hub to
    interrupt its reads). The caller closes it, and recognises it by identity when it fires."""
    if not gevent_patched():
        return None
    from gevent import Timeout

    timer = Timeout(max(0.001, seconds))
    timer.start()
    return timer


def _invite(req: falcon.Request) -> None:
    """Send ``100 Continue`` to a client that waits for it before sending its body."""
    if req.env.get(INVITE_HEADER) == "1":
        sock = req.env.get("gunicorn.socket")
        if sock is not None:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        req.env[INVITE_HEADER] = "sent"


def read_body(req: falcon.Request, ctx: RequestContext, config: Config) -> bytes:
    """The request body, read without taking more than ``config.max_body_bytes`` or
    more time than its size deserves.

    Raises:
        PayloadTooLargeError: the body is over the limit (from Content-Length: unread).
        RequestTimeoutError: the body did not arrive in time.
    """
    max_bytes = config.max_body_bytes
    length = req.content_length
    if length is not None and length > max_bytes:
        # accepted by request_start (authenticated): let it finish sending within the
        # bounds of a body, so that its kernel is not reset under its 413
        req.env[lifecycle.DISCARD_ALLOWANCE] = (min(length, DISCARD_FACTOR * max_bytes), config.body_timeout)
        raise PayloadTooLargeError(f"The request body is {length} bytes; the limit is {max_bytes} bytes.")
    if length == 0:
        return b""
    _invite(req)
    # Without Content-Length (chunked upload) read one byte past the limit to see it.
    stream = req.bounded_stream if length is not None else req.stream
    wanted = length if length is not None else max_bytes + 1
    start = time.monotonic()
    parts: list[bytes] = []
    received = 0
    while received < wanted:
        size = min(CHUNK, wanted - received)
        # This chunk must arrive by the time the minimum rate says, and within the total.
        due = start + min(config.body_timeout, GRACE + (received + size) / config.body_min_rate)
        timer = gevent_timeout(due - time.monotonic())
        try:
            data = stream.read(size)
        except TimeoutError:
            raise _too_slow(received) from None
        except BaseException as exc:
            if timer is not None and exc is timer:
                raise _too_slow(received) from None
            raise
        finally:
            if timer is not None:
                timer.close()
        if not data:
            break
        parts.append(data)
        received += len(data)
        if time.monotonic() > due:
            raise _too_slow(received)
    body = b"".join(parts)
    ctx.bytes_in = len(body)
    if len(body) > max_bytes:
        raise PayloadTooLargeError(f"The request body is larger than the limit of {max_bytes} bytes.")
    return body


def _too_slow(received: int) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request body did not arrive in time ({received} bytes received).")


def read_json_body(req: falcon.Request, ctx: RequestContext, config: Config) -> dict[str, Any]:
    """The request's JSON object; see :func:`read_body`.

    Raises:
        InvalidRequestError: no body, not JSON, not an object, or nested too deeply.
    """
    data = read_body(req, ctx, config)
    if not data:
        raise InvalidRequestError("The request has no body; send a JSON object.")
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    except ValueError as exc:
        raise InvalidRequestError(f"We could not parse the JSON body of your request: {exc}.") from None
    except RecursionError:
        raise InvalidRequestError("The JSON body of your request is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"The request body must be a JSON object, not {type(body).__name__}.")
    if json_depth(body) > config.max_json_depth:
        raise InvalidRequestError(f"The JSON body is nested deeper than {config.max_json_depth} levels.")
    return body


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
