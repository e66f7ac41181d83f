"""Response bodies: the WSGI iterable whose ``close()`` ends the request, SSE relay,
and reading a whole answer from a stream.

A streamed answer is relayed event by event as llama-server sends it. Events are
framed (split on blank lines) so every event leaves whole, the ``model`` field is
rewritten to the public id with one regex per event, and the JSON is decoded only
when a plugin of the pipeline implements ``response_event`` (or the event carries
``usage``, which the gateway records).

The gateway asks llama-server to stream every chat and completion answer, also
when the client wants it whole (:func:`collect` assembles it): llama-server stops
generating when a stream's connection closes, but not a plain answer's, so only a
stream can be cancelled or abandoned. It also asks for ``timings`` on every chunk
(``timings_per_token``), so an answer that ends early (the client left, a cancel,
a broken backend) is still charged what llama-server generated (:class:`Tally`).
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any, Callable, Iterable, Iterator

from .body import gevent_patched, gevent_timeout
from ..answers import EventCount, Tally, UsageSum, choices_asked, decode_json, normalize_event
from ..answers.responses import ResponsesStream
from ..config import Timeouts
from ..context import RequestContext
from ..backends.upstream import Lease
from ..errors import GatewayError, GatewayTimeoutError, Phase, UpstreamError, from_backend, from_upstream
from ..backends.httpclient import HTTPFailure, ReadTimedOut

DONE = b"data: [DONE]\n\n"
_MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
_TIMINGS_FIELD = re.compile(rb',"timings":\{[^{}]*\}|"timings":\{[^{}]*\},?')
_MODEL_KEY = b'"model":"'
_FINISH_KEY = b'"finish_reason":"'  # llama-server writes "finish_reason":null until a choice's last event
_FINISH_REASON = re.compile(rb'"finish_reason":"([^"\\]{1,64})"')
_TIMINGS_KEY = b',"timings":{'
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
        try:
            if close is not None:
                close()
        finally:  # the request's slot and its complete hooks must never be skipped
            self._on_close(self._sent_all)


def read_error(ctx: RequestContext, exc: HTTPFailure, timeouts: Timeouts) -> GatewayError:
    """:func:`errors.from_backend` for this request's answer, broken off after it began."""
    return from_backend(exc, Phase.READING, backend=ctx.backend or "", timeout=timeouts.idle,
                        cancelled=ctx.cancelled, client_gone=ctx.client_gone)


def _stream_error(ctx: RequestContext, error: GatewayError) -> bytes:
    ctx.error = error
    return sse(error.to_dict())


def frames(ctx: RequestContext, lease: Lease, timeouts: Timeouts) -> Iterator[list[bytes]]:
    """The upstream's SSE events (without their blank line), in the batches they arrive;
    the first one's arrival is ``ctx.marks["upstream.first_event"]``.

    llama-server sends a stream's headers at once, so the route's ``first_byte``
    timeout (already on the connection) lasts until the first event, which comes
    after the prompt was processed; from then on ``idle`` applies between events.

    Raises:
        GatewayTimeoutError: no event within ``first_byte``.
        HTTPFailure: the connection failed later.
    """
    buffer = b""
    started = False
    chunks = lease.response.chunks()
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except HTTPFailure as exc:
            if not started and isinstance(exc, ReadTimedOut):  # the first-byte budget ran out, not idle's
                raise from_backend(exc, Phase.WAITING, backend=lease.backend.name,
                                   timeout=timeouts.first_byte) from None
            raise
        buffer += chunk
        if b"\n\n" not in buffer:
            if len(buffer) > MAX_EVENT_BYTES:
                raise UpstreamError(f"The backend sent an event of more than {MAX_EVENT_BYTES} bytes; "
                                    "the answer was abandoned.")
            continue
        if not started:
            started = True
            ctx.marks["upstream.first_event"] = time.monotonic()
            lease.set_read_timeout(timeouts.idle)
        *events, buffer = buffer.split(b"\n\n")
        yield [raw for raw in events if raw]


AFTER_DONE_SECONDS = 1.0
AFTER_DONE_BYTES = 65536
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event; a backend that never ends one is cut


def read_to_the_end(batches: Iterator[list[bytes]], lease: Lease) -> None:
    """Read what follows ``[DONE]`` (the chunked body's last, empty chunk): a response
    read to its end gives its connection back to the pool; one left unread is closed,
    and the next request pays a new connection. From then on the connection is not
    this request's: a late cancel must not cut it under another request."""
    # A backend that sends more after [DONE], or never ends the body, is not waited for.
    lease.set_read_timeout(AFTER_DONE_SECONDS)
    timer = gevent_timeout(AFTER_DONE_SECONDS)
    read = 0
    try:
        for events in batches:
            read += sum(len(raw) for raw in events)
            if read > AFTER_DONE_BYTES:
                lease.abort()
                break
    except BaseException as exc:  # the answer is complete: only the connection is lost
        if exc is timer:
            lease.abort()
        elif not isinstance(exc, (HTTPFailure, GatewayError)):
            raise
    finally:
        if timer is not None:
            timer.close()
        lease.release_socket()


def _upstream_error(raw: bytes) -> GatewayError | None:
    """The error an event reports (llama-server's ``error:`` or ``data: {"error"...``)."""
    if raw.startswith(b"error:") or raw.startswith(b'data: {"error"'):
        return from_upstream(502, decode_json(raw.split(b":", 1)[1]))
    return None


def collect(ctx: RequestContext, lease: Lease, timeouts: Timeouts,
            add: Callable[[dict[str, Any]], None]) -> None:
    """Read a whole upstream stream, passing each decoded chunk to ``add``.

    Raises:
        GatewayError: the backend reported an error, broke off, was cancelled or
            ran past the route's total timeout; ``ctx.usage`` then holds what
            llama-server generated until then.
    """
    tally = Tally(*choices_asked(ctx.body))
    deadline = ctx.started + timeouts.total
    try:
        batches = frames(ctx, lease, timeouts)
        for events in batches:
            for raw in events:
                if raw.startswith(b"data: [DONE]"):
                    read_to_the_end(batches, lease)
                    return
                error = _upstream_error(raw)
                if error is not None:
                    raise error
                tally.see(raw)
                note_finish(ctx, raw)
                event = decode_json(raw[5:]) if raw.startswith(b"data:") else None
                if isinstance(event, dict):
                    add(event)
            if time.monotonic() > deadline:
                raise GatewayTimeoutError(f"The answer took longer than {timeouts.total:g} s in all.")
        raise UpstreamError("The backend ended the answer before it finished; the answer is incomplete.")
    except HTTPFailure as exc:
        ctx.usage = tally.usage()
        raise read_error(ctx, exc, timeouts) from None
    except GatewayError:
        ctx.usage = tally.usage()
        raise


def note_finish(ctx: RequestContext, raw: bytes) -> None:
    """The finish reasons a raw event carries, into ``ctx.finish_reasons``: one byte search
    an event, a regular expression on a choice's last."""
    if _FINISH_KEY in raw:
        ctx.finish_reasons.extend(reason.decode() for reason in _FINISH_REASON.findall(raw))


def client_departed(sock: Any) -> bool:
    """Whether the client closed its connection (its socket reads end-of-file), asked
    without blocking or switching: on the real socket under gevent's wrapper."""
    raw = getattr(sock, "_sock", sock)
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def watch_departure(env: dict[str, Any], on_departure: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_departure`` if the client hangs up while its plain answer is still
    being generated (nothing is written to it until then, so gunicorn cannot tell).

    Returns a function that stops watching. Under gevent only: an I/O watcher on the
    client's socket runs a callback in the hub when it becomes readable (no greenlet
    per request); elsewhere nothing is watched.
    """
    sock = env.get("gunicorn.socket")
    if sock is None or not gevent_patched():
        return lambda: None
    from gevent import get_hub

    watcher = get_hub().loop.io(sock.fileno(), 1)

    def readable() -> None:  # in the hub: must not block, and does not
        watcher.stop()
        if client_departed(sock):  # readable with data is a pipelined request: not gone
            on_departure()

    watcher.start(readable)
    return watcher.close


class Relay:
    """Relays one upstream SSE stream to the client.

    Args:
        ctx: The request.
        lease: The backend's streamed answer.
        public_model: The model id the client should see.
        on_event: Called with each decoded event; returns False to drop it. None
            when no plugin asked to see events.
        timeouts: The route's timeouts: ``idle`` (applied to the connection) for the
            error message, ``total`` checked as each chunk arrives.
        normalize: Decode every event and pass it through ``answers.normalize_event``
            (the request asked for logprobs, whose shape llama-server gets wrong).
    """

    def __init__(self, ctx: RequestContext, lease: Lease, public_model: str,
                 on_event: Callable[[dict[str, Any]], bool] | None, timeouts: Timeouts,
                 normalize: bool = False) -> None:
        self.ctx = ctx
        self.lease = lease
        self.public_model = public_model
        self.model_field = model_field(public_model)
        self.on_event = on_event
        self.timeouts = timeouts
        self.deadline = ctx.started + timeouts.total
        self.done = False
        choices, prompts = choices_asked(ctx.body)
        self.tally = Tally(choices, prompts)
        self.usage = UsageSum(choices // prompts)  # every choice's
        self.usage_event: dict[str, Any] | None = None  # the usage chunk to send before [DONE]
        # on when the request asked for logprobs: llama-server's need reshaping (answers.normalize_event)
        self.normalize = normalize
        self.offsets: dict[int, int] = {}  # each choice's text_offset, across the stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._relay()
        finally:
            if self.ctx.usage is None:  # ended early: charge what was generated
                self.ctx.usage = self.tally.usage()

    def _relay(self) -> Iterator[bytes]:
        try:
            batches = frames(self.ctx, self.lease, self.timeouts)
            for events in batches:
                out = b"".join(self._event(raw) for raw in events)
                if out:
                    yield out
                if self.done:  # the client has its [DONE]
                    read_to_the_end(batches, self.lease)
                    return
                if self.ctx.error is not None:
                    return
                if time.monotonic() > self.deadline:
                    yield _stream_error(self.ctx, GatewayTimeoutError(
                        f"The answer took longer than {self.timeouts.total:g} s in all; the stream was ended."))
                    return
        except HTTPFailure as exc:
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
            return self._usage_event() + DONE
        error = _upstream_error(raw)
        if error is not None:
            return _stream_error(self.ctx, error)
        if raw == b"data: null":  # llama-server's, between the prompts of a list: not a chunk OpenAI clients read
            return b""
        self.tally.see(raw)
        note_finish(self.ctx, raw)
        if self.on_event is None and not self.normalize and b'"usage"' not in raw:
            return rewrite_event(raw, self.model_field) + b"\n\n"
        event = decode_json(raw[5:]) if raw.startswith(b"data:") else None
        if not isinstance(event, dict):
            return raw + b"\n\n"
        if "model" in event:
            event["model"] = self.public_model
        if event.get("choices"):
            event.pop("timings", None)  # asked for the gateway's accounting (the usage chunk keeps its own)
        if self.normalize:
            normalize_event(event, self.public_model, self.offsets)
        usage = event.get("usage")
        if isinstance(usage, dict):
            # llama-server counts each choice apart: chat sends a usage chunk per choice,
            # completions put usage on each choice's last chunk. OpenAI clients expect
            # one usage chunk, counting every choice, before [DONE], and only if asked.
            self.ctx.usage = self.usage.add(usage, event)
            if not event.get("choices"):
                self.usage_event = event
                return b""
            del event["usage"]
            if self.usage_event is None:
                self.usage_event = {key: event[key] for key in ("id", "object", "created", "model", "system_fingerprint")
                                    if key in event}
                self.usage_event["choices"] = []
        if self.on_event is not None and not self.on_event(event):
            return b""
        return sse(event)

    def _usage_event(self) -> bytes:
        event = self.usage_event
        if event is None or not self.ctx.client_wants_usage:
            return b""
        event["usage"] = self.ctx.usage
        if self.on_event is not None and not self.on_event(event):
            return b""
        return sse(event)



def model_field(public_model: str) -> bytes:
    """The ``"model":"<id>"`` bytes that :func:`rewrite_event` puts in events."""
    return b'"model":' + json.dumps(public_model).encode()


def rewrite_event(raw: bytes, model: bytes) -> bytes:
    """The event as the client gets it, without decoding it: the public model id
    (``model``, from :func:`model_field`), and no per-chunk timings (asked for the
    gateway's accounting, not the client's). Byte searches in the compact JSON
    llama-server writes; a regex where it is not."""
    start = raw.find(_MODEL_KEY)
    end = raw.find(b'"', start + len(_MODEL_KEY)) if start >= 0 else -1
    if end > 0 and raw[end - 1] != 0x5C:  # no escaped quote in the value
        raw = raw[:start] + model + raw[end + 1:]
    else:
        raw = _MODEL_FIELD.sub(model, raw, count=1)
    start = raw.rfind(_TIMINGS_KEY)
    if start >= 0:
        end = raw.find(b"}", start)  # timings hold numbers only: the first } closes them
        return raw[:start] + raw[end + 1:]
    if b'"timings"' in raw:
        return _TIMINGS_FIELD.sub(b"", raw, count=1)
    return raw


def relay_as_is(ctx: RequestContext, lease: Lease, public_model: str, timeouts: Timeouts,
                reshape: ResponsesStream | None = None) -> Iterator[bytes]:
    """A stream in another shape than OpenAI's chat chunks (Anthropic's messages, OpenAI's
    Responses, llama-server's native API), relayed event by event: the model id
    rewritten and per-event timings dropped, nothing else touched; usage counted as it
    passes (:class:`gateway.answers.EventCount`). A failure ends the stream where it
    is and is kept in ``ctx.error`` for the ``complete`` hooks.

    With ``reshape`` (the Responses API) every event is decoded and made OpenAI's
    (:class:`gateway.answers.responses.ResponsesStream`), and a failure, or a stream that ends
    before its final event, ends with that protocol's ``error`` and ``response.failed``."""
    count = EventCount(*choices_asked(ctx.body))
    field = model_field(public_model)
    deadline = ctx.started + timeouts.total
    try:
        for events in frames(ctx, lease, timeouts):
            for raw in events:
                count.see(raw)
            if reshape is None:
                yield b"".join(rewrite_event(raw, field) + b"\n\n" for raw in events)
            else:
                yield b"".join(reshape.event(raw) for raw in events)
                if reshape.error is not None:  # llama-server's error event, already sent in shape
                    ctx.error = reshape.error
                    return
            if time.monotonic() > deadline:
                ctx.error = GatewayTimeoutError(f"The answer took longer than {timeouts.total:g} s in all; "
                                                "the stream was ended.")
                break
        else:
            if reshape is not None and not reshape.finished:
                ctx.error = UpstreamError("The backend ended the stream before it finished; the answer is incomplete.")
    except HTTPFailure as exc:
        ctx.error = read_error(ctx, exc, timeouts)
    except GatewayError as exc:
        ctx.error = exc
    finally:
        ctx.usage = count.usage()
    if reshape is not None and ctx.error is not None:
        yield reshape.failure(ctx.error)
