"""The gunicorn worker Llamagate runs: gunicorn's gevent worker, plus

* errors gunicorn answers itself (a header too large, a malformed request line)
  in OpenAI's JSON shape instead of HTML;
* a read/write timeout on every client socket (``GATEWAY_CLIENT_TIMEOUT``, 30 s):
  a client that trickles its body gets 408, one that stops reading a stream is
  dropped, and neither holds a backend slot for long. A client that trickles its
  headers is dropped by gunicorn itself after ``keepalive`` seconds;
* ``Expect: 100-continue`` answered by the app, not by gunicorn: only once the
  request was authenticated and its size accepted (``gateway.body``), so a
  refused request never invites its body;
* a connection whose request body the app left unread (a 401 before the body,
  a 413 from Content-Length) is closed after its answer, which says
  ``Connection: close``, instead of drained: draining would let a client that
  trickles a body hold the connection, and the worker's attention, after its answer;
* on SIGTERM from a stopping master the gateway drains: new requests get 503 with
  ``Retry-After`` while the ones in flight finish within ``graceful_timeout``; a
  worker replaced by a reload (HUP) finishes its requests and keeps serving
  what still reaches it, so a reload fails nothing.
"""

from __future__ import annotations

import json
import os

from gunicorn import util
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from . import lifecycle, settings

# gunicorn's name for the header the app reads as body.INVITE_HEADER.
INVITE_HEADER = "LLAMAGATE-EXPECT-CONTINUE"


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, answering in OpenAI's error shape."""
    body = json.dumps({"error": {
        "message": f"{reason}: {mesg}" if mesg else reason,
        "type": "invalid_request_error" if status_int < 500 else "server_error",
        "param": None,
        "code": None,
    }})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, (head + body).encode("latin1"))


class Worker(GeventWorker):
    def init_process(self) -> None:
        util.write_error = write_json_error
        super().init_process()

    def handle(self, listener, client, addr) -> None:
        # GeventWorker.handle makes the socket blocking without a timeout; give it one.
        client.setblocking(1)
        client.settimeout(settings.current().client_timeout)
        AsyncWorker.handle(self, listener, client, addr)

    def handle_request(self, listener_name, req, sock, addr):
        # Whoever sends this header, only the worker decides whether it is set.
        req.headers = [(name, value) for name, value in req.headers if name != INVITE_HEADER]
        if getattr(req, "_expected_100_continue", False):
            req._expected_100_continue = False  # the app sends it when it wants the body
            req.headers.append((INVITE_HEADER, "1"))
        return super().handle_request(listener_name, req, sock, addr)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = ClosingUnreadBodies(self.wsgi)

    def handle_exit(self, sig, frame) -> None:
        # SIGTERM comes when the master stops (it closed its listening sockets just
        # before) and when a reload replaces this worker (the master keeps listening
        # and new workers take the new connections). Only a stop refuses new requests:
        # during a reload this worker serves what still reaches it, so nothing fails.
        lifecycle.draining = not self._master_listening()
        super().handle_exit(sig, frame)

    def _master_listening(self) -> bool:
        """Whether the master still holds our listening sockets open (Linux /proc)."""
        ours = {f"socket:[{os.fstat(listener.fileno()).st_ino}]" for listener in self.sockets}
        fd_dir = f"/proc/{self.ppid}/fd"
        try:
            return any(os.readlink(os.path.join(fd_dir, fd)) in ours for fd in os.listdir(fd_dir))
        except OSError:
            return False


class ClosingUnreadBodies:
    """The app as the worker calls it: when the app answers without having read the
    request's body, gunicorn is told to close the connection (``must_close``) before the
    headers go out, so they say ``Connection: close`` and no pipelined request is lost.
    gunicorn ignores a ``Connection`` header the app sets itself."""

    def __init__(self, app) -> None:
        self.app = app

    def __getattr__(self, name):  # the app's own attributes (shutdown, gateway)
        return getattr(self.app, name)

    def __call__(self, environ, start_response):
        def start(status, headers, exc_info=None):
            response = getattr(start_response, "__self__", None)  # gunicorn's Response
            if response is not None and body_left_unread(environ.get("wsgi.input")):
                response.force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def body_left_unread(body) -> bool:
    """Whether some of a request's body (gunicorn's ``wsgi.input``) is still on the wire."""
    reader = getattr(body, "reader", None)
    if reader is None:
        return False
    if hasattr(reader, "length"):  # Content-Length
        return reader.length > 0
    if hasattr(reader, "finished"):  # read until the connection closes
        return not reader.finished
    return getattr(reader, "parser", None) is not None  # chunked
