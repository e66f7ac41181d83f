"""Attacks from the hardening review, each reproduced through real gunicorn gevent workers
against the canned llama-server: duplicate request ids, work before auth, slow bodies,
Expect: 100-continue, cancel of plain requests, buffered data across a stop, bodies too
large for their answer to survive a reset."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import openai
import pytest
import requests

from gateway.storage import keys
from .conftest import ROUTES, read_response, read_responses

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def guarded(start_gateway, canned_url, logs):
    keys_file = logs / "hardening-keys.yaml"
    gw_keys = {name: keys.add_key(keys_file, name, role) for name, role in
               (("alice", "user"), ("mallory", "user"), ("ops", "admin"))}
    doc = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "max_body_bytes": 4 * 1024 * 1024,
        "backends": {"chat": {"urls": [canned_url], "max_in_flight": 4, "queue_timeout": 2}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
            {"validate": {"max_tokens_limit": 256}},
        ]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }
    gw = start_gateway(doc)
    gw.keys = gw_keys
    return gw


def auth(gw, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.keys[who]}"}


def status(gw) -> dict:
    return requests.get(gw.url + "/admin/status", headers=auth(gw, "ops"), timeout=5).json()


def idle(gw, timeout: float = 5) -> dict:
    """The worker's status once nothing is in flight (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        now = status(gw)
        if (now["in_flight"] == 0 and now["backends"]["chat"]["in_flight"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def address(gw) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").split(":")
    return host, int(port)


def request_head(gw, length: int, headers: dict[str, str] | None = None) -> bytes:
    host, port = address(gw)
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# 1. Duplicate request ids -------------------------------------------------------------

def test_duplicate_request_ids_never_leak_a_slot(guarded):
    """Two overlapping requests with one x-request-id used to share one in-flight entry:
    the first to finish removed it, the second got a 500 and kept its slot. Three such
    pairs left a 4-slot backend full with nothing running."""
    slow = dict(CHAT, stream=True, canned={"delay": 0.05, "events": 10})
    fast = dict(CHAT, stream=True, canned={"events": 1})

    def one(body, request_id, leave_early=False, error=False):
        payload = dict(body, canned=dict(body["canned"], status=500)) if error else body
        with requests.post(guarded.url + "/v1/chat/completions", json=payload, stream=True, timeout=10,
                           headers={**auth(guarded, "alice"), "X-Request-Id": request_id}) as resp:
            if leave_early:
                next(resp.iter_lines())
                return resp.status_code
            resp.content
            return resp.status_code

    jobs = []
    for pair in range(3):
        rid = f"dup-{pair}"
        jobs += [(slow, rid, False, False), (fast, rid, False, False), (slow, rid, True, False), (fast, rid, False, True)]
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i, j=j: results.__setitem__(i, one(*j))) for i, j in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # every request got its own answer: the backend's 500 for the scripted errors, 200 otherwise
    assert [results[i] for i in range(len(jobs))] == [500 if job[3] else 200 for job in jobs]
    now = idle(guarded)
    assert now["in_flight"] == 0 and now["backends"]["chat"]["in_flight"] == 0
    assert now["backends"]["chat"]["queued"] == 0
    # and the backend takes four at once again
    after: list[int] = []
    with_slots = [threading.Thread(target=lambda: after.append(one(slow, "after"))) for _ in range(4)]
    for thread in with_slots:
        thread.start()
    for thread in with_slots:
        thread.join()
    assert after == [200] * 4


def test_reusing_a_live_request_id_does_not_steal_its_cancel(guarded):
    body = dict(CHAT, stream=True, canned={"delay": 0.1, "events": 60})
    with requests.post(guarded.url + "/v1/chat/completions", json=body, stream=True, timeout=10,
                       headers={**auth(guarded, "alice"), "X-Request-Id": "shared-id"}) as victim, \
            requests.post(guarded.url + "/v1/chat/completions", json=body, stream=True, timeout=10,
                          headers={**auth(guarded, "mallory"), "X-Request-Id": "shared-id"}) as squatter:
        victim_lines, squatter_lines = victim.iter_lines(), squatter.iter_lines()
        next(line for line in victim_lines if line)
        next(line for line in squatter_lines if line)
        done = requests.post(guarded.url + "/v1/requests/shared-id/cancel", headers=auth(guarded, "alice"), timeout=5)
        assert done.status_code == 200
        assert json.loads([l for l in victim_lines if l][-1][6:])["error"]["code"] == "request_cancelled"
        # mallory's own request is untouched by alice's cancel
        assert [l for l in squatter_lines if l][-1] == b"data: [DONE]"
    assert idle(guarded)["in_flight"] == 0


# 2. Work before auth ------------------------------------------------------------------

def worker_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_no_key_gets_401_before_its_body_is_read(guarded):
    """The answer comes while the 4 MiB body has not even been sent."""
    with socket.create_connection(address(guarded), timeout=10) as sock:
        sock.sendall(request_head(guarded, 4 * 1024 * 1024))
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"invalid_api_key" in answer


def test_unauthenticated_bodies_cost_no_parsing_and_health_stays_up(guarded):
    """4 MiB of `{}` objects without a key used to take 2.4-3.5 s of the worker's CPU each
    to parse before the 401, and /health waited behind them."""
    pid = status(guarded)["pid"]
    body = b'{"model":"smollm2","messages":[' + b",".join([b"{}"] * 1_390_000) + b"]}"
    assert len(body) <= 4 * 1024 * 1024
    before = worker_cpu_seconds(pid)
    refused: list[bytes] = []

    def send_one() -> None:
        with socket.create_connection(address(guarded), timeout=20) as sock:
            try:
                sock.sendall(request_head(guarded, len(body)) + body)
            except OSError:  # the gateway answered and closed before taking it all
                pass
            refused.append(read_response(sock)[:12])

    senders = [threading.Thread(target=send_one) for _ in range(8)]
    for thread in senders:
        thread.start()
    health = [requests.get(guarded.url + "/health", timeout=5).status_code for _ in range(5)]
    for thread in senders:
        thread.join()
    used = worker_cpu_seconds(pid) - before
    assert health == [200] * 5
    assert refused == [b"HTTP/1.1 401"] * 8
    # Parsing one such body took seconds; eight refused unread take a fraction of one.
    assert used < 1.0, f"the worker spent {used:.2f} s of CPU on unauthenticated bodies"


# Bodies too large: the answer must reach a client still sending ---------------------------

BIG = 50 * 1024 * 1024  # what an SDK sends without Expect: 100-continue


def counting(client_class, uploads: list):
    """An httpx client for the openai SDK that counts the requests it sends (retries too)."""
    async def count_async(request):
        uploads.append(request.url.path)

    def count(request):
        uploads.append(request.url.path)

    hook = count_async if client_class is openai.DefaultAsyncHttpxClient else count
    return client_class(event_hooks={"request": [hook]})


def test_a_body_too_large_gets_a_413_the_openai_clients_can_read(guarded):
    """The gateway refused a 50 MB body from its Content-Length and closed with the body
    unread: the reset reached the client while it was still sending. AsyncOpenAI then
    dropped the 413 it had not read yet, reported a connection error and uploaded the
    50 MB twice more (its retries)."""
    content = "x" * BIG
    messages = [{"role": "user", "content": content}]
    uploads: list[str] = []

    async def ask_async():
        client = openai.AsyncOpenAI(base_url=guarded.url + "/v1", api_key=guarded.keys["alice"],
                                    http_client=counting(openai.DefaultAsyncHttpxClient, uploads))
        async with client:
            await client.chat.completions.create(model="smollm2", messages=messages)

    with pytest.raises(openai.APIStatusError) as refused:
        asyncio.run(ask_async())
    assert refused.value.status_code == 413
    assert refused.value.body["type"] == "invalid_request_error" and "limit" in refused.value.body["message"]
    assert uploads == ["/v1/chat/completions"]  # once: a 413 is not retried, a connection error would be

    uploads.clear()
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=guarded.keys["alice"],
                           http_client=counting(openai.DefaultHttpxClient, uploads))
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="smollm2", messages=messages)
    assert refused.value.status_code == 413 and uploads == ["/v1/chat/completions"]

    answer = requests.post(guarded.url + "/v1/chat/completions", data=content.encode(), timeout=30,
                           headers=auth(guarded, "alice"))
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "invalid_request_error"


def test_a_client_sends_its_whole_refused_body_without_a_reset(guarded):
    """What every HTTP/1.1 client library does, send the request then read: the 50 MB go
    out whole (discarded), then the 413 and a clean end, not a reset."""
    with socket.create_connection(address(guarded), timeout=30) as sock:
        sock.sendall(request_head(guarded, BIG, auth(guarded, "alice")) + b"x" * BIG)  # no reset while sending
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"
        assert sock.recv(65536) == b""  # the gateway's half-close: the answer is whole


def test_an_unauthenticated_body_is_not_drained(guarded):
    """Without a key the gateway discards little after its 401: a client sending 50 MB is
    cut off (its kernel gets the reset) instead of having them read, and one that keeps
    sending steadily is dropped within seconds, long before it is done."""
    with socket.create_connection(address(guarded), timeout=30) as sock:
        with pytest.raises(OSError):  # reset or broken pipe: the 50 MB were not all taken
            sock.sendall(request_head(guarded, BIG) + b"x" * BIG)
        assert read_response(sock).startswith(b"HTTP/1.1 401")
    planned = 300  # pieces of 4 KiB, one every 0.1 s: 30 s of sending
    with socket.create_connection(address(guarded), timeout=30) as sock:
        sock.sendall(request_head(guarded, planned * 4096))
        assert read_response(sock).startswith(b"HTTP/1.1 401")
        sent = 0
        try:
            while sent < planned:
                sock.sendall(b"x" * 4096)
                sent += 1
                time.sleep(0.1)
        except OSError:
            pass
    assert sent < planned / 2, f"the gateway took {sent} of {planned} pieces after its 401"


# 3. Slow bodies -------------------------------------------------------------------------

def trickle(gw, headers: dict[str, str], length: int, every: float, results: list, stop: threading.Event) -> None:
    with socket.create_connection(address(gw), timeout=30) as sock:
        sock.sendall(request_head(gw, length, headers))
        sock.settimeout(every)
        answer = b""
        for _ in range(length):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
            if stop.is_set():
                break
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        results.append(answer)


def test_a_trickled_body_gets_408_within_its_deadline(guarded):
    """One byte every 0.5 s never tripped the per-read timeout: six clients held their
    connections for as long as they liked. Now a 200-byte body must arrive within
    2 s + 200 / body_min_rate, so each gets 408 long before it would have finished."""
    results: list[bytes] = []
    stop = threading.Event()
    threads = [threading.Thread(target=trickle, args=(guarded, auth(guarded, "alice"), 200, 0.5, results, stop))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    assert len(results) == 6
    for answer in results:  # all six answered before sending even 60 of their 200 bytes
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"request_timeout" in answer
    assert requests.get(guarded.url + "/health", timeout=5).status_code == 200


def test_an_unauthenticated_trickle_is_refused_and_disconnected(guarded):
    """Without a key the body is never read, and the connection is closed rather than
    drained (a drain would let the trickle hold it)."""
    results: list[bytes] = []
    stop = threading.Event()
    thread = threading.Thread(target=trickle, args=(guarded, {}, 200, 0.2, results, stop))
    thread.start()
    thread.join(timeout=30)
    stop.set()
    assert results and results[0].startswith(b"HTTP/1.1 401")


# 11. Expect: 100-continue ---------------------------------------------------------------

def expect(gw, headers: dict[str, str], length: int) -> bytes:
    """What the gateway says to a request that waits for 100 Continue, before any body."""
    with socket.create_connection(address(gw), timeout=10) as sock:
        sock.sendall(request_head(gw, length, {"Expect": "100-continue", **headers}))
        sock.settimeout(5)
        return sock.recv(65536)


def test_expect_continue_is_refused_before_the_body_when_too_large(guarded):
    first = expect(guarded, auth(guarded, "alice"), 64 * 1024 * 1024)
    assert first.startswith(b"HTTP/1.1 413"), first[:200]
    assert b"100 Continue" not in first


def test_expect_continue_without_a_key_is_never_invited(guarded):
    first = expect(guarded, {}, 1000)
    assert first.startswith(b"HTTP/1.1 401"), first[:200]


def test_expect_continue_is_invited_once_accepted(guarded):
    body = json.dumps(CHAT).encode()
    with socket.create_connection(address(guarded), timeout=10) as sock:
        sock.sendall(request_head(guarded, len(body), {"Expect": "100-continue", **auth(guarded, "alice")}))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_client_cannot_forge_the_invitation_header(guarded):
    """The worker alone decides whether the app owes a 100 Continue."""
    body = json.dumps(CHAT).encode()
    with socket.create_connection(address(guarded), timeout=10) as sock:
        sock.sendall(request_head(guarded, len(body), {"Llamagate-Expect-Continue": "1", **auth(guarded, "alice")})
                     + body)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_an_answer_that_leaves_the_body_unread_says_it_closes(guarded):
    """The connection of a request whose body was left unread is closed, not drained; the
    answer used to say keep-alive all the same, so a pipelined next request was lost
    without a word."""
    host, port = address(guarded)
    key = guarded.keys["alice"]
    unread = (f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
              f"Content-Length: 2\r\n\r\n{{}}").encode()
    plain = f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    for first in (unread, request_head(guarded, 1000)):  # a body nobody reads; a 401 before the body
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(first + plain)
            head = read_response(sock).partition(b"\r\n\r\n")[0].lower()
        assert b"connection: close" in head, head
    with socket.create_connection((host, port), timeout=10) as sock:  # read bodies keep the connection
        sock.sendall(plain + plain)
        first, second = read_responses(sock, 2)
        assert b"connection: keep-alive" in first.lower() and second.startswith(b"HTTP/1.1 200")
