"""Generation that nobody will read stops, and what was generated is charged: plain
(non-streamed) requests cancelled or abandoned, and streams left early, through real
gunicorn and a real llama-server (SmolLM2)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from gateway.storage import keys

from .conftest import ROUTES

LONG = {"model": "smollm2", "max_tokens": 1500, "ignore_eos": True, "temperature": 0.7,
        "messages": [{"role": "user", "content": "Write a very long story about a llama."}]}


@pytest.fixture(scope="module")
def metered(start_gateway, backends, logs):
    # a backend of its own: the tests below watch its slots
    backend = backends.start("--parallel", "2", "--ctx", "2048", "--threads", "1")
    keys_file = logs / "stops-keys.yaml"
    user = keys.add_key(keys_file, "alice", "user")
    streamer = keys.add_key(keys_file, "bob", "user")
    doc = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [backend]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [
            {"accesslog": {"path": str(logs / "stops-access.log")}},
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
            # 10 tokens a second refill: a charge of ~80 tokens stays visible for seconds
            {"ratelimit": {"requests_per_minute": None, "tokens_per_minute": 600}},
        ]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }
    gw = start_gateway(doc)
    gw.backend, gw.user, gw.streamer, gw.access_log = backend, user, streamer, logs / "stops-access.log"
    return gw


def busy(backend: str) -> bool:
    return any(slot["is_processing"] for slot in requests.get(backend + "/slots", timeout=5).json())


def decoded(backend: str) -> int:
    """Tokens generated so far by the slots at work."""
    return sum(token.get("n_decoded", 0) for slot in requests.get(backend + "/slots", timeout=5).json()
               if slot["is_processing"] for token in slot.get("next_token") or [])


def wait_generating(backend: str, tokens: int = 20) -> None:
    """Until llama-server has generated ``tokens`` (a loaded machine may take seconds
    over the prompt: a fixed pause could end before the first token)."""
    deadline = time.monotonic() + 30
    while decoded(backend) < tokens:
        assert time.monotonic() < deadline, f"llama-server never generated {tokens} tokens"
        time.sleep(0.02)


def wait_idle(backend: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while busy(backend):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def access_record(gw, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while True:
        for line in gw.access_log.read_text().splitlines() if gw.access_log.exists() else []:
            record = json.loads(line)
            if record["request_id"] == request_id and record["route"] == "/v1/chat/completions":
                return record
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.05)


def test_cancel_of_a_plain_request_stops_the_generation(metered):
    """A plain request used to be sent to llama-server as a plain request, which it
    generates to the end even when the connection closes: a cancel answered 200 and
    the backend did all the work anyway."""
    headers = {"Authorization": f"Bearer {metered.user}", "X-Request-Id": "plain-cancel"}
    answer: dict = {}
    caller = threading.Thread(target=lambda: answer.update(resp=requests.post(
        metered.url + "/v1/chat/completions", json=LONG, headers=headers, timeout=120)))
    caller.start()
    wait_generating(metered.backend)
    cancelled = requests.post(metered.url + "/v1/requests/plain-cancel/cancel", timeout=5,
                              headers={"Authorization": f"Bearer {metered.user}"})
    assert cancelled.status_code == 200
    # 1500 tokens take this llama-server many seconds; the cancel stops it at once
    assert wait_idle(metered.backend, within=3), "llama-server kept generating after the cancel"
    caller.join(timeout=10)
    resp = answer["resp"]
    assert resp.status_code == 499 and resp.json()["error"]["code"] == "request_cancelled"
    record = access_record(metered, "plain-cancel")
    assert record["outcome"] == "cancelled"
    assert record["completion_tokens"] and record["completion_tokens"] < 1500  # charged what was generated


def test_a_client_that_gives_up_on_a_plain_request_stops_the_generation(metered):
    """llama-server generates a plain answer to the end for nobody when its client
    leaves; the gateway notices the hang-up and stops it."""
    body = json.dumps(LONG).encode()
    host, port = metered.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {metered.user}\r\nX-Request-Id: plain-gone\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        wait_generating(metered.backend)
    assert wait_idle(metered.backend, within=3), "llama-server kept generating for a client that left"
    record = access_record(metered, "plain-gone")
    assert record["outcome"] == "client_gone"
    assert record["completion_tokens"] and record["completion_tokens"] < 1500


def test_a_stream_left_early_is_charged_what_was_generated(metered):
    """Tokens came only from the usage chunk at the end of a stream: a client that left
    early paid nothing, in the rate limiter, the access log and StatsD alike."""
    headers = {"Authorization": f"Bearer {metered.streamer}"}
    tiny = {"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}

    def remaining() -> int:
        resp = requests.post(metered.url + "/v1/chat/completions", headers=headers, json=tiny, timeout=60)
        assert resp.status_code == 200
        return int(resp.headers["x-ratelimit-remaining-tokens"])

    before = remaining()
    body = dict(LONG, stream=True, max_tokens=300)
    with requests.post(metered.url + "/v1/chat/completions", json=body, stream=True, timeout=60,
                       headers={**headers, "X-Request-Id": "left-early"}) as resp:
        lines = resp.iter_lines()
        read = [next(line for line in lines if line) for _ in range(40)]
    assert len(read) == 40
    record = access_record(metered, "left-early")
    assert record["outcome"] == "client_gone"
    assert record["prompt_tokens"] and record["prompt_tokens"] > 10
    assert 38 <= record["completion_tokens"] < 300
    charged = before - remaining()
    # the budget fell by the stream's tokens (less what refilled meanwhile, 10 a second)
    assert charged >= record["prompt_tokens"] + record["completion_tokens"] - 20, charged
