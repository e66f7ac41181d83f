"""Helpers for testing the gateway and its plugins without a model.

:func:`canned_llama_app` is a WSGI app that answers like llama-server (its JSON
and SSE shapes, its quirks: its own model name, no ``logprobs``, int error codes)
with canned text, fast. :func:`serve_in_thread` runs any WSGI app on a free
loopback port.

A request body may steer the canned answer with a ``"canned"`` object (the
gateway passes unknown fields through):

* ``status``: answer with this HTTP status and a llama-server style error;
* ``events``: how many content events a stream has (default 3);
* ``cut_after``: end a stream after this many events, without ``[DONE]``;
* ``delay``: seconds to wait before each event;
* ``first_delay``: seconds to wait before answering at all (before the headers);
* ``text``: the answer's text (default ``"Hello from the canned backend"``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import io
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

CANNED_MODEL = "canned-model.gguf"
CANNED_TEXT = "Hello from the canned backend"


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = _compact(body)
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _compact(data: dict[str, Any]) -> bytes:
    # llama-server writes compact JSON.
    return json.dumps(data, separators=(",", ":")).encode()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def canned_llama_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app imitating llama-server's OpenAI routes and ``/health``."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return _json(start_response, "200 OK", {"status": "ok"})
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        return _json(start_response, "400 Bad Request",
                     {"error": {"code": 400, "message": "invalid JSON", "type": "invalid_request_error"}})
    script = body.get("canned") or {}
    if "status" in script:
        status = int(script["status"])
        return _json(start_response, f"{status} Canned",
                     {"error": {"code": status, "message": f"canned error {status}", "type": "server_error"}})
    if script.get("first_delay"):
        time.sleep(float(script["first_delay"]))
    request_id = environ.get("HTTP_X_REQUEST_ID", "")
    text = script.get("text", CANNED_TEXT)
    words = text.split(" ")
    if path == "/v1/embeddings":
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        return _json(start_response, "200 OK", {
            "model": CANNED_MODEL, "object": "list", "usage": _usage(len(inputs), 0),
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
        })
    chat = path == "/v1/chat/completions"
    if not chat and path != "/v1/completions":
        return _json(start_response, "404 Not Found",
                     {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
    base = {"id": "chatcmpl-canned", "created": 1700000000, "model": CANNED_MODEL,
            "system_fingerprint": request_id}
    if not body.get("stream"):
        choice = ({"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                  if chat else {"index": 0, "finish_reason": "stop", "text": text})
        return _json(start_response, "200 OK", dict(base, object="chat.completion" if chat else "text_completion",
                                                    choices=[choice], usage=_usage(5, len(words))))
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    return _events(base, chat, words[: int(script.get("events", 3))] if "events" in script else words, body, script)


def _events(base: dict[str, Any], chat: bool, words: list[str], body: dict[str, Any],
            script: dict[str, Any]) -> Iterable[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    delay = float(script.get("delay", 0))
    cut_after = script.get("cut_after")
    for n, word in enumerate(words):
        if cut_after is not None and n >= int(cut_after):
            return
        if delay:
            time.sleep(delay)
        piece = word if n == 0 else " " + word
        choice = ({"index": 0, "finish_reason": None, "delta": {"content": piece}} if chat
                  else {"index": 0, "finish_reason": None, "text": piece, "logprobs": None})
        yield b"data: " + _compact(dict(base, object=obj, choices=[choice])) + b"\n\n"
    last = ({"index": 0, "finish_reason": "stop", "delta": {}} if chat
            else {"index": 0, "finish_reason": "stop", "text": "", "logprobs": None})
    yield b"data: " + _compact(dict(base, object=obj, choices=[last])) + b"\n\n"
    if (body.get("stream_options") or {}).get("include_usage"):
        yield b"data: " + _compact(dict(base, object=obj, choices=[], usage=_usage(5, len(words)))) + b"\n\n"
    yield b"data: [DONE]\n\n"


class _ChunkedWSGIHandler(BaseHTTPRequestHandler):
    """A minimal HTTP/1.1 WSGI server handler that streams like llama-server does:
    keep-alive, and chunked transfer encoding when the app sets no Content-Length,
    so each yielded piece leaves as its own chunk."""

    protocol_version = "HTTP/1.1"
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_in_thread(app: Callable[..., Iterable[bytes]]) -> tuple[ThreadingHTTPServer, str]:
    """Serve a WSGI ``app`` over HTTP/1.1 on a free loopback port from daemon threads.

    Returns:
        The server (call ``shutdown()`` to stop it) and its base URL.
    """
    handler = type("Handler", (_ChunkedWSGIHandler,), {"app": staticmethod(app)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"
