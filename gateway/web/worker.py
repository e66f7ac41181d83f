"""The gunicorn worker Llamagate runs: gunicorn's gevent worker, plus

* errors gunicorn answers itself (a header too large, a malformed request line)
  in OpenAI's JSON shape instead of HTML;
* a read/write timeout on every client socket (``GATEWAY_CLIENT_TIMEOUT``, 30 s):
  a client that trickles its body gets 408, one that stops reading a stream is
  dropped, and neither holds a backend slot for long. A client that trickles its
  headers is dropped by gunicorn itself after ``keepalive`` seconds;
* ``Expect: 100-continue`` answered by the app, not by gunicorn: only once the
  request was authenticated and its size accepted (``gateway.web.body``), so a
  refused request never invites its body;
* a connection whose request body the app left unread (a 401 before the body,
  a 413 from Content-Length) is closed after its answer, which says
  ``Connection: close``, instead of drained: draining would let a client that
  trickles a body hold the connection, and the worker's attention, after its answer.
  The close lingers as nginx's does (:func:`linger`): closing with unread bytes
  makes the kernel reset the connection, and a client still sending its body may
  lose the answer with it (asyncio clients such as ``openai.AsyncOpenAI`` drop what
  they had not read yet, and on a lossy path the answer is never retransmitted).
  So the worker half-closes, discards what still arrives within tight bounds
  (``LINGER_BYTES``, ``LINGER_SECONDS``; a body refused by size after the request
  was accepted, up to what the app allows), waits until the client acknowledged
  the answer, and only then closes;
* on SIGTERM from a stopping master the gateway drains: new requests get 503 with
  ``Retry-After`` while the ones in flight finish within ``graceful_timeout``; a
  worker replaced by a reload (HUP) finishes its requests and keeps serving
  what still reaches it, so a reload fails nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import termios
import time

import gevent
from gunicorn import util
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from .. import lifecycle, settings

# gunicorn's name for the header the app reads as body.INVITE_HEADER.
INVITE_HEADER = "LLAMAGATE-EXPECT-CONTINUE"
# What a client's unread body may cost after its answer, whoever the client is: bytes
# discarded, and seconds in all (also the silence that ends any lingering).
LINGER_BYTES = 65536
LINGER_SECONDS = 2.0


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
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except StopIteration:  # the connection closes after this answer (gunicorn closes the socket)
            if body_left_unread(req.body):
                linger(sock, *getattr(req, "discard_allowance", None) or (LINGER_BYTES, LINGER_SECONDS))
            raise

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
                response.req.discard_allowance = environ.get(lifecycle.DISCARD_ALLOWANCE)  # for Worker.handle_request
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


def linger(sock: socket.socket, max_bytes: int, seconds: float) -> None:
    """Let the client read the answer just sent on a connection whose request body was
    left unread, before the socket is closed: half-close (the client sees the answer
    end), discard what still arrives until the client closes, ``max_bytes`` were
    discarded, ``seconds`` passed or it sent nothing for ``LINGER_SECONDS``; then wait
    (within ``seconds``) until the client's kernel acknowledged the answer, which a
    reset would otherwise destroy in flight."""
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    scratch = bytearray(65536)
    discarded = 0
    try:
        while discarded < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(min(left, LINGER_SECONDS))
            received = sock.recv_into(scratch, min(len(scratch), max_bytes - discarded))
            if not received:  # the client closed: it has what it wanted
                return
            discarded += received
    except OSError:  # quiet for too long, or reset
        pass
    while unacknowledged(sock) and time.monotonic() < deadline:
        gevent.sleep(0.01)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (Linux)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
