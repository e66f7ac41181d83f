"""Testing the gateway and plugins, in a few lines of pytest.

:class:`Harness` runs a pipeline of your plugins in-process (Falcon's test client)
in front of a backend: by default a :class:`FakeBackend` that answers like
llama-server and can be scripted answer by answer; or any real llama-server URL.
Each request returns a :class:`Result` with the status, headers, JSON body,
decoded stream events, and what ``complete`` saw (outcome and context)::

    from gateway.testing import Harness

    def test_my_plugin():
        with Harness([MyPlugin({"option": 1})]) as harness:
            harness.backend.script({"json": {"choices": [...]}})   # optional
            result = harness.chat("Hello", stream=True)
            assert result.status == 200 and result.outcome == "ok"
            assert result.text == "..."

:func:`canned_llama_app` is the WSGI app behind the fake backend (llama-server's
JSON and SSE shapes and quirks: its own model name, no ``logprobs``, int error
codes), and :func:`serve_in_thread` runs any WSGI app on a free loopback port.

A request body may steer the canned answer with a ``"canned"`` object (the
gateway passes unknown fields through):

* ``status``: answer with this HTTP status and a llama-server style error;
* ``events``: how many content events a stream has (default: one per word);
* ``cut_after``: end a stream after this many events, without ``[DONE]``;
* ``delay``: seconds to wait before each event;
* ``first_delay``: seconds to wait before answering at all (before the headers);
* ``text``: the answer's text (default ``"Hello from the canned backend"``);
* ``tool_calls``: chat only, a list of ``{"name", "arguments"}``: the answer calls these
  tools (``finish_reason: tool_calls``, no content unless ``text`` is given); a stream
  sends each call as llama-server does, a first delta with ``index``, ``id``, ``type``
  and the name, then its arguments in three fragments.

Other body fields it honours, like llama-server: ``logprobs`` (chat ``true``, with
``top_logprobs`` alternatives; completions a number of alternatives) adds logprobs in
llama-server's shape (``{"content": [{"id", "token", "bytes", "logprob",
"top_logprobs"}]}``, on each content chunk of a stream); ``timings_per_token`` puts a
``timings`` object (``prompt_n``, ``cache_n``, ``predicted_n`` so far) on every chunk
and on a whole answer; ``n`` > 1 gets ``n`` choices: a whole answer's ``usage``
counts the completion of one choice only, and a stream interleaves the choices'
chunks and (with ``stream_options.include_usage``) sends one usage chunk per choice,
each counting that choice's completion.

``/tokenize`` counts one token per word; ``/props`` reports 64 slots.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from .answers import choice_text
from .hookspecs import hookimpl

CANNED_MODEL = "canned-model.gguf"
CANNED_TEXT = "Hello from the canned backend"
CANNED_SLOTS = 64  # what /props reports: a fast canned backend takes many requests at once


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = _compact(body)
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _compact(data: dict[str, Any]) -> bytes:
    # llama-server writes compact JSON.
    return json.dumps(data, separators=(",", ":")).encode()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs_entry(piece: str, position: int, top: int) -> dict[str, Any]:
    """One token's logprobs in llama-server's shape (alternatives: the token, then ``" alt1"``...)."""
    logprob = -0.25 - 0.125 * position
    alternatives = [(position, piece, logprob)] + [(1000 + k, f" alt{k}", logprob - k) for k in range(1, top)]
    return {"id": position, "token": piece, "bytes": list(piece.encode()), "logprob": logprob,
            "top_logprobs": [{"id": i, "token": t, "bytes": list(t.encode()), "logprob": lp}
                             for i, t, lp in alternatives[:top]]}


def _logprobs_top(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request asked for, or None for no logprobs."""
    logprobs = body.get("logprobs")
    if not logprobs:
        return None
    if chat:
        return int(body.get("top_logprobs") or 0)
    return logprobs if isinstance(logprobs, int) and not isinstance(logprobs, bool) else 0


def _timings(predicted: int) -> dict[str, int]:
    return {"prompt_n": 5, "cache_n": 0, "predicted_n": predicted}


def _tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """llama-server's tool-call deltas: per call the name first, then the arguments in fragments."""
    deltas = []
    for i, call in enumerate(calls):
        deltas.append({"index": i, "id": f"call_canned_{i}", "type": "function",
                       "function": {"name": call["name"], "arguments": ""}})
        arguments = call.get("arguments", "")
        size = max(1, -(-len(arguments) // 3))
        deltas.extend({"index": i, "function": {"arguments": arguments[k:k + size]}}
                      for k in range(0, len(arguments), size))
    return deltas


def canned_llama_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app imitating llama-server's OpenAI routes and ``/health``."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return _json(start_response, "200 OK", {"status": "ok"})
    if path == "/props":
        return _json(start_response, "200 OK", {"total_slots": CANNED_SLOTS,
                                                 "default_generation_settings": {"n_ctx": 4096}})
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
    if path == "/tokenize":
        return _json(start_response, "200 OK", {"tokens": list(range(len(str(body.get("content", "")).split())))})
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
    calls = script.get("tool_calls") if chat else None
    if calls and "text" not in script:
        words = []
    top = _logprobs_top(body, chat)
    pieces = [word if n == 0 else " " + word for n, word in enumerate(words)]
    if not body.get("stream"):
        # Like llama-server: n choices, but usage counts the completion of one only.
        choices = []
        for i in range(int(body.get("n") or 1)):
            choice: dict[str, Any] = {"index": i, "finish_reason": "tool_calls" if calls else "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text if pieces else None}
                if calls:
                    choice["message"]["tool_calls"] = [
                        {"id": f"call_canned_{k}", "type": "function",
                         "function": {"name": c["name"], "arguments": c.get("arguments", "")}}
                        for k, c in enumerate(calls)]
            else:
                choice["text"] = text
            if top is not None:
                choice["logprobs"] = {"content": [_logprobs_entry(p, n, top) for n, p in enumerate(pieces)]}
            choices.append(choice)
        answer = dict(base, object="chat.completion" if chat else "text_completion",
                      choices=choices, usage=_usage(5, len(words)))
        if body.get("timings_per_token"):
            answer["timings"] = _timings(len(words))
        return _json(start_response, "200 OK", answer)
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    if "events" in script:
        pieces = pieces[: int(script.get("events", 3))]
    return _events(base, chat, pieces, body, script, calls or [], top)


def _events(base: dict[str, Any], chat: bool, pieces: list[str], body: dict[str, Any],
            script: dict[str, Any], calls: list[dict[str, Any]], top: int | None) -> Iterable[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    delay = float(script.get("delay", 0))
    cut_after = script.get("cut_after")
    n_choices = int(body.get("n") or 1)
    timings = bool(body.get("timings_per_token"))
    # One step per token: content pieces, then tool-call deltas; each choice takes every step.
    steps: list[tuple[str, Any]] = [("content", p) for p in pieces] + [("tool", d) for d in _tool_call_deltas(calls)]

    def event(choices: list[dict[str, Any]], produced: int, **extra: Any) -> bytes:
        data = dict(base, object=obj, choices=choices, **extra)
        if timings:
            data["timings"] = _timings(produced)
        return b"data: " + _compact(data) + b"\n\n"

    for n, (kind, value) in enumerate(steps):
        if cut_after is not None and n >= int(cut_after):
            return
        if delay:
            time.sleep(delay)
        for i in range(n_choices):
            if kind == "tool":
                choice: dict[str, Any] = {"index": i, "finish_reason": None, "delta": {"tool_calls": [value]}}
            elif chat:
                choice = {"index": i, "finish_reason": None, "delta": {"content": value}}
            else:
                choice = {"index": i, "finish_reason": None, "text": value, "logprobs": None}
            if kind == "content" and top is not None:
                choice["logprobs"] = {"content": [_logprobs_entry(value, n, top)]}
            yield event([choice], n + 1)
    for i in range(n_choices):
        last = ({"index": i, "finish_reason": "tool_calls" if calls else "stop", "delta": {}} if chat
                else {"index": i, "finish_reason": "stop", "text": "", "logprobs": None})
        yield event([last], len(steps))
        if (body.get("stream_options") or {}).get("include_usage"):
            # like llama-server: one usage chunk per choice, each counting that choice
            yield event([], len(steps), usage=_usage(5, len(steps)))
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


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that closes a keep-alive connection is not news


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
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


class FakeBackend:
    """A llama-server stand-in on a loopback port, scriptable answer by answer.

    Each :meth:`script` call queues answers; a request takes the next one, or gets
    the canned answer when the queue is empty. An answer is a dict with

    * ``json``: a JSON body (``status`` defaults to 200);
    * ``events``: SSE events to stream (dicts, sent as ``data: {...}``), then
      ``data: [DONE]`` unless ``done`` is False;
    * ``status``: the HTTP status.

    Attributes:
        url: Base URL to configure as a backend.
        requests: ``(method, path, body)`` of every request received, decoded JSON bodies.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server, self.url = serve_in_thread(self._app)

    def script(self, *answers: dict[str, Any]) -> None:
        with self._lock:
            self._queue.extend(answers)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return canned_llama_app(environ, start_response)
        raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append((environ["REQUEST_METHOD"], path, body))
        with self._lock:
            answer = self._queue.pop(0) if self._queue else None
        if answer is None:
            environ["wsgi.input"] = io.BytesIO(raw)
            environ["CONTENT_LENGTH"] = str(len(raw))
            return canned_llama_app(environ, start_response)
        status = int(answer.get("status", 200))
        if "events" in answer:
            start_response(f"{status} Scripted", [("Content-Type", "text/event-stream")])
            chunks = [b"data: " + _compact(e) + b"\n\n" if isinstance(e, dict) else e.encode() for e in answer["events"]]
            return chunks + ([b"data: [DONE]\n\n"] if answer.get("done", True) else [])
        return _json(start_response, f"{status} Scripted", answer.get("json", {}))

    def close(self) -> None:
        self._server.shutdown()


@dataclass
class Result:
    """One request through a :class:`Harness`.

    Attributes:
        status: HTTP status.
        headers: Response headers (lower-case names).
        body: The raw body.
        json: The decoded JSON body, or None (a stream).
        events: A stream's decoded ``data:`` events, ``[DONE]`` excluded.
        done: Whether the stream ended with ``data: [DONE]``.
        outcome: What ``complete`` was told: ``ok``, ``error``, ``client_gone``, ``cancelled``.
        ctx: The request's context as ``complete`` saw it.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    json: Any = None
    events: list[Any] = field(default_factory=list)
    done: bool = False
    outcome: str | None = None
    ctx: Any = None

    @property
    def text(self) -> str:
        """The answer's text: a chat message or completion, streamed or not."""
        if self.events:
            return "".join(choice_text(choice) for event in self.events if isinstance(event, dict)
                           for choice in event.get("choices") or [])
        return choice_text((self.json or {}).get("choices", [{}])[0])


class _Recorder:
    """Registered after the plugins under test: keeps what ``complete`` saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, str]] = []

    @hookimpl
    def complete(self, ctx: Any, outcome: str) -> None:
        self.seen.append((ctx, outcome))


class Harness:
    """A pipeline of ``plugins`` in front of a backend, in-process.

    Args:
        plugins: Plugin instances (or ``(label, instance)`` pairs), in call order.
        backend_url: A real llama-server to use; default: a new :class:`FakeBackend`.
        config: ``pipelines.yaml`` keys to add or replace (e.g. ``timeouts``); its
            ``routes`` are added to the four OpenAI routes (e.g. a plugin route).
        model: The public model id served (``test-model``).
    """

    def __init__(self, plugins: list[Any], *, backend_url: str | None = None,
                 config: dict[str, Any] | None = None, model: str = "test-model") -> None:
        import falcon.testing

        from .app import build_app
        from .state import Gateway
        from .config import parse_config
        from .pipeline import Pipeline

        self.model = model
        self.backend = FakeBackend() if backend_url is None else None
        url = backend_url or self.backend.url  # type: ignore[union-attr]
        doc: dict[str, Any] = {
            "backends": {"test": {"urls": [url]}},
            "models": {model: {"backend": "test"}},
            "pipelines": {"test": []},
            "routes": {route: "test" for route in
                       ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")},
        }
        config = dict(config or {})
        doc["routes"].update(config.pop("routes", {}))
        doc.update(config)
        self._recorder = _Recorder()
        labelled = [p if isinstance(p, tuple) else (type(p).__module__ + "." + type(p).__name__, p) for p in plugins]
        self.gateway = Gateway(parse_config(doc, file="<harness>"),
                               {"test": Pipeline("test", labelled + [("harness.recorder", self._recorder)])})
        self.client = falcon.testing.TestClient(build_app(self.gateway))

    def request(self, method: str, route: str, json: Any = None, headers: dict[str, str] | None = None) -> Result:
        """Send one request; the answer is read whole, then ``complete`` has run."""
        before = len(self._recorder.seen)
        resp = self.client.simulate_request(method, route, json=json, headers=headers)
        result = Result(status=resp.status_code, headers={k.lower(): v for k, v in resp.headers.items()},
                        body=resp.content)
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            blocks = [b[len("data: "):] for b in resp.text.split("\n\n") if b.startswith("data: ")]
            result.done = bool(blocks) and blocks[-1] == "[DONE]"
            result.events = [_json_or_text(b) for b in blocks if b != "[DONE]"]
        elif resp.content:
            result.json = _json_or_text(resp.text)
        if len(self._recorder.seen) > before:
            result.ctx, result.outcome = self._recorder.seen[-1]
        return result

    def chat(self, content: str = "Hello", *, headers: dict[str, str] | None = None, **body: Any) -> Result:
        """``POST /v1/chat/completions`` with one user message; ``body`` adds fields."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}], **body}
        return self.request("POST", "/v1/chat/completions", json=payload, headers=headers)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
