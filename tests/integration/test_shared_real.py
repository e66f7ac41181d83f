"""One gateway out of many workers and hosts, through the real parts: two gateway
instances (two gunicorn masters on two ports) of two gevent workers each, one real
Redis they share (``shared:``, ``admission: redis``), one real llama-server with 4 slots,
and a real Prometheus scraping both instances."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from gateway.storage import keys
from gateway.cli import inspection
from gateway.testing import free_port

from .conftest import ROUTES, Proc, until
from .test_prometheus_real import total

PREFIX = "t11:"
SLOTS_KEY = PREFIX + "admission:chat:slots:0"  # the one replica's
WAITERS_KEY = PREFIX + "admission:chat:waiters"
LEASE = 3


class OwnRedis:
    """A redis-server of this module's, on a fixed port so that it can stop and come back."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.logs = logs
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], self.logs / f"redis-shared-{self.port}-{time.monotonic_ns()}.log")
        until(lambda: self._pings(), 10, "redis-server did not start")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stop()


@pytest.fixture(scope="module")
def shared_redis(logs):
    own = OwnRedis(logs)
    own.start()
    yield own
    own.stop()


@pytest.fixture(scope="module")
def four_slots(backends) -> str:
    return backends.start("--parallel", "4", "--ctx", "4096", "--threads", "1")


@pytest.fixture(scope="module")
def pair(start_gateway, four_slots, shared_redis, logs):
    keys_file = logs / "shared-keys.yaml"
    made = {name: keys.add_key(keys_file, name, role) for name, role in
            (("alice", "user"), ("bob", "user"), ("carol", "user"), ("mallory", "user"), ("ops", "admin"))}
    doc = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "shared": {"redis_url": shared_redis.url, "prefix": PREFIX, "admission": "redis", "lease": LEASE},
        "backends": {"chat": {"urls": [four_slots], "queue_timeout": 60}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": ["prometheus", {"auth": {"keys_file": str(keys_file), "env_keys": {}}}]},
        "routes": dict({route: "default" for route in ROUTES if route != "/v1/embeddings"},
                       **{"/metrics": {"pipeline": "default"}}),
    }
    instances = []
    for name in ("a", "b"):
        metrics_dir = logs / f"shared-metrics-{name}"
        metrics_dir.mkdir()
        instances.append(start_gateway(doc, workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)))
    for gw in instances:
        gw.keys = made
    # both instances know the backend's 4 slots before the tests count on them
    for gw in instances:
        until(lambda: status(gw)["backends"]["chat"]["limit"] == 4, 30, "the gateway never read /props")
    return instances


def auth(gw, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.keys[who]}", "Connection": "close"}


def status(gw) -> dict:
    return requests.get(gw.url + "/admin/status", headers=auth(gw, "ops"), timeout=10).json()


def processing(backend: str) -> int:
    return sum(bool(slot.get("is_processing")) for slot in requests.get(backend + "/slots", timeout=5).json())


def body(tokens: int) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "Count from one to a thousand."}],
            "max_tokens": tokens, "ignore_eos": True, "stream": True}


class Stream(threading.Thread):
    """One streamed chat completion in a thread: when its first token came, how it ended."""

    def __init__(self, gw, who: str, tokens: int, request_id: str | None = None) -> None:
        super().__init__(daemon=True)
        self.gw, self.who, self.tokens, self.request_id = gw, who, tokens, request_id
        self.first_at: float | None = None
        self.started = threading.Event()
        self.status: int | None = None
        self.last: bytes | None = None
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        headers = auth(self.gw, self.who)
        if self.request_id:
            headers["X-Request-Id"] = self.request_id
        try:
            with requests.post(self.gw.url + "/v1/chat/completions", json=body(self.tokens), headers=headers,
                               stream=True, timeout=120) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if not line:
                        continue
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                        self.started.set()
                    self.last = line
        except requests.RequestException as exc:
            self.error = type(exc).__name__
        finally:
            self.started.set()

    @property
    def code(self) -> str | None:
        """The error code of a stream that ended with an error event."""
        if self.last is None or self.last == b"data: [DONE]":
            return None
        return json.loads(self.last[6:])["error"]["code"]


class Watch(threading.Thread):
    """Polls what is in flight while a test runs: llama-server's busy slots, the requests
    llama-server had to defer (sent while all its slots were busy) and Redis' slot count."""

    def __init__(self, backend: str, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.backend, self.client = backend, client
        self.max_processing = self.max_leases = 0
        self.deferred = 0.0
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.max_processing = max(self.max_processing, processing(self.backend))
            self.max_leases = max(self.max_leases, self.client.zcard(SLOTS_KEY))
            metrics = requests.get(self.backend + "/metrics", timeout=5).text
            self.deferred = max(self.deferred, total_plain(metrics, "llamacpp:requests_deferred"))
            time.sleep(0.05)


def total_plain(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def idle(backend: str, client: redis.Redis) -> None:
    until(lambda: processing(backend) == 0 and client.zcard(SLOTS_KEY) == 0 and client.zcard(WAITERS_KEY) == 0,
          60, "the backend or the shared slots never became idle")


def scrape(gw) -> str:
    return requests.get(gw.url + "/metrics", headers=auth(gw, "ops"), timeout=10).text


# 0. Prometheus over both instances (first: no chat request was counted yet) --------------------

N = 12


def test_a_real_prometheus_sums_both_instances(pair, four_slots, logs):
    a, b = pair
    assert sum(total(scrape(gw), "llamagate_requests_total", route="/v1/chat/completions") for gw in pair) == 0
    for i in range(N):
        gw = pair[i % 2]
        resp = requests.post(gw.url + "/v1/chat/completions", headers=auth(gw, "alice"), timeout=60,
                             json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert resp.status_code == 200
    text = scrape(a)
    # The gateway's own metrics pass promtool's lint; llama-server's own, merged in under
    # their names, break two naming rules (':' in a name, a counter without _total), and
    # nothing else: the whole scrape parses.
    ours = "\n".join(line for line in text.splitlines() if "llamacpp:" not in line) + "\n"
    check = subprocess.run(["promtool", "check", "metrics"], input=ours, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    whole = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    findings = (whole.stdout + whole.stderr).splitlines()
    assert "llamacpp:" in text and findings
    assert all(f.startswith("llamacpp:") and ("should not contain ':'" in f or '"_total" suffix' in f)
               for f in findings), findings
    binary = shutil.which("prometheus")
    assert binary, "make test installs Debian's prometheus package"
    port = free_port()
    config = logs / "prometheus-shared.yml"
    targets = ", ".join(f'"{gw.url.removeprefix("http://")}"' for gw in pair)
    config.write_text(f"""global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: llamagate
    authorization: {{credentials: {a.keys["ops"]}}}
    static_configs: [{{targets: [{targets}]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={logs / 'prometheus-shared-data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=open(logs / "prometheus-shared.log", "wb"), stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def query(q: str) -> list:
            try:
                return requests.get(api, params={"query": q}, timeout=2).json()["data"]["result"]
            except (requests.RequestException, KeyError, ValueError):
                return []

        def both_scraped():
            up = query('up{job="llamagate"}')
            return len(up) == 2 and all(r["value"][1] == "1" for r in up)

        until(both_scraped, 60, "prometheus never scraped both instances", pause=0.5)
        per_instance = until(lambda: query('sum by (instance) (llamagate_requests_total{route="/v1/chat/completions"})'),
                             30, "no request counter in prometheus", pause=0.5)
        assert sum(float(r["value"][1]) for r in per_instance) == N
        assert len(per_instance) == 2 and all(float(r["value"][1]) > 0 for r in per_instance)
        replica = until(lambda: query('llamacpp:prompt_tokens_total{backend="chat"}'), 30, "no replica metric", 0.5)
        assert replica[0]["metric"]["replica"] == four_slots
    finally:
        proc.terminate()
        proc.wait(10)


# 1. Cancel anywhere ------------------------------------------------------------------------------

def test_ten_cancels_reach_the_other_instance(pair, four_slots, shared_redis):
    for i in range(10):
        holder, other = pair[i % 2], pair[(i + 1) % 2]
        stream = Stream(holder, "alice", 400, request_id=f"cross-{i}")
        assert stream.started.wait(60) and stream.first_at is not None, stream.error
        answer = requests.post(other.url + f"/v1/requests/cross-{i}/cancel", headers=auth(other, "alice"), timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["cancelled"] is True
        stream.join(30)
        assert stream.code == "request_cancelled", stream.last
    idle(four_slots, shared_redis.client)  # every llama-server slot and shared lease came back


def test_a_cancel_elsewhere_keeps_the_ownership_rules(pair, four_slots, shared_redis):
    a, b = pair
    stream = Stream(a, "alice", 120, request_id="not-yours")
    assert stream.started.wait(60) and stream.first_at is not None
    refused = requests.post(b.url + "/v1/requests/not-yours/cancel", headers=auth(b, "mallory"), timeout=10)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "request_not_found"
    missing = requests.post(b.url + "/v1/requests/no-such-request/cancel", headers=auth(b, "alice"), timeout=10)
    assert missing.status_code == 404
    # an admin cancels every request on the backend, from the other instance
    done = requests.post(b.url + "/admin/backends/chat/cancel", headers=auth(b, "ops"), timeout=10)
    assert done.status_code == 200 and done.json()["cancelled"] == 1
    stream.join(30)
    assert stream.code == "request_cancelled"
    idle(four_slots, shared_redis.client)


# 2. Shared admission -----------------------------------------------------------------------------

def test_four_slots_across_both_instances_admin_first_clients_in_turn(pair, four_slots, shared_redis):
    """alice fills the 4 slots; bob queues 8, carol 1, an admin 1 (sent last). Never more
    than 4 at llama-server; the admin starts before every queued user; carol waits behind
    at most one of bob's (in turn), not all 8."""
    client = shared_redis.client
    watch = Watch(four_slots, client)
    try:
        alice = [Stream(pair[i % 2], "alice", tokens) for i, tokens in enumerate((48, 96, 144, 192))]
        for stream in alice:
            assert stream.started.wait(60) and stream.first_at is not None, stream.error
        bob = [Stream(pair[i % 2], "bob", 6) for i in range(8)]
        until(lambda: client.zcard(WAITERS_KEY) == 8, 30, "bob's 8 were not all queued")
        carol = Stream(pair[1], "carol", 6)
        until(lambda: client.zcard(WAITERS_KEY) == 9, 30, "carol was not queued")
        # the status of one instance sums both (snapshots are up to a second old)
        until(lambda: status(pair[0])["totals"]["backends"]["chat"] == {"in_flight": 4, "queued": 9}, 10,
              "the status never showed 4 in flight and 9 queued over both instances")
        admin = Stream(pair[0], "ops", 6)
        for stream in alice + bob + [carol, admin]:
            stream.join(120)
    finally:
        watch.stop.set()
        watch.join()
    every = alice + bob + [carol, admin]
    assert [s.status for s in every] == [200] * len(every) and all(s.code is None for s in every)
    assert watch.max_processing <= 4 and watch.max_leases <= 4 and watch.deferred == 0
    assert watch.max_processing == 4  # the slots were used
    assert all(admin.first_at < s.first_at for s in bob + [carol])
    bob_before_carol = sum(s.first_at < carol.first_at for s in bob)
    assert bob_before_carol <= 1, f"carol waited behind {bob_before_carol} of bob's requests"
    idle(four_slots, client)


def test_a_killed_worker_gives_its_slots_back(pair, four_slots, shared_redis):
    """Every worker of instance a holds a slot and is killed -9: the leases lapse within
    LEASE seconds and the requests queued on instance b proceed."""
    a, b = pair
    client = shared_redis.client
    held = [Stream(a, "alice", 2000) for _ in range(4)]
    for stream in held:
        assert stream.started.wait(60) and stream.first_at is not None
    waiting = [Stream(b, "bob", 4) for _ in range(2)]
    until(lambda: client.zcard(WAITERS_KEY) == 2, 30, "bob's requests were not queued")
    workers = children(a.proc.popen.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for stream in waiting:
        stream.join(60)
        assert stream.status == 200 and stream.code is None and stream.last == b"data: [DONE]"
    for stream in held:
        stream.join(30)
        assert stream.last != b"data: [DONE]"  # cut off with their worker
    idle(four_slots, client)
    until(lambda: len(children(a.proc.popen.pid)) == 2, 30, "gunicorn did not replace the workers")
    until(lambda: requests.get(a.url + "/health", timeout=5).status_code == 200, 30, "instance a never came back")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return found


# 3. One status -----------------------------------------------------------------------------------

def test_one_instance_lists_both_instances_workers(pair):
    a, b = pair
    live = {pid for gw in pair for pid in children(gw.proc.popen.pid)}
    assert len(live) == 4
    # workers killed earlier drop out once their snapshot lapses
    seen = until(lambda: (lambda s: s if {w["pid"] for w in s["workers"]} == live else None)(status(a)), 30,
                 "the status never listed exactly the live workers of both instances")
    assert seen["shared"] == "ok" and seen["totals"]["workers"] == 4
    assert seen["totals"]["requests"] == sum(w["requests"] for w in seen["workers"])
    table = inspection.status_table(seen)  # llamagate status
    assert "workers 4 on 1 host(s)  (from the shared redis)" in table
    assert all(f"/{pid}/" in table for pid in live)


# 4. Redis gone and back --------------------------------------------------------------------------

def test_redis_down_falls_back_to_each_worker_and_resumes(pair, four_slots, shared_redis):
    client = shared_redis.client
    shared_redis.stop()
    try:
        for i in range(6):
            gw = pair[i % 2]
            resp = requests.post(gw.url + "/v1/chat/completions", headers=auth(gw, "alice"), timeout=60,
                                 json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2})
            assert resp.status_code == 200, resp.text
        assert all(status(gw)["shared"] == "unreachable" for gw in pair)
        logs = a_and_b_logs(pair)
        assert "shared redis unreachable" in logs
        assert sum(fallbacks(scrape(gw)) for gw in pair) >= 6
    finally:
        shared_redis.start()
    # every worker's heartbeat finds Redis again within a second or so, and says so
    until(lambda: a_and_b_logs(pair).count("shared redis reachable again") == 4, 30,
          "not every worker found redis again")
    stream = Stream(pair[0], "alice", 400, request_id="after-redis")
    try:
        # shared admission again: the stream holds its slot in Redis
        until(lambda: client.zcard(SLOTS_KEY) == 1, 30, "shared admission did not resume")
    finally:
        requests.post(pair[0].url + "/v1/requests/after-redis/cancel", headers=auth(pair[0], "alice"), timeout=10)
        stream.join(30)
    until(lambda: status(pair[1])["shared"] == "ok", 10, "status did not find redis again")


def fallbacks(metrics: str) -> float:
    """Requests admitted while the shared Redis was unreachable, counted by the prometheus plugin."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("llamagate_events_total{") and 'name="shared.unavailable"' in line)


def a_and_b_logs(pair) -> str:
    return "".join(gw.proc.log.read_text(errors="replace") for gw in pair)
