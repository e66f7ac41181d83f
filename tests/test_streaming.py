"""Streaming (gateway.web.streaming) on scripted reads: SSE framing whatever the read
boundaries, the first-byte and size limits, the charge of a stream that ends early, and
the watch for a client that leaves. The relay's usage merge is in test_answers.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import pytest

from gateway.config import Timeouts
from gateway.context import RequestContext
from gateway.errors import GatewayTimeoutError, UpstreamError
from gateway.backends.httpclient import ConnectionBroken, HTTPFailure, ReadTimedOut
from gateway.web.streaming import Relay, client_departed, collect, frames

TIMEOUTS = Timeouts(first_byte=5, idle=7, total=60)
CTX = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")


class ScriptedLease:
    """A :class:`gateway.backends.upstream.Lease` whose response yields the scripted reads (an
    exception among them is raised at that read)."""

    def __init__(self, reads: Iterable[bytes | HTTPFailure]) -> None:
        self.reads = list(reads)
        self.backend = SimpleNamespace(name="chat")
        self.response = SimpleNamespace(chunks=self._chunks)
        self.read_timeouts: list[float] = []

    def _chunks(self) -> Iterator[bytes]:
        for read in self.reads:
            if isinstance(read, HTTPFailure):
                raise read
            yield read

    def set_read_timeout(self, seconds: float) -> None:
        self.read_timeouts.append(seconds)

    def release_socket(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_events_come_whole_whatever_the_reads_cut():
    lease = ScriptedLease([b'data: {"a"', b':1}\n', b'\ndata: {"b":2}\n\ndata: {"c"', b":3}\n\n\n\n",
                           b"data: [DONE]\n\n", b"data: half an event"])
    # in the batches they complete in: a's blank line and b come in one read
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
    assert list(frames(ctx, lease, TIMEOUTS)) == [[b'data: {"a":1}', b'data: {"b":2}'], [b'data: {"c":3}'],
                                             [b"data: [DONE]"]]
    assert lease.read_timeouts == [TIMEOUTS.idle]  # idle from the first event on, set once
    assert ctx.marks["upstream.first_event"] >= ctx.started


def test_nothing_before_the_first_event_is_a_first_byte_timeout_and_later_an_idle_failure():
    with pytest.raises(GatewayTimeoutError) as err:
        list(frames(CTX, ScriptedLease([b"data: {", ReadTimedOut()]), TIMEOUTS))  # half an event is no event
    assert "did not start answering within 5 s" in err.value.message
    batches = frames(CTX, ScriptedLease([b'data: {"a":1}\n\n', ReadTimedOut()]), TIMEOUTS)
    assert next(batches) == [b'data: {"a":1}']
    with pytest.raises(ReadTimedOut):  # the relay words it as idle (errors.from_read_failure)
        next(batches)


def test_an_event_that_never_ends_is_cut(monkeypatch):
    monkeypatch.setattr("gateway.web.streaming.MAX_EVENT_BYTES", 100)
    with pytest.raises(UpstreamError):
        list(frames(CTX, ScriptedLease([b"data: " + b"x" * 60, b"x" * 60]), TIMEOUTS))


def relay(reads: list[bytes | HTTPFailure], **body: Any) -> tuple[list[bytes], RequestContext]:
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions",
                         body={"messages": [], "stream": True, **body})
    out = b"".join(Relay(ctx, ScriptedLease(reads), "public", None, TIMEOUTS))  # type: ignore[arg-type]
    return [block for block in out.split(b"\n\n") if block], ctx


def chunk(text: str, predicted: int) -> bytes:
    return (b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}],"model":"m.gguf",'
            b'"timings":{"prompt_n":4,"cache_n":0,"predicted_n":%d}}\n\n' % (text.encode(), predicted))


def test_a_stream_broken_off_ends_with_an_error_and_is_charged_what_was_generated():
    events, ctx = relay([chunk("a", 1), chunk("b", 2), ConnectionBroken("reset")])
    assert events[:2] == [b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"model":"public"}',
                          b'data: {"choices":[{"index":0,"delta":{"content":"b"}}],"model":"public"}']
    assert len(events) == 3 and b'"error"' in events[2] and ctx.error is not None
    assert ctx.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_a_stream_that_ends_without_done_is_incomplete():
    events, ctx = relay([chunk("a", 1)])
    assert b"incomplete" in events[-1] and b"[DONE]" not in b"".join(events)
    assert ctx.usage["completion_tokens"] == 1


def test_the_finish_reasons_are_read_from_undecoded_events_and_assembled_ones():
    last = (b'data: {"choices":[{"index":%d,"finish_reason":"%s","delta":{}}],"model":"m.gguf"}\n\n')
    quoted = b'data: {"choices":[{"index":0,"finish_reason":null,"delta":{"content":"\\"finish_reason\\":\\"x\\""}}]}\n\n'
    reads = [chunk("a", 1), quoted, last % (0, b"length"), last % (1, b"stop"), b"data: [DONE]\n\n"]
    events, ctx = relay(reads)
    assert ctx.finish_reasons == ["length", "stop"]  # not the one in a choice's text
    assert b'"finish_reason":"length"' in events[2]  # relayed as it came
    collected = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", body={"messages": []})
    collect(collected, ScriptedLease(reads), TIMEOUTS, lambda event: None)  # type: ignore[arg-type]
    assert collected.finish_reasons == ["length", "stop"]


def test_client_departed_tells_a_hang_up_from_a_pipelined_request():
    for peer_does, departed in (("close", True), ("send", False), ("nothing", False)):
        ours, theirs = socket.socketpair()
        if peer_does == "close":
            theirs.close()
        elif peer_does == "send":
            theirs.sendall(b"GET /next HTTP/1.1\r\n")
        assert client_departed(ours) is departed, peer_does
        ours.close()
        theirs.close()


def test_the_departure_watch_calls_back_under_gevent_when_the_client_hangs_up():
    """In a process of its own: the watch needs gevent's patched socket, as in a worker."""
    script = textwrap.dedent("""
        from gevent import monkey; monkey.patch_all()
        import socket, gevent
        from gateway.web.streaming import watch_departure
        for peer_does in ("send", "close"):
            ours, theirs = socket.socketpair()
            gone = []
            stop = watch_departure({"gunicorn.socket": ours}, lambda: gone.append(True))
            getattr(theirs, peer_does)(*((b"GET /next",) if peer_does == "send" else ()))
            gevent.sleep(0.2)
            stop()
            print(peer_does, bool(gone))
        quiet = {}
        stop = watch_departure(quiet, lambda: None)  # not a gunicorn request: nothing to watch
        stop()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["send False", "close True"]
