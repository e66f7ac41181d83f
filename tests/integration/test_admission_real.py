"""Admission through the real parts: gunicorn gevent workers, a real llama-server with 2
slots (the session's ``chat_backend``), a real Redis where admission is shared.

* Shared admission after Redis lost its keys (a restart without persistence, a FLUSHDB):
  the leases of the requests in flight come back, and no request is sent to llama-server
  past its slots meanwhile.
* Local admission (the shipped default) serves clients in turn: a key flooding the
  backend does not make another key's requests wait behind its whole queue, and it holds
  only its share of the queue's places.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest
import requests

from gateway.storage import keys
from gateway.testing import free_port

from .conftest import ROUTES, until
from .test_shared_real import OwnRedis, processing, total_plain

PREFIX = "t17:"
SLOTS_KEY = PREFIX + "admission:chat:slots:0"
WAITERS_KEY = PREFIX + "admission:chat:waiters"


class Stream(threading.Thread):
    """One streamed chat completion in a thread: when it was sent, when its first token
    and its end came, how it ended."""

    def __init__(self, gw, key: str, tokens: int, stop: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.gw, self.key, self.tokens, self.stop = gw, key, tokens, stop
        self.sent_at = time.monotonic()
        self.first_at: float | None = None
        self.ended_at: float | None = None
        self.status: int | None = None
        self.error: dict[str, Any] | None = None
        self.last: bytes | None = None
        self.start()

    def run(self) -> None:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count from one to a thousand."}],
                "max_tokens": self.tokens, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {self.key}", "Connection": "close"}
        try:
            with requests.post(self.gw.url + "/v1/chat/completions", json=body, headers=headers, stream=True,
                               timeout=300) as resp:
                self.status = resp.status_code
                if resp.status_code != 200:
                    self.error = resp.json()["error"]
                    return
                for line in resp.iter_lines():
                    if not line:
                        continue
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                    self.last = line
                    if self.stop is not None and self.stop.is_set():
                        break  # the test is over: leave the stream
        except requests.RequestException as exc:
            self.error = {"code": type(exc).__name__}
        finally:
            self.ended_at = time.monotonic()

    @property
    def wait(self) -> float:
        assert self.first_at is not None
        return self.first_at - self.sent_at


def gateway_with_keys(start_gateway, backend: str, logs, name: str, clients: tuple[str, ...],
                      backend_config: dict[str, Any], shared: dict[str, Any] | None = None):
    keys_file = logs / f"{name}-keys.yaml"
    made = {client: keys.add_key(keys_file, client, "user") for client in clients}
    made["ops"] = keys.add_key(keys_file, "ops", "admin")
    doc: dict[str, Any] = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [backend], **backend_config}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"auth": {"keys_file": str(keys_file), "env_keys": {}}}]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }
    if shared is not None:
        doc["shared"] = shared
    gw = start_gateway(doc, workers=2)
    gw.keys = made
    return gw


def limits_read(gw, limit: int) -> bool:
    """Six answers in a row (from either worker) say the backend's limit is ``limit``:
    the workers read llama-server's slots from /props."""
    for _ in range(6):
        answer = requests.get(gw.url + "/admin/status", headers={"Authorization": f"Bearer {gw.keys['ops']}",
                                                                  "Connection": "close"}, timeout=10)
        if answer.json()["backends"]["chat"]["limit"] != limit:
            return False
    return True


def deferred(backend: str) -> float:
    """Requests llama-server defers now (a gauge): sent while all its slots were busy."""
    return total_plain(requests.get(backend + "/metrics", timeout=5).text, "llamacpp:requests_deferred")


class Peaks(threading.Thread):
    """While a test runs, the most requests llama-server deferred at once and the most
    slots taken in a Redis sorted set of shared admission."""

    def __init__(self, backend: str, client, slots_key: str) -> None:
        super().__init__(daemon=True)
        self.backend, self.client, self.slots_key = backend, client, slots_key
        self.deferred = 0.0
        self.slots = 0
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.deferred = max(self.deferred, deferred(self.backend))
            self.slots = max(self.slots, self.client.zcard(self.slots_key))
            time.sleep(0.05)

    def __enter__(self) -> Peaks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


# Item 4: shared admission after Redis lost its keys ------------------------------------------------

@pytest.fixture(scope="module")
def own_redis(logs):
    own = OwnRedis(logs)
    own.start()
    yield own
    own.stop()


def test_leases_come_back_after_redis_lost_its_keys(start_gateway, chat_backend, own_redis, logs):
    """Two streams hold the 2 slots, Redis loses every key, a third request comes: it waits
    in the queue (the two leases in Redis again), and llama-server never had to defer a
    request (never more sent to it than its slots)."""
    shared = {"redis_url": own_redis.url, "prefix": PREFIX, "admission": "redis", "lease": 3}
    gw = gateway_with_keys(start_gateway, chat_backend, logs, "flush", ("alice", "bob"), {"queue_timeout": 120},
                           shared)
    redis_client = own_redis.client
    until(lambda: limits_read(gw, 2), 30, "the gateway never read /props")
    until(lambda: processing(chat_backend) == 0, 60, "llama-server was busy")
    holders = [Stream(gw, gw.keys["alice"], tokens) for tokens in (300, 450)]
    until(lambda: all(s.first_at for s in holders) or any(s.ended_at for s in holders), 60,
          "the two streams did not start")
    assert all(s.first_at for s in holders), [(s.status, s.error) for s in holders]  # one failed once in CI
    assert redis_client.zcard(SLOTS_KEY) == 2

    with Peaks(chat_backend, redis_client, SLOTS_KEY) as peaks:
        redis_client.flushdb()
        third = Stream(gw, gw.keys["bob"], 8)
        # the holders' leases are written back, the third request waits in the queue
        try:
            until(lambda: redis_client.zcard(SLOTS_KEY) == 2 and redis_client.zcard(WAITERS_KEY) == 1, 10, "")
        except AssertionError:
            raise AssertionError(f"the leases never came back: {redis_client.zcard(SLOTS_KEY)} slots taken, "
                                 f"{redis_client.zcard(WAITERS_KEY)} waiting; llama-server deferred "
                                 f"{deferred(chat_backend):g} request(s)") from None
        for stream in holders + [third]:
            stream.join(120)
    for stream in holders + [third]:
        assert stream.status == 200 and stream.last == b"data: [DONE]", (stream.status, stream.error, stream.last)
    assert peaks.slots <= 2
    assert peaks.deferred == 0  # llama-server never got a request past its slots


# Item 6: local admission, clients in turn ---------------------------------------------------------

MAX_QUEUE = 64
FLOOD_PLACES = 16  # a client's places in each worker's queue: a quarter of MAX_QUEUE
FLOOD_STREAMS = 40  # more than both workers' 1 slot + 16 places
FLOOD_TOKENS = 32
LIGHT_REQUESTS = 4
LIGHT_EVERY = 2  # seconds: well within the light key's turns (every other one on each worker)


def test_local_admission_serves_a_light_client_between_a_flooders_requests(start_gateway, chat_backend, logs):
    """One key keeps 40 streams going on a 2-slot backend (1 slot per worker), another
    sends a short stream every 2 seconds. The light key's first tokens come within about a turn
    (well before the flooder's own, which wait behind its queue); the flooder, holding its
    share of the queue's places, is refused with 503 queue_full while the light key queues."""
    gw = gateway_with_keys(start_gateway, chat_backend, logs, "turns", ("flood", "light"),
                           {"max_queue": MAX_QUEUE, "queue_timeout": 300})
    until(lambda: limits_read(gw, 1), 30, "the workers never read /props")
    until(lambda: processing(chat_backend) == 0, 60, "llama-server was busy")
    stop = threading.Event()
    flood: list[Stream] = []
    flood_lock = threading.Lock()

    def flooder() -> None:
        while not stop.is_set():
            stream = Stream(gw, gw.keys["flood"], FLOOD_TOKENS, stop)
            with flood_lock:
                flood.append(stream)
            stream.join()
            if stream.status != 200:
                time.sleep(0.5)  # refused: try again, as a client would

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(FLOOD_STREAMS)]
    for thread in threads:
        thread.start()
    try:
        # the light key comes once the flooder's waits are what its full queues make them:
        # half its places on each worker went through
        until(lambda: sum(s.ended_at is not None and s.status == 200 for s in list(flood)) >= FLOOD_PLACES, 300,
              "the flooder's streams did not get through")
        light = []
        for _ in range(LIGHT_REQUESTS):
            light.append(Stream(gw, gw.keys["light"], 8))
            time.sleep(LIGHT_EVERY)
        for stream in light:
            stream.join(300)
        window = (light[0].sent_at, max(s.first_at or s.ended_at for s in light))
    finally:
        stop.set()
    for thread in threads:
        thread.join(300)
    refused = [s for s in flood if s.status == 503]
    # the flooder's streams that got their first token while the light key's were served
    flood_waits = [s.wait for s in flood if s.first_at is not None and window[0] <= s.first_at <= window[1]]
    light_waits = [s.wait for s in light if s.first_at is not None]
    turns = [s.ended_at - s.first_at for s in flood if s.first_at is not None and s.last == b"data: [DONE]"]
    report = (f"light waits {sorted(round(w, 2) for w in light_waits)}, flooder waits "
              f"{sorted(round(w, 2) for w in flood_waits)}, a turn (p50) {statistics.median(turns):.2f} s, "
              f"the flooder refused {len(refused)} times")
    print(report)
    assert [s.status for s in light] == [200] * LIGHT_REQUESTS, [s.error for s in light]
    assert all(s.last == b"data: [DONE]" for s in light)
    # the queue (64) never filled: the flooder was refused for holding its own share of it
    assert refused and all(s.error["code"] == "queue_full" and "your requests" in s.error["message"]
                           for s in refused), [s.error for s in refused][:3]
    assert all(s.status in (200, 503) for s in flood)
    assert len(flood_waits) >= 2, report
    assert statistics.median(light_waits) * 3 < statistics.median(flood_waits), report


# Item 10: shared admission and a replica known to be down ------------------------------------------

def test_shared_admission_gives_no_slot_on_a_replica_known_down(start_gateway, chat_backend, own_redis, logs):
    """Two replicas, the second down (nothing listens there; the health checks say so):
    four streams at once take the first replica's 2 slots and the other two wait, rather
    than take slots on the second and fail over to the first past its slots."""
    down = f"http://127.0.0.1:{free_port()}"
    prefix = PREFIX + "down:"
    shared = {"redis_url": own_redis.url, "prefix": prefix, "admission": "redis", "lease": 3}
    keys_file = logs / "down-keys.yaml"
    made = {"alice": keys.add_key(keys_file, "alice", "user"), "ops": keys.add_key(keys_file, "ops", "admin")}
    gw = start_gateway({
        "health_interval": 1,
        "admin_pipeline": "default",
        "shared": shared,
        "backends": {"chat": {"urls": [chat_backend, down], "queue_timeout": 120, "breaker_failures": 100}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"auth": {"keys_file": str(keys_file), "env_keys": {}}}]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }, workers=2)
    gw.keys = made

    def known() -> bool:  # both workers read the first's slots and found the second down
        for _ in range(6):
            chat = requests.get(gw.url + "/admin/status", headers={"Authorization": f"Bearer {made['ops']}",
                                                                   "Connection": "close"}, timeout=10).json()
            replicas = chat["backends"]["chat"]["replicas"]
            if replicas[0]["slots"] != 2 or replicas[1]["ready"] is not False:
                return False
        return True

    until(known, 30, "the workers never learnt the replicas' state")
    until(lambda: processing(chat_backend) == 0, 60, "llama-server was busy")
    with Peaks(chat_backend, own_redis.client, prefix + "admission:chat:slots:1") as peaks:
        streams = [Stream(gw, made["alice"], 96) for _ in range(4)]
        for stream in streams:
            stream.join(120)
    for stream in streams:
        assert stream.status == 200 and stream.last == b"data: [DONE]", (stream.status, stream.error)
    # no slot on the replica that is down, and none past the other's 2
    assert peaks.slots == 0 and peaks.deferred == 0, (peaks.slots, peaks.deferred)
