"""Sending a request upstream (gateway.backends.send.open_lease), in-process against
scripted backends over real loopback HTTP: what is retried within ``retry_deadline``
(a 502/503, on another replica when there is one) and what is not (a replica that refused,
a backend that took the request and then failed). Retries with backoff, the deadline
and a single replica's breaker are in test_reliability.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable, Iterable

import pytest

from gateway import hookimpl
from gateway.backends import send
from gateway.config import BackendConfig, Timeouts
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.backends.send import Outgoing
from gateway.testing import canned_llama_app, serve_in_thread
from gateway.backends.upstream import Backend, InFlight

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


class Counting:
    """The canned llama-server, counting the answers it was asked for (not health checks)."""

    def __init__(self, status: int | None = None) -> None:
        self.status = status  # answer every request with this error instead
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith("/v1/"):
            self.calls += 1
            if self.status is not None:
                body = json.dumps({"error": {"code": self.status, "message": "Loading model"}}).encode()
                start_response(f"{self.status} Unavailable", [("Content-Type", "application/json")])
                return [body]
        return canned_llama_app(environ, start_response)


@pytest.fixture
def serve():
    """Serve WSGI apps for one test: ``serve(app)`` returns its URL."""
    servers = []

    def start(app: Callable[..., Iterable[bytes]]) -> str:
        server, url = serve_in_thread(app)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()


class Seen:
    """Keeps each request's counters and replica as ``complete`` saw them."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, int], str | None]] = []

    @hookimpl
    def complete(self, ctx, outcome):
        self.requests.append((dict(ctx.counters), ctx.replica))


def test_a_replica_that_refused_is_not_tried_again_by_the_same_request(make_client, dead_url):
    """Nothing listens there (a llama-server down): retrying it until the deadline would only
    keep the client waiting; the replica waits for its health check instead."""
    seen = Seen()
    client = make_client([("seen", seen)], backend_url=dead_url, timeouts={"retry_deadline": 30})
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 503 and "can take requests" in resp.json["error"]["message"]
    assert seen.requests[0][0]["upstream.retries"] == 1  # one pause, then no replica left to try


def test_a_refused_connection_without_a_retry_deadline_fails_at_once(make_client, dead_url):
    seen = Seen()
    client = make_client([("seen", seen)], backend_url=dead_url, timeouts={"retry_deadline": 0})
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 503 and "connection refused" in resp.json["error"]["message"]
    assert "upstream.retries" not in seen.requests[0][0]


def test_a_503_fails_over_to_the_other_replica_on_the_next_attempt(make_client, serve):
    loading, healthy = Counting(status=503), Counting()
    loading_url, healthy_url = serve(loading), serve(healthy)
    seen = Seen()
    client = make_client([("seen", seen)], timeouts={"retry_deadline": 5},
                         backends={"chat": {"urls": [loading_url, healthy_url], "breaker_failures": 100}})
    for _ in range(4):
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert healthy.calls == 4 and 1 <= loading.calls <= 4
    for counters, replica in seen.requests:
        assert replica == healthy_url
        assert counters.get("upstream.retries", 0) <= 1  # never back to the replica that just said 503


def test_a_first_byte_timeout_is_not_retried(make_client, serve):
    """The backend took the request and works on it: sending it again would run it twice."""
    backend = Counting()
    client = make_client(backend_url=serve(backend), timeouts={"first_byte": 0.3, "retry_deadline": 5})
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, canned={"first_delay": 1.0}))
    assert resp.status_code == 504 and resp.json["error"]["code"] == "timeout"
    assert backend.calls == 1


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_broken_off_after_it_began_is_not_retried(make_client, serve, stream):
    """Once llama-server answered, a failure is the answer's: the client gets an error, and
    the backend is not asked again (a streaming client already has the first events)."""
    backend = Counting()
    client = make_client(backend_url=serve(backend), timeouts={"retry_deadline": 5})
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=stream, canned={"cut_after": 2}))
    if stream:
        events = [block[len("data: "):] for block in resp.text.split("\n\n") if block.startswith("data: ")]
        assert len(events) == 3 and "incomplete" in json.loads(events[-1])["error"]["message"]
    else:
        assert resp.status_code == 502 and "incomplete" in resp.json["error"]["message"]
    assert backend.calls == 1


def test_an_open_breaker_sends_requests_to_the_other_replica_without_a_retry(make_client, serve):
    failing, healthy = Counting(status=503), Counting()
    failing_url, healthy_url = serve(failing), serve(healthy)
    seen = Seen()
    client = make_client([("seen", seen)], timeouts={"retry_deadline": 5},
                         backends={"chat": {"urls": [failing_url, healthy_url], "breaker_failures": 1,
                                            "breaker_cooldown": 60}})
    while failing.calls == 0:  # the replicas in turn: until one request has met the failing one
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    seen.requests.clear()
    for _ in range(4):
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert failing.calls == 1  # its breaker is open: not tried again
    assert all("upstream.retries" not in counters for counters, _ in seen.requests)
    assert client.simulate_get("/health").json["backends"]["chat"]["replicas"][0]["breaker"] == "open"


def _slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A replica that takes longer to answer than any test here waits."""
    time.sleep(2)
    return canned_llama_app(environ, start_response)


def _refused_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("ending", ["answered", "refused", "503", "timeout", "cancelled"])
def test_a_replica_counts_an_attempt_in_flight_until_it_ends_however_it_ends(serve, ending):
    """``replica.in_flight`` (what route hooks balance on) is back to 0 after every kind of
    attempt ending: an answer once its lease closes, a refused connection, a 503, a
    first-byte timeout, a cancel; and counts the attempt while it is out."""
    url = {"answered": lambda: serve(canned_llama_app), "refused": _refused_url,
           "503": lambda: serve(Counting(503)), "timeout": lambda: serve(_slow),
           "cancelled": lambda: serve(_slow)}[ending]()
    backend = Backend(BackendConfig("b", (url,), max_in_flight=1))
    replica = backend.replicas[0]
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
    in_flight = InFlight(ctx)
    timeouts = Timeouts(first_byte=0.5 if ending == "timeout" else 30, retry_deadline=0)
    outgoing = Outgoing("/v1/chat/completions", json.dumps(CHAT).encode(), {"Content-Type": "application/json"},
                        timeouts)
    counted_while_out = []

    def cancel_once_sent() -> None:
        deadline = time.monotonic() + 5
        while in_flight.socket is None and time.monotonic() < deadline:
            time.sleep(0.01)
        counted_while_out.append(replica.in_flight)
        in_flight.cancel()

    if ending == "cancelled":
        threading.Thread(target=cancel_once_sent, daemon=True).start()
    if ending == "answered":
        lease = send.open_lease(ctx, backend, None, outgoing, in_flight, "1")
        counted_while_out.append(replica.in_flight)
        lease.response.read()
        lease.close()
        assert counted_while_out == [1]
    else:
        with pytest.raises(GatewayError):
            send.open_lease(ctx, backend, None, outgoing, in_flight, "1")
        if ending == "cancelled":
            assert counted_while_out == [1]
    assert replica.in_flight == 0
    assert backend.admission.in_flight == 0
