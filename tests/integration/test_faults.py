"""Faults, overload and lifecycle through the real parts: llama-server backends that are
killed, slowed and overloaded, gunicorn gevent workers that are stopped and reloaded."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from gateway.testing import free_port

from .conftest import ROUTES

PROMPTS = [f"Write one sentence about the number {n}." for n in range(10)]


def doc(chat_urls, pipeline=(), **backend):
    return {
        "health_interval": 0.5,
        "timeouts": {"idle": 5, "retry_deadline": 3},
        "backends": {"chat": {"urls": list(chat_urls), "connect_timeout": 1, **backend}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": list(pipeline)},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }


def chat(**extra):
    return {"model": "smollm2", "messages": [{"role": "user", "content": extra.pop("prompt", "Say hi.")}], **extra}


def stream_text(url: str, body: dict) -> tuple[str, list[dict]]:
    """Stream one chat answer; returns its text and its decoded events ([DONE] excluded)."""
    with requests.post(url + "/v1/chat/completions", json=dict(body, stream=True), stream=True, timeout=120) as resp:
        assert resp.status_code == 200, resp.text
        events = [line[6:] for line in resp.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]", events[-3:]
    decoded = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in decoded if c["choices"]), decoded


def busy(backend: str) -> int:
    return sum(1 for slot in requests.get(backend + "/slots", timeout=2).json() if slot["is_processing"])


@pytest.fixture(scope="module")
def pair(backends):
    """Two fresh llama-server replicas, four slots and one core each."""
    return [backends.start("--parallel", "4", "--ctx", "4096", "--threads", "1") for _ in range(2)]


def test_backend_killed_mid_stream_ends_the_stream_and_the_next_request_fails_over(backends, start_gateway):
    victims = [backends.start("--parallel", "1", "--ctx", "2048") for _ in range(2)]
    gw = start_gateway(doc(victims, ["router"]))
    body = chat(prompt="Write a very long story about a llama.", max_tokens=800, stream=True)
    with requests.post(gw.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        serving = next(url for url in victims if busy(url))
        backends.kill(serving)
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
    assert time.monotonic() - killed_at < 5  # within the idle timeout, not a hang
    last = json.loads(rest[-1][6:])
    assert last["error"]["type"] == "server_error" and "incomplete" in last["error"]["message"]
    assert b"[DONE]" not in b"".join(rest)
    for _ in range(3):
        answer = requests.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
        assert answer.status_code == 200
    replicas = requests.get(gw.url + "/health").json()["backends"]["chat"]["replicas"]
    assert next(r for r in replicas if r["url"] == serving)["ready"] is False


def test_every_backend_down_at_start_then_service_resumes_by_itself(backends, start_gateway):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = start_gateway(doc([url]), wait_healthy=False)
    resp = requests.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "service_unavailable"
    backends.start("--parallel", "1", "--ctx", "1024", port=port)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if requests.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the gateway did not resume once the backend came up")
    assert requests.get(gw.url + "/health").status_code == 200


def test_slow_backend_hits_the_configured_timeout(chat_backend, start_gateway):
    config = doc([chat_backend])
    config["timeouts"]["routes"] = {"/v1/chat/completions": {"first_byte": 0.05}}
    gw = start_gateway(config)
    started = time.monotonic()
    resp = requests.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=64), timeout=30)
    assert time.monotonic() - started < 2
    assert resp.status_code == 504
    error = resp.json()["error"]
    assert error["code"] == "timeout" and "did not start answering within 0.05 s" in error["message"]
    assert requests.post(gw.url + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 4},
                         timeout=30).status_code == 200  # other routes keep their own timeouts


def test_200_concurrent_streams_all_complete_and_match_the_plain_answers(pair, start_gateway):
    # one client (no auth) may hold a quarter of max_queue's places: 200 at once need 800
    config = doc(pair, ["router"], queue_timeout=120, max_queue=800)
    config["timeouts"]["idle"] = 60  # a prompt's prefill stalls the other slots' tokens, seconds on a busy machine
    gw = start_gateway(config)
    ask = {prompt: chat(prompt=prompt, max_tokens=4, temperature=0, seed=42) for prompt in PROMPTS}
    plain = {}
    for prompt, body in ask.items():
        answer = requests.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
        plain[prompt] = answer.json()["choices"][0]["message"]["content"]

    def one(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        return prompt, stream_text(gw.url, ask[prompt])[0]

    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    assert len(results) == 200
    mismatches = [(prompt, text) for prompt, text in results if text != plain[prompt]]
    assert not mismatches, f"{len(mismatches)} streamed answers differ, e.g. {mismatches[0]!r} vs {plain[mismatches[0][0]]!r}"
    assert all(busy(url) == 0 for url in pair)


def test_50_clients_that_disconnect_leave_every_slot_idle(pair, start_gateway):
    gw = start_gateway(doc(pair, ["router"], queue_timeout=60))
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps(chat(prompt="Write a very long story about a llama.", max_tokens=400, stream=True))
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()

    def leave_early(_: int) -> None:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request)
            sock.settimeout(0.5)
            try:
                sock.recv(1024)  # the first event, or nothing yet if it waits in the queue
            except socket.timeout:
                pass

    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(leave_early, range(50)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(busy(url) for url in pair):
        time.sleep(0.2)
    assert [busy(url) for url in pair] == [0, 0]
    # and the gateway is idle and serving
    assert requests.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30).status_code == 200


def test_overload_beyond_the_queue_gets_503_quickly_and_admitted_requests_complete(chat_backend, start_gateway):
    # one client (no key) may hold a quarter of the queue's places: 2 of 8
    gw = start_gateway(doc([chat_backend], max_in_flight=2, max_queue=8, queue_timeout=60))

    def call(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        resp = requests.post(gw.url + "/v1/chat/completions", timeout=60,
                             json=chat(prompt="Write a long story.", max_tokens=96))
        code = resp.json()["error"]["code"] if resp.status_code != 200 else None
        return resp.status_code, time.monotonic() - started, code

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(call, range(10)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) == 4 and len(refused) == 6  # two in flight, two queued
    assert all(code == "queue_full" and elapsed < 1.0 for _, elapsed, code in refused)


def test_sigterm_lets_streams_finish_and_refuses_new_requests(chat_backend, start_gateway):
    gw = start_gateway(doc([chat_backend]))
    session = requests.Session()
    assert session.get(gw.url + "/v1/models").status_code == 200  # a keep-alive connection
    result: dict = {}

    def long_stream() -> None:
        result["text"], result["events"] = stream_text(gw.url, chat(prompt="Count from one to forty in words.",
                                                                     max_tokens=150))

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    time.sleep(0.3)
    gw.proc.popen.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = session.get(gw.url + "/v1/models")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    streamer.join(30)
    assert result["text"] and result["events"][-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert gw.proc.popen.wait(timeout=10) == 0


class Traffic:
    """Three clients sending chat requests back to back, and one long stream, while the
    gateway is reloaded; afterwards ``failures`` lists every non-200 and ``text`` is the stream's."""

    def __init__(self, gw, keep_alive: bool) -> None:
        self.gw = gw
        self.failures: list[int] = []
        self.text = ""
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._stream)]
        self.threads += [threading.Thread(target=self._send, args=(requests.Session() if keep_alive else requests,))
                         for _ in range(3)]

    def _send(self, client) -> None:
        headers = {} if client is not requests else {"Connection": "close"}
        while not self.stop.is_set():
            resp = client.post(self.gw.url + "/v1/chat/completions", json=chat(max_tokens=4), headers=headers,
                               timeout=30)
            if resp.status_code != 200:
                self.failures.append(resp.status_code)

    def _stream(self) -> None:
        self.text = stream_text(self.gw.url, chat(prompt="Count from one to forty in words.", max_tokens=150))[0]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def test_hup_reload_drops_nothing_and_a_bad_file_keeps_the_old_config(chat_backend, start_gateway):
    # "Nothing dropped" holds for requests shorter than the graceful timeout: the fixture's 5 s
    # is shorter than the long stream on a loaded machine (150 tokens beside three clients),
    # which the replaced worker then cut (seen under load as the stream's thread raising).
    gw = start_gateway(doc([chat_backend]), GATEWAY_GRACEFUL_TIMEOUT="60")
    with Traffic(gw, keep_alive=False) as traffic:  # new connections reach the new workers
        config = yaml.safe_load(gw.config.read_text())
        config["models"]["smollm2"]["aliases"] = ["reloaded-alias"]
        gw.config.write_text(yaml.safe_dump(config))
        gw.proc.popen.send_signal(signal.SIGHUP)
        time.sleep(2.5)
    assert traffic.failures == []
    assert traffic.text
    alias = requests.post(gw.url + "/v1/chat/completions", json=chat(model="reloaded-alias", max_tokens=4), timeout=30)
    assert alias.status_code == 200 and alias.json()["model"] == "smollm2"

    config["backends"]["chat"]["max_connections"] = 0  # invalid
    gw.config.write_text(yaml.safe_dump(config))
    gw.proc.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30  # until the new workers have booted on the bad file (a loaded machine is slow)
    while "serving the last good configuration" not in gw.proc.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        still = requests.post(gw.url + "/v1/chat/completions", json=chat(model="reloaded-alias", max_tokens=4),
                              timeout=30)
    except requests.ConnectionError as exc:  # seen once under load; the log says which worker dropped it
        pytest.fail(f"{exc!r} right after the bad file's reload:\n{gw.proc.output()}")
    assert still.status_code == 200
    assert "backends.chat.max_connections: 0 is less than the minimum of 1" in gw.proc.output()
    assert "serving the last good configuration" in gw.proc.output()


def test_live_reload_of_an_edited_file_under_gunicorn_fails_no_request(chat_backend, start_gateway):
    gw = start_gateway(doc([chat_backend]), GATEWAY_RELOAD_INTERVAL="0.2")
    with Traffic(gw, keep_alive=True) as traffic:
        config = yaml.safe_load(gw.config.read_text())
        config["models"]["smollm2"]["aliases"] = ["live-alias"]
        gw.config.write_text(yaml.safe_dump(config))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alias = requests.post(gw.url + "/v1/chat/completions", json=chat(model="live-alias", max_tokens=4),
                                  timeout=30)
            if alias.status_code == 200:
                break
            time.sleep(0.1)
        assert alias.status_code == 200, "the edit did not take effect"
        config["backends"]["chat"]["max_connections"] = 0  # a bad edit
        gw.config.write_text(yaml.safe_dump(config))
        time.sleep(1)
    assert traffic.failures == [] and traffic.text
    assert requests.post(gw.url + "/v1/chat/completions", json=chat(model="live-alias", max_tokens=4),
                         timeout=30).status_code == 200
    output = gw.proc.output()
    assert "not reloading" in output and "backends.chat.max_connections: 0 is less than the minimum of 1" in output
    assert "Booting worker" in output and output.count("Booting worker") == 1  # no restart


def test_backend_api_key_is_sent_and_a_refused_one_is_a_gateway_error(backends, start_gateway):
    guarded = backends.start("--parallel", "1", "--ctx", "1024", "--threads", "1", "--api-key", "backend-secret")
    assert requests.post(guarded + "/v1/chat/completions", json=chat(max_tokens=2)).status_code == 401
    good = start_gateway(doc([guarded], ["validate"], api_key="backend-secret"))
    resp = requests.post(good.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
    assert resp.status_code == 200
    slots = requests.get(good.url + "/health").json()["backends"]["chat"]["replicas"][0]["slots"]
    assert slots == 1  # /props read with the key
    bad = start_gateway(doc([guarded], api_key="wrong"))
    resp = requests.post(bad.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_auth_failed"
    assert "backend-secret" not in good.proc.output() + bad.proc.output()


def test_context_check_uses_the_replicas_credentials(backends, start_gateway):
    guarded = backends.start("--parallel", "1", "--ctx", "512", "--threads", "1", "--api-key", "k2")
    gw = start_gateway(doc([guarded], [{"validate": {"context_check": True}}], api_key="k2"))
    resp = requests.post(gw.url + "/v1/chat/completions", json=chat(prompt="llama " * 600, max_tokens=8), timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
