"""Serving a WSGI app on a free loopback port, from threads, the way llama-server
talks HTTP: keep-alive, and chunked transfer encoding for answers of unknown length."""

from __future__ import annotations

import io
import random
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable


class _ChunkedWSGIHandler(BaseHTTPRequestHandler):
    """A minimal HTTP/1.1 WSGI server handler that streams like llama-server does:
    keep-alive, and chunked transfer encoding when the app sets no Content-Length,
    so each yielded piece leaves as its own chunk."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # like llama-server: each write leaves at once
    app: Callable[..., Iterable[bytes]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        environ = {
            "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "CONTENT_LENGTH": self.headers.get("Content-Length", ""), "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "wsgi.input": self.rfile, "wsgi.errors": sys.stderr, "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        length = int(environ["CONTENT_LENGTH"] or 0)
        body = self.rfile.read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        state: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            state["status"], state["headers"] = status, headers
            return lambda data: None

        result = self.app(environ, start_response)
        try:
            code, _, reason = state["status"].partition(" ")
            self.send_response(int(code), reason)
            chunked = not any(name.lower() == "content-length" for name, _ in state["headers"])
            for name, value in state["headers"]:
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for data in result:
                if not data:
                    continue
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except OSError:  # the gateway went away (a cancel, a disconnect)
            self.close_connection = True
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that closes a keep-alive connection is not news


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> range:
    """``count`` consecutive TCP ports on 127.0.0.1 that nothing listens on right now,
    below the kernel's ephemeral range (where outgoing connections take their local
    ports, so a port found free there may be taken a moment later)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            ephemeral = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(200):
        first = random.randrange(10000, ephemeral - count)
        probes: list[socket.socket] = []
        try:
            for port in range(first, first + count):  # all held at once, then let go
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return range(first, first + count)
    raise RuntimeError(f"no {count} consecutive free ports below {ephemeral}")


def serve_in_thread(app: Callable[..., Iterable[bytes]]) -> tuple[ThreadingHTTPServer, str]:
    """Serve a WSGI ``app`` over HTTP/1.1 on a free loopback port from daemon threads.

    Returns:
        The server (call ``shutdown()`` to stop it) and its base URL.
    """
    handler = type("Handler", (_ChunkedWSGIHandler,), {"app": staticmethod(app)})
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"
