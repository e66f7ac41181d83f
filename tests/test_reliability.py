"""Retries, breakers, admission, timeouts, cancel, admin, CORS, OpenAPI: in-process,
against canned and scripted backends over real loopback HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests

from gateway import Principal, hookimpl, lifecycle
from gateway.web.app import build_app
from gateway.web.state import Gateway
from gateway.config import BackendConfig, LaunchConfig, Timeouts, parse_config
from gateway.errors import ServiceUnavailableError
from gateway.pipeline import Pipeline, build_pipelines
from gateway.testing import canned_llama_app, serve_in_thread
from gateway.context import RequestContext
from gateway.backends.turns import QueuePlace
from gateway.backends.send import fleet_lease
from gateway.backends.upstream import Backend, Breaker, InFlight

from .conftest import config_doc

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
ADMIN, USER, OTHER = "sk-admin", "sk-user", "sk-other"


class Flaky:
    """A backend that answers 503 (like llama-server loading) for the first ``failures`` requests."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        if self.calls <= self.failures:
            body = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        return canned_llama_app(environ, start_response)


def test_breaker_opens_probes_once_and_closes():
    breaker = Breaker(failures=2, cooldown=10)
    breaker.failure(0)
    assert breaker.allows(0) and breaker.state == "closed"
    breaker.failure(1)
    assert breaker.state == "open" and not breaker.allows(5) and breaker.retry_after(5) == 6
    assert breaker.allows(11)
    breaker.attempt(11)
    assert breaker.state == "half_open" and not breaker.allows(11)  # one probe at a time
    breaker.failure(12)
    assert breaker.state == "open"  # the probe failed: another cool-down
    breaker.attempt(22)
    breaker.success()
    assert breaker.state == "closed" and breaker.allows(22)


def test_503_is_retried_with_backoff_then_succeeds(make_client):
    flaky = Flaky(failures=2)
    server, url = serve_in_thread(flaky)
    counters = {}

    class Seen:
        @hookimpl
        def complete(self, ctx, outcome):
            counters.update(ctx.counters)

    try:
        client = make_client([("seen", Seen())], backend_url=url, timeouts={"retry_deadline": 5})
        resp = client.simulate_post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200 and flaky.calls == 3
        assert counters == {"upstream.retries": 2}
    finally:
        server.shutdown()


def test_retries_stop_at_the_deadline_with_the_backends_error(make_client):
    flaky = Flaky(failures=10**6)
    server, url = serve_in_thread(flaky)
    try:
        client = make_client(backend_url=url, timeouts={"retry_deadline": 0.4})
        started = time.monotonic()
        resp = client.simulate_post("/v1/chat/completions", json=CHAT)
        assert time.monotonic() - started < 1.5
        assert resp.status_code == 503 and resp.json["error"]["message"] == "Loading model"
        assert resp.headers["retry-after"]
        assert flaky.calls >= 2
    finally:
        server.shutdown()


def test_breaker_skips_a_failing_replica_then_probes_it(make_client):
    flaky = Flaky(failures=2)
    server, url = serve_in_thread(flaky)
    try:
        client = make_client(backend_url=url, timeouts={"retry_deadline": 0},
                             backends={"chat": {"urls": [url], "breaker_failures": 2, "breaker_cooldown": 0.5}})
        for _ in range(2):
            assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 503
        replica = client.simulate_get("/health").json["backends"]["chat"]["replicas"][0]
        assert replica["breaker"] == "open"
        skipped = client.simulate_post("/v1/chat/completions", json=CHAT)
        assert skipped.status_code == 503 and "can take requests" in skipped.json["error"]["message"]
        assert flaky.calls == 2  # the open breaker kept it from the backend
        time.sleep(0.6)
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200  # the probe
        assert client.simulate_get("/health").json["backends"]["chat"]["replicas"][0]["breaker"] == "closed"
    finally:
        server.shutdown()


ALICE = QueuePlace.of(Principal(client_id="alice"))


def test_admission_queue_hands_slots_to_admins_then_priority_then_clients_in_turn():
    backend = Backend(BackendConfig("b", ("http://x",), max_in_flight=1, max_queue=12, queue_timeout=5))
    admission = backend.admission
    admission.acquire(ALICE)  # the one slot is taken
    order: list[str] = []

    def wait(name: str, place: QueuePlace) -> None:
        admission.acquire(place)
        order.append(name)

    bob, carol = QueuePlace.of(Principal(client_id="bob")), QueuePlace.of(Principal(client_id="carol"))
    dave = QueuePlace.of(Principal(client_id="dave", priority=50))
    ops = QueuePlace.of(Principal(client_id="ops", role="admin"))
    arrivals = [("b1", bob), ("b2", bob), ("b3", bob), ("c1", carol), ("d1", dave), ("a1", ops)]
    threads = [threading.Thread(target=wait, args=arrival) for arrival in arrivals]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # arrive in this order
    assert admission.queued == 6
    for _ in arrivals:
        admission.release()
        time.sleep(0.05)
    for thread in threads:
        thread.join(2)
    # the same order as shared admission's (tests/integration/test_shared_queue.py): bob
    # queued his three before carol's one, and she waits behind one of his, not three
    assert order == ["a1", "d1", "b1", "c1", "b2", "b3"]
    assert admission.in_flight == 1 and admission.queued == 0


def test_a_client_holds_at_most_a_quarter_of_the_queue():
    backend = Backend(BackendConfig("b", ("http://x",), max_in_flight=1, max_queue=8, queue_timeout=5))
    admission = backend.admission
    admission.acquire(ALICE)
    pool = ThreadPoolExecutor(4)
    waiting = [pool.submit(admission.acquire, ALICE) for _ in range(2)]
    time.sleep(0.05)
    with pytest.raises(ServiceUnavailableError) as err:
        admission.acquire(ALICE)  # alice holds her 2 places of 8
    assert err.value.code == "queue_full" and "your requests" in err.value.message
    bob = pool.submit(admission.acquire, QueuePlace.of(Principal(client_id="bob")))  # bob still queues
    time.sleep(0.05)
    assert admission.queued == 3
    for _ in range(3):
        admission.release()
    for future in waiting + [bob]:
        future.result(2)
    assert admission.queued == 0 and admission.in_flight == 1


def test_admission_full_queue_and_queue_timeout():
    backend = Backend(BackendConfig("b", ("http://x",), max_in_flight=1, max_queue=1, queue_timeout=0.2))
    backend.admission.acquire(ALICE)
    waiter = ThreadPoolExecutor(1).submit(backend.admission.acquire, ALICE)
    time.sleep(0.05)
    with pytest.raises(ServiceUnavailableError) as err:
        backend.admission.acquire(QueuePlace.of(Principal(client_id="bob")))
    assert err.value.code == "queue_full" and err.value.headers["Retry-After"]
    with pytest.raises(ServiceUnavailableError) as err:
        waiter.result(2)
    assert err.value.code == "queue_timeout"
    assert backend.admission.queued == 0


def test_requests_waiting_for_a_launched_model_are_bounded_like_the_admission_queue(monkeypatch):
    """They wait for the fleet before admission, so admission's queue does not bound them."""
    launch = LaunchConfig(model="/m.gguf", ports=(1,), parallel=1)
    backend = Backend(BackendConfig("b", ("http://127.0.0.1:1",), max_in_flight=1, max_queue=2, launch=launch))
    loaded = threading.Event()

    def acquire(*args, **kwargs):
        loaded.wait(5)  # the model is loading
        return SimpleNamespace(report={}, release=lambda: None)

    monkeypatch.setattr("gateway.backends.upstream.fleet.acquire", acquire)

    def hold():
        ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
        return fleet_lease(ctx, backend, Timeouts(), InFlight(ctx))

    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(hold) for _ in range(3)]  # limit 1 + max_queue 2
        deadline = time.monotonic() + 5
        while backend.fleet_waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ServiceUnavailableError) as err:
            hold()
        assert err.value.code == "queue_full" and err.value.headers["Retry-After"]
        loaded.set()
        assert all(w.result(5) for w in waiting)
    assert backend.fleet_waiting == 0


def test_default_limit_is_the_replicas_slots():
    backend = Backend(BackendConfig("b", ("http://x", "http://y")))
    assert backend.limit == 8  # 4 each until /props says otherwise
    backend.replicas[0].slots = 2
    assert backend.limit == 6


@pytest.mark.parametrize("script, timeouts, status, fragment", [
    ({"first_delay": 1.0}, {"first_byte": 0.3}, 504, "did not start answering"),
    ({"delay": 1.0, "events": 2}, {"idle": 0.3}, 200, "sent nothing for 0.3 s"),
    ({"delay": 0.2, "events": 10}, {"total": 0.5}, 200, "longer than 0.5 s in all"),
])
def test_timeouts_end_requests_clearly(make_client, script, timeouts, status, fragment):
    client = make_client(timeouts=timeouts)
    body = dict(CHAT, stream=True, canned=script)
    started = time.monotonic()
    resp = client.simulate_post("/v1/chat/completions", json=body)
    assert time.monotonic() - started < 2.5
    assert resp.status_code == status
    if status == 200:
        last = json.loads(resp.text.strip().split("\n\n")[-1][len("data: "):])
        assert last["error"]["code"] == "timeout" and fragment in last["error"]["message"]
    else:
        assert resp.json["error"]["code"] == "timeout" and fragment in resp.json["error"]["message"]


class KeyAuth:
    """A tiny auth for these tests: three keys, one admin."""

    @hookimpl
    def request(self, ctx):
        key = (ctx.headers.get("AUTHORIZATION") or "").removeprefix("Bearer ")
        ctx.principal = {ADMIN: Principal("root", "admin"), USER: Principal("alice"),
                         OTHER: Principal("bob")}.get(key)


@pytest.fixture
def live(canned_url):
    """The gateway served over real loopback HTTP (threads), so a request can be
    cancelled while another is streaming."""
    outcomes: list[str] = []

    class Outcome:
        @hookimpl
        def complete(self, ctx, outcome):
            outcomes.append(outcome)

    config = parse_config(config_doc(canned_url, admin_pipeline="default"))
    gateway = Gateway(config, {"default": Pipeline("default", [("auth", KeyAuth()), ("outcome", Outcome())])})
    server, url = serve_in_thread(build_app(gateway))
    yield url, gateway, outcomes
    server.shutdown()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_owner_cancels_a_stream_and_the_client_gets_a_final_error(live):
    url, gateway, outcomes = live
    body = dict(CHAT, stream=True, canned={"delay": 0.2, "events": 50})
    with requests.post(url + "/v1/chat/completions", json=body, stream=True,
                       headers={**auth(USER), "X-Request-Id": "victim-1"}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        assert requests.post(url + "/v1/requests/victim-1/cancel", headers=auth(OTHER)).status_code == 404
        done = requests.post(url + "/v1/requests/victim-1/cancel", headers=auth(USER))
        assert done.status_code == 200 and done.json()["cancelled"] is True
        rest = [line for line in lines if line]
    last = json.loads(rest[-1][len("data: "):])
    assert last["error"]["code"] == "request_cancelled"
    assert len(rest) < 10  # it ended at once, not after 50 events
    deadline = time.monotonic() + 2
    while "cancelled" not in outcomes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "cancelled" in outcomes
    assert gateway.in_flight == set()


def test_admin_cancels_everything_on_a_backend(live):
    url, gateway, _ = live
    body = dict(CHAT, stream=True, canned={"delay": 0.2, "events": 50})
    streams = [requests.post(url + "/v1/chat/completions", json=body, stream=True, headers=auth(USER))
               for _ in range(3)]
    readers = [stream.iter_lines() for stream in streams]
    for lines in readers:
        next(line for line in lines if line)
    assert requests.post(url + "/admin/backends/chat/cancel", headers=auth(USER)).status_code == 403
    resp = requests.post(url + "/admin/backends/chat/cancel", headers=auth(ADMIN))
    assert resp.json() == {"backend": "chat", "cancelled": 3}
    for stream, lines in zip(streams, readers):
        assert b"request_cancelled" in b"".join(lines)
        stream.close()


def test_admin_status_needs_an_admin(live):
    url, _, _ = live
    assert requests.get(url + "/admin/status", headers=auth(USER)).status_code == 403
    assert requests.get(url + "/admin/status").status_code == 403  # no principal at all
    status = requests.get(url + "/admin/status", headers=auth(ADMIN)).json()
    chat = status["backends"]["chat"]
    assert {"limit", "in_flight", "queued", "replicas"} <= set(chat)
    assert {"breaker", "slots", "ready", "in_flight"} <= set(chat["replicas"][0])
    assert status["pipelines"] == {"default": ["auth", "outcome"]}
    # without shared: the one worker's row and totals
    assert status["shared"] == "off" and [w["pid"] for w in status["workers"]] == [status["pid"]]
    assert status["totals"]["workers"] == 1 and status["totals"]["backends"]["chat"]["queued"] == 0


def test_cors_preflight_and_actual_requests(make_client):
    cors = build_pipelines(parse_config(config_doc("http://x:1", pipelines={"default": [
        {"cors": {"allow_origins": ["https://app.example"]}}]})))["default"].plugins
    client = make_client(cors)
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    resp = client.simulate_options("/v1/chat/completions", headers=pre)
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"]
    denied = client.simulate_options("/v1/chat/completions", headers=dict(pre, Origin="https://evil.example"))
    assert denied.status_code == 403 and denied.json["error"]["code"] == "origin_not_allowed"
    actual = client.simulate_post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
    assert actual.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in actual.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in client.simulate_post(
        "/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example"}).headers
    plain = client.simulate_options("/v1/models")
    assert plain.status_code == 204 and plain.headers["allow"] == "GET, OPTIONS"


def test_cors_refuses_wildcard_with_credentials():
    from gateway.config import ConfigError

    doc = config_doc("http://x:1", pipelines={"default": [{"cors": {"allow_origins": ["*"],
                                                                   "allow_credentials": True}}]})
    with pytest.raises(ConfigError, match="cannot go with allow_credentials"):
        build_pipelines(parse_config(doc))


def test_openapi_document_is_valid_and_lists_the_routes(client):
    from openapi_spec_validator import validate

    doc = client.simulate_get("/openapi.json").json
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"} <= set(doc["paths"])


def test_security_headers_and_depth_limit(client):
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    nested: dict = {"x": 1}
    for _ in range(70):
        nested = {"n": nested}
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, extra=nested))
    assert resp.status_code == 400 and "nested deeper than 64" in resp.json["error"]["message"]


def test_draining_gateway_refuses_new_requests_but_answers_health(client):
    lifecycle.draining = True
    try:
        resp = client.simulate_post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 503 and resp.json["error"]["code"] == "shutting_down"
        assert resp.headers["retry-after"] == "1"
        assert client.simulate_get("/health").json["status"] == "draining"
    finally:
        lifecycle.draining = False


def test_default_limit_is_split_between_workers(monkeypatch):
    monkeypatch.setenv("GATEWAY_WORKERS", "3")  # read through gateway.settings
    backend = Backend(BackendConfig("b", ("http://x", "http://y")))
    backend.replicas[0].slots = backend.replicas[1].slots = 2
    assert backend.limit == 2  # 4 slots over 3 workers, rounded up
    assert Backend(BackendConfig("b", ("http://x",), max_in_flight=7)).limit == 7


def test_a_request_pausing_to_retry_holds_no_socket_a_cancel_could_cut(monkeypatch):
    """After a 503 the connection goes back to the pool, where another request may take
    it during the retry pause; the paused request's handle still pointed at that socket,
    so cancelling it (or its client hanging up) cut the other request's stream."""
    from gateway.backends import upstream
    from gateway.testing import Harness

    held = []
    real_sleep = upstream.time.sleep

    def pause(seconds):
        held.extend(entry.socket for entry in harness.gateway.in_flight)
        real_sleep(0)

    monkeypatch.setattr(upstream.time, "sleep", pause)
    with Harness([], config={"timeouts": {"retry_deadline": 5}}) as harness:
        harness.backend.script({"status": 503, "json": {"error": {"code": 503, "message": "loading"}}})
        assert harness.chat("hi").status == 200
    assert held == [None]



def test_a_plugin_crashing_as_a_stream_begins_returns_its_slot():
    """A plugin's wants_events that raised after the backend answered left the lease
    unreturned: two such requests filled a 2-slot backend for good."""
    from gateway.testing import Harness

    class Broken:
        @hookimpl
        def response_event(self, ctx, event):
            pass

        def wants_events(self, ctx):
            if ctx.body["messages"][0]["content"] == "boom":
                raise RuntimeError("boom")
            return False

    with Harness([Broken()]) as harness:
        for _ in range(3):
            assert harness.chat("boom", stream=True).status == 500
        admission = harness.gateway.upstreams.backends["test"].admission
        assert admission.in_flight == 0 and harness.gateway.in_flight == set()
        assert harness.chat("fine", stream=True).status == 200


def test_a_backend_that_never_ends_its_body_after_done_is_not_waited_for():
    """After [DONE] the relay reads on to give the connection back to the pool; a backend
    that then never ends its chunked body held the request until the idle timeout."""
    import time as clock

    from gateway.testing import Harness, serve_in_thread

    def never_ends(environ, start_response):
        if environ["PATH_INFO"] == "/health":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ok"}']
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def body():
            yield b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
            yield b"data: [DONE]\n\n"
            clock.sleep(10)

        return body()

    server, url = serve_in_thread(never_ends)
    try:
        with Harness([], backend_url=url, config={"timeouts": {"idle": 30}}) as harness:
            started = clock.monotonic()
            result = harness.chat("hi", stream=True)
            assert result.done and result.outcome == "ok"
            assert clock.monotonic() - started < 8  # not the backend's 10 s, nor the 30 s idle timeout
    finally:
        server.shutdown()
