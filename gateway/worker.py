"""The gunicorn worker Llamagate runs: gunicorn's gevent worker, plus

* errors gunicorn answers itself (a header too large, a malformed request line)
  in OpenAI's JSON shape instead of HTML;
* a read/write timeout on every client socket (``GATEWAY_CLIENT_TIMEOUT``, 30 s):
  a client that trickles its body gets 408, one that stops reading a stream is
  dropped, and neither holds a backend slot for long. A client that trickles its
  headers is dropped by gunicorn itself after ``keepalive`` seconds;
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

from . import lifecycle

CLIENT_TIMEOUT = float(os.environ.get("GATEWAY_CLIENT_TIMEOUT", "30"))


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
        client.settimeout(CLIENT_TIMEOUT)
        AsyncWorker.handle(self, listener, client, addr)

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
