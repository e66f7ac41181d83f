"""A worker's side of the fleet: leases on launched models, and the operator's calls.

Under gunicorn's gevent worker the socket module is patched, so waiting for a model
to load sleeps this request's greenlet only, never the hub. A lease is a connection:
:meth:`Hold.release` closes it, and a worker that dies closes it too.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

from .. import settings
from ..errors import GatewayError, GatewayTimeoutError, ModelUnavailableError

CONNECT_PATIENCE = 10.0  # seconds to wait for a supervisor that is still starting
MAX_LINE = 1 << 20


class Hold:
    """A lease on a launched backend: while it is open the supervisor keeps the model
    resident (and counts it busy). ``report`` says whether this request waited for a
    load: ``load_seconds``, ``swap``, ``restart`` (the first request after a start only)."""

    def __init__(self, sock: socket.socket, report: dict[str, Any]) -> None:
        self.sock = sock
        self.report = report

    def release(self) -> None:
        self.sock.close()


def socket_path() -> str:
    path = settings.current().fleet_socket
    if not path:
        raise ModelUnavailableError("This model is launched by the gateway's fleet, but no fleet supervisor runs "
                                    "(start the gateway with gunicorn.conf.py: `llamagate serve`).")
    return path


def _connect(timeout: float) -> socket.socket:
    path = socket_path()
    deadline = time.monotonic() + min(timeout, CONNECT_PATIENCE)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise ModelUnavailableError("The gateway's fleet supervisor does not answer; try again shortly.",
                                            headers={"Retry-After": "5"}) from None
            time.sleep(0.1)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            break
    return data


def acquire(backend: str, timeout: float, set_wake: Callable[[Callable[[], None] | None], None],
            stopped: Callable[[], GatewayError | None], check: bool = False) -> Hold:
    """Wait until ``backend``'s llama-servers are ready (the supervisor starts them, or
    swaps another model out, if need be) and lease them.

    Args:
        backend: A launched backend's name.
        timeout: Seconds to wait for the load.
        set_wake: Given a function that ends the wait (or None when it is over): a cancel
            calls it.
        stopped: The error that ends a cancelled request, else None.
        check: A llama-server of the backend just refused a connection: the supervisor
            looks whether it died (then the request waits for the restart).

    Raises:
        ModelUnavailableError: the model failed to start (or the supervisor is gone).
        GatewayTimeoutError: it did not load within ``timeout``.
    """
    sock = _connect(timeout)

    def wake() -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    set_wake(wake)
    try:
        sock.sendall(json.dumps({"op": "acquire", "backend": backend, "check": check}).encode() + b"\n")
        line = _read_line(sock)
    except socket.timeout:
        sock.close()
        raise GatewayTimeoutError(f"The model of backend {backend} did not load within {timeout:g} s.") from None
    except OSError:
        line = b""
    finally:
        set_wake(None)
    error = stopped()
    if error is not None or not line:
        sock.close()
        if error is not None:
            raise error
        raise ModelUnavailableError("The gateway's fleet supervisor went away; try again shortly.",
                                    headers={"Retry-After": "5"})
    answer = json.loads(line)
    if not answer.get("ok"):
        sock.close()
        raise ModelUnavailableError(answer.get("reason") or "The model cannot start.", headers={"Retry-After": "30"})
    sock.settimeout(None)
    return Hold(sock, {k: v for k, v in answer.items() if k != "ok"})


def call(op: str, backend: str | None = None, timeout: float = 300) -> dict[str, Any]:
    """One operator call: ``status``, ``load`` or ``unload`` (these two wait until done).

    Raises:
        ModelUnavailableError: no supervisor answers.
        KeyError: no launched backend of that name.
    """
    sock = _connect(timeout + 5)
    try:
        sock.sendall(json.dumps({"op": op, "backend": backend, "timeout": timeout}).encode() + b"\n")
        line = _read_line(sock)
    finally:
        sock.close()
    if not line:
        raise ModelUnavailableError("The gateway's fleet supervisor went away; try again shortly.")
    answer = json.loads(line)
    if answer.get("error") == "not_found":
        raise KeyError(backend)
    return answer
