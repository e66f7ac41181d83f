"""The in-process harness: a pipeline of plugins in front of a scriptable fake
llama-server (:class:`FakeBackend`), each request returning a :class:`Result`."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..answers import choice_text
from ..hookspecs import hookimpl
from .canned import _compact, _json, canned_llama_app
from .documents import openai_routes, pipelines_doc, url_backend
from .server import serve_in_thread


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

        from ..web.app import build_app
        from ..web.state import Gateway
        from ..config import parse_config
        from ..pipeline import Pipeline

        self.model = model
        self.backend = FakeBackend() if backend_url is None else None
        url = backend_url or self.backend.url  # type: ignore[union-attr]
        config = dict(config or {})
        routes = {**openai_routes("test"), **config.pop("routes", {})}
        doc = pipelines_doc({"test": url_backend(url)}, {model: "test"}, pipeline_name="test", routes=routes, **config)
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

    def wants_events(self, route: str = "/v1/chat/completions", **fields: Any) -> bool:
        """Whether the pipeline decodes a stream's events for a request like this one
        (``fields``: more :class:`gateway.plugin.RequestContext` fields, e.g. ``body``):
        some plugin's ``response_event`` wants them (``Plugin.wants_events``). A stream
        no plugin wants is relayed as raw bytes."""
        from ..context import RequestContext

        ctx = RequestContext(request_id="harness", method="POST", route=route, stream=True, **fields)
        return self.gateway.pipelines["test"].wants_events(ctx)

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
