"""Response bodies: the WSGI iterable whose ``close()`` ends the request, and SSE relay.

A streamed answer is relayed event by event as llama-server sends it. Events are
framed (split on blank lines) so every event leaves whole, the ``model`` field is
rewritten to the public id with one regex per event, and the JSON is decoded only
when a plugin of the pipeline implements ``response_event`` (or the event carries
``usage``, which the gateway records).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable, Iterable, Iterator

import requests
from urllib3.exceptions import ReadTimeoutError

from .answers import normalize_event
from .config import Timeouts
from .context import RequestContext
from .errors import GatewayError, GatewayTimeoutError, UpstreamError, from_upstream

DONE = b"data: [DONE]\n\n"
_MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
_COMPACT = (",", ":")


def sse(data: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + json.dumps(data, separators=_COMPACT).encode() + b"\n\n"


def replay(events: Iterable[dict[str, Any]]) -> bytes:
    """A whole SSE stream, ``[DONE]`` included, from decoded events."""
    return b"".join(sse(event) for event in events) + DONE


class ResponseBody:
    """The WSGI response iterable.

    gunicorn calls ``close()`` after the last chunk, or when the client has gone
    (on the next write after the disconnect). ``close()`` runs ``on_close`` exactly
    once, with True when every chunk was sent.

    Args:
        ctx: The request; ``bytes_out`` and ``first_byte_at`` are kept up to date.
        chunks: The body's chunks.
        on_close: Called once with whether the body was sent completely.
    """

    def __init__(self, ctx: RequestContext, chunks: Iterable[bytes], on_close: Callable[[bool], None]) -> None:
        self._ctx = ctx
        self._chunks: Iterator[bytes] = iter(chunks)
        self._on_close = on_close
        self._sent_all = False
        self._closed = False

    def __iter__(self) -> ResponseBody:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._sent_all = True
            raise
        ctx = self._ctx
        if ctx.first_byte_at is None:
            ctx.first_byte_at = time.monotonic()
        ctx.bytes_out += len(chunk)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._on_close(self._sent_all)


def cancelled_error() -> GatewayError:
    return GatewayError("The request was cancelled.", type="invalid_request_error", code="request_cancelled",
                        status=499)


def read_error(ctx: RequestContext, exc: requests.RequestException, timeouts: Timeouts) -> GatewayError:
    """The client's error for a backend connection that failed while its answer was read."""
    if ctx.cancelled:
        return cancelled_error()
    # requests wraps urllib3's read timeout in a ConnectionError mid-body.
    if exc.args and isinstance(exc.args[0], ReadTimeoutError) or isinstance(exc, requests.Timeout):
        return GatewayTimeoutError(f"The backend sent nothing for {timeouts.idle:g} s; the answer was abandoned.")
    return UpstreamError("The connection to the backend broke mid-answer; the answer is incomplete.")


def _stream_error(ctx: RequestContext, error: GatewayError) -> bytes:
    ctx.error = error
    return sse(error.to_dict())


class Relay:
    """Relays one upstream SSE stream to the client.

    Args:
        ctx: The request.
        upstream: The backend's streamed ``requests`` response.
        public_model: The model id the client should see.
        on_event: Called with each decoded event; returns False to drop it. None
            when no plugin asked to see events.
        timeouts: The route's timeouts: ``idle`` (applied to the connection) for the
            error message, ``total`` checked as each chunk arrives.
        normalize: Decode every event and pass it through ``answers.normalize_event``
            (the request asked for logprobs, whose shape llama-server gets wrong).
    """

    def __init__(self, ctx: RequestContext, upstream: requests.Response, public_model: str,
                 on_event: Callable[[dict[str, Any]], bool] | None, timeouts: Timeouts,
                 normalize: bool = False) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self.public_model = public_model
        self.model_field = b'"model":' + json.dumps(public_model).encode()
        self.on_event = on_event
        self.timeouts = timeouts
        self.deadline = ctx.started + timeouts.total
        self.done = False
        # --- normalize (answers.normalize_event): on when the request asked for logprobs
        self.normalize = normalize
        self.offsets: dict[int, int] = {}  # each choice's text_offset, across the stream
        # --- end normalize

    def __iter__(self) -> Iterator[bytes]:
        buffer = b""
        try:
            for chunk in self.upstream.iter_content(chunk_size=None):
                buffer += chunk
                if b"\n\n" not in buffer:
                    continue
                *events, buffer = buffer.split(b"\n\n")
                out = b"".join(self._event(raw) for raw in events if raw)
                if out:
                    yield out
                if self.done or self.ctx.error is not None:
                    return
                if time.monotonic() > self.deadline:
                    yield _stream_error(self.ctx, GatewayTimeoutError(
                        f"The answer took longer than {self.timeouts.total:g} s in all; the stream was ended."))
                    return
        except requests.RequestException as exc:
            yield _stream_error(self.ctx, read_error(self.ctx, exc, self.timeouts))
            return
        except GatewayError as exc:
            yield _stream_error(self.ctx, exc)
            return
        if not self.done and self.ctx.error is None:
            yield _stream_error(self.ctx, UpstreamError(
                "The backend ended the stream before it finished; the answer is incomplete."))

    def _event(self, raw: bytes) -> bytes:
        if raw.startswith(b"data: [DONE]"):
            self.done = True
            return DONE
        if raw.startswith(b"error:") or raw.startswith(b'data: {"error"'):
            payload = _decode(raw.split(b":", 1)[1])
            error = from_upstream(502, payload)
            return _stream_error(self.ctx, error)
        if self.on_event is None and not self.normalize and b'"usage"' not in raw:
            return _MODEL_FIELD.sub(self.model_field, raw, count=1) + b"\n\n"
        event = _decode(raw[5:]) if raw.startswith(b"data:") else None
        if not isinstance(event, dict):
            return raw + b"\n\n"
        if "model" in event:
            event["model"] = self.public_model
        if self.normalize:
            normalize_event(event, self.public_model, self.offsets)
        if isinstance(event.get("usage"), dict):
            self.ctx.usage = event["usage"]
            if event.get("choices") == [] and not self.ctx.client_wants_usage:
                return b""  # the usage-only chunk the gateway asked for on its own behalf
        if self.on_event is not None and not self.on_event(event):
            return b""
        return sse(event)


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
