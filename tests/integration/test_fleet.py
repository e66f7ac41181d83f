"""The fleet through the real parts: gunicorn with 2 gevent workers, its fleet supervisor,
and llama-servers (xllamacpp + SmolLM2) that the supervisor launches. The same GGUF file
under two backends counts as two models."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml

from gateway.storage import keys
from gateway.testing import free_ports, launched_backend, pipelines_doc

from .conftest import ROOT

LAUNCH = {"ctx": 512, "parallel": 2, "threads": 1}


class StatsdSink:
    """A UDP socket that collects the statsd plugin's metric lines."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []

    def lines(self) -> list[str]:
        while True:
            try:
                self.seen += self.sock.recv(65536).decode().splitlines()
            except BlockingIOError:
                return self.seen

    def named(self, name: str) -> list[str]:
        return [line for line in self.lines() if line.startswith(f"fleet-test.{name}:")]


def fleet_doc(logs: Path, launched: dict[str, dict[str, Any]], **fleet: Any) -> dict[str, Any]:
    keys_file = logs / f"fleet-keys-{random.getrandbits(32)}.yaml"
    admin, user = keys.add_key(keys_file, "ops", "admin"), keys.add_key(keys_file, "alice")
    limited = keys.add_key(keys_file, "bob", models=[next(iter(launched))])
    ports = free_ports(len(launched) + 1)  # one spare port, for a model a reload adds
    return pipelines_doc(
        {name: launched_backend(**{**LAUNCH, **spec}) for name, spec in launched.items()},
        {name: name for name in launched},
        pipeline=[{"statsd": {"host": "127.0.0.1", "port": 9, "prefix": "fleet-test"}},
                  {"auth": {"keys_file": str(keys_file), "env_keys": {}}}],
        health_interval=0.5, admin_pipeline="default",
        fleet={"ports": {"first": ports[0], "last": ports[-1]}, "log_dir": str(logs / "fleet"), **fleet},
        _keys=(admin, user, limited))


def start_fleet(start_gateway: Callable[..., Any], doc: dict[str, Any]) -> Any:
    admin, user, limited = doc.pop("_keys")
    statsd = StatsdSink()
    doc["pipelines"]["default"][0]["statsd"]["port"] = statsd.port
    gw = start_gateway(doc, workers=2)
    gw.admin, gw.user, gw.limited, gw.statsd = admin, user, limited, statsd
    return gw


def chat(gw: Any, model: str, max_tokens: int = 4, session: requests.Session | None = None,
         **extra: Any) -> requests.Response:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}], **extra}
    return (session or requests).post(gw.url + "/v1/chat/completions", json=body, timeout=120,
                                      headers={"Authorization": f"Bearer {gw.user}"}, stream=bool(extra.get("stream")))


def fleet_status(gw: Any) -> dict[str, Any]:
    resp = requests.get(gw.url + "/admin/models", headers={"Authorization": f"Bearer {gw.admin}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def model(gw: Any, name: str) -> dict[str, Any]:
    return fleet_status(gw)["models"][name]


def wait_for(what: Callable[[], Any], timeout: float = 60, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting: {message}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except FileNotFoundError:
        return False


def listeners(port: int) -> list[int]:
    """Pids of the processes whose command line says ``--port <port>`` (llama-servers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"--port" in args and args[args.index(b"--port") + 1:][:1] == [str(port).encode()] and alive(int(entry)):
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def fleet(start_gateway, model_path, logs):
    """One gateway with three launched backends: ``a`` (on demand), ``ttl`` (idle_ttl 2 s)
    and ``broken`` (a GGUF file llama.cpp cannot load)."""
    broken = logs / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    doc = fleet_doc(logs, {"a": {"model": str(model_path.resolve())},
                           "ttl": {"model": str(model_path.resolve()), "idle_ttl": 2, "parallel": 1},
                           "broken": {"model": str(broken)}}, max_restarts=1)
    return start_fleet(start_gateway, doc)


def test_no_key_or_a_key_without_the_model_cannot_start_it(fleet):
    body = {"model": "ttl", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    anonymous = requests.post(fleet.url + "/v1/chat/completions", json=body, timeout=30)
    assert anonymous.status_code == 401
    limited = requests.post(fleet.url + "/v1/chat/completions", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {fleet.limited}"})  # a key for model a only
    assert limited.status_code in (403, 404), limited.text
    status = model(fleet, "ttl")
    assert status["state"] == "stopped" and status["loads"] == 0  # refused before the fleet heard of it


def test_concurrent_first_requests_from_both_workers_start_one_process(fleet):
    assert model(fleet, "a")["state"] == "stopped"
    models = requests.get(fleet.url + "/v1/models", headers={"Authorization": f"Bearer {fleet.user}"}).json()
    assert {m["id"] for m in models["data"]} == {"a", "ttl", "broken"}  # every declared model, running or not
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(fleet, "a"), range(10)))
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["choices"][0]["message"]["content"] for r in answers)
    status = model(fleet, "a")
    assert status["state"] == "ready" and status["loads"] == 1 and status["restarts"] == 0
    assert len(status["pids"]) == 1 and listeners(status["ports"][0]) == status["pids"]
    # The request that waited for the load reports it to statsd, once.
    [load] = wait_for(lambda: fleet.statsd.named("fleet.load.a"), message="the load time in statsd")
    assert load.endswith("|ms") and float(load.split(":")[1].split("|")[0]) > 0


def test_idle_ttl_stops_the_process_and_the_next_request_starts_it_again(fleet):
    assert chat(fleet, "ttl").status_code == 200
    first = model(fleet, "ttl")
    assert first["state"] == "ready"
    [pid] = first["pids"]
    wait_for(lambda: not alive(pid) and model(fleet, "ttl")["state"] == "stopped", timeout=30,
             message="the idle llama-server to stop")
    assert chat(fleet, "ttl").status_code == 200
    again = model(fleet, "ttl")
    assert again["loads"] == 2 and again["pids"] and again["pids"] != [pid]


def test_a_llama_server_killed_mid_stream_ends_the_stream_and_restarts(fleet):
    assert chat(fleet, "a").status_code == 200
    [pid] = model(fleet, "a")["pids"]
    with chat(fleet, "a", max_tokens=400, stream=True,
              messages=[{"role": "user", "content": "Write a very long story about a llama."}]) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    last = json.loads(rest[-1][6:])
    assert last["error"]["type"] == "server_error"
    assert b"[DONE]" not in b"".join(rest)
    restarted = wait_for(lambda: (m := model(fleet, "a"))["state"] == "ready" and m["restarts"] == 1 and m,
                         message="the model to restart")
    assert restarted["pids"] != [pid] and "killed by signal 9" in restarted["last_error"]
    assert chat(fleet, "a").status_code == 200
    wait_for(lambda: fleet.statsd.named("fleet.restarts"), message="the restart counted in statsd")


def test_a_model_that_cannot_start_is_failed_with_its_reason(fleet):
    resp = chat(fleet, "broken")
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_unavailable" and "failed 2 time(s) in a row" in error["message"]
    assert "Traceback" not in error["message"]  # the log tail is for the operator only
    status = model(fleet, "broken")
    assert status["state"] == "failed" and status["pids"] == []
    assert "Failed to init server" in status["last_error"]
    # It stays failed (no loop) and answers at once, until an operator loads it again.
    again = chat(fleet, "broken")
    assert again.status_code == 503 and again.json()["error"]["code"] == "model_unavailable"
    assert model(fleet, "broken")["state"] == "failed"
    wait_for(lambda: requests.get(fleet.url + "/health").json()["models"]["broken"] is False,
             message="/health to show the failed model")


def test_load_and_unload_through_the_admin_endpoints_and_the_cli(fleet):
    user = {"Authorization": f"Bearer {fleet.user}"}
    admin = {"Authorization": f"Bearer {fleet.admin}"}
    for method, path in (("GET", "/admin/models"), ("POST", "/admin/models/a/unload"),
                         ("POST", "/admin/models/a/load")):
        resp = requests.request(method, fleet.url + path, headers=user, timeout=30)
        assert resp.status_code == 403, (path, resp.text)
    assert requests.get(fleet.url + "/admin/models", timeout=30).status_code == 401
    assert requests.post(fleet.url + "/admin/models/nope/load", headers=admin, timeout=30).status_code == 404

    loaded = requests.post(fleet.url + "/admin/models/ttl/load", headers=admin, timeout=120).json()
    assert loaded["state"] == "ready" and loaded["pids"]
    unloaded = requests.post(fleet.url + "/admin/models/ttl/unload", headers=admin, timeout=120).json()
    assert unloaded["state"] == "stopped" and not any(alive(pid) for pid in loaded["pids"])

    def cli(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "gateway.cli", "models", *args, "--url", fleet.url,
                               "--key", fleet.admin], capture_output=True, text=True, env=env, timeout=180)

    out = cli("load", "ttl")
    assert out.returncode == 0 and out.stdout.strip() == "ttl: ready", out.stderr
    # progress meanwhile, on stderr: a line per change of state (not a terminal), with the
    # seconds and the memory so far
    assert re.search(r"^ttl: starting \(\d+ s, \d+ MiB\)$", out.stderr, re.M), out.stderr
    table = cli()
    # ttl's idle_ttl (2 s) may stop it while the command starts up (seen on a loaded machine)
    assert table.returncode == 0 and re.search(r"^ttl +(ready|draining|stopping|stopped) ", table.stdout, re.M)
    assert re.search(r"^broken +(stopped|failed) ", table.stdout, re.M), table.stdout
    out = cli("unload", "ttl")
    assert out.returncode == 0 and out.stdout.strip() == "ttl: stopped", out.stderr
    assert model(fleet, "ttl")["state"] == "stopped"
    refused = subprocess.run([sys.executable, "-m", "gateway.cli", "models", "unload", "a", "--url", fleet.url,
                              "--key", fleet.user], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr


def test_a_reload_adds_a_launched_model_and_keeps_the_others_running(fleet, model_path):
    assert chat(fleet, "a").status_code == 200
    [pid] = model(fleet, "a")["pids"]
    doc = yaml.safe_load(fleet.config.read_text())
    doc["backends"]["late"] = {"launch": {**LAUNCH, "model": str(model_path.resolve()), "parallel": 1}}
    doc["models"]["late"] = {"backend": "late"}
    fleet.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    # Each worker and the supervisor see the change within a second or so.
    wait_for(lambda: chat(fleet, "late").status_code == 200 and chat(fleet, "late").status_code == 200,
             message="the new model to answer on both workers")
    assert model(fleet, "late")["state"] == "ready"
    assert model(fleet, "a")["pids"] == [pid]  # unchanged: not restarted


def test_worker_deaths_and_a_hup_reload_keep_the_supervisor_and_its_models(fleet):
    assert chat(fleet, "a").status_code == 200
    before = fleet_status(fleet)
    [pid] = before["models"]["a"]["pids"]
    master = fleet.proc.popen.pid
    with chat(fleet, "a", max_tokens=400, stream=True,
              messages=[{"role": "user", "content": "Write a very long story about a llama."}]) as resp:
        next(line for line in resp.iter_lines() if line)
        assert model(fleet, "a")["in_flight"] >= 1
        for worker in workers(master, before["supervisor_pid"]):
            os.kill(worker, signal.SIGKILL)  # the one holding the lease dies with it
    # gunicorn starts new workers; the dead one's lease came back with its connection.
    wait_for(lambda: (m := model_or_none(fleet, "a")) and m["in_flight"] == 0, message="the lease to come back")
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: chat(fleet, "a").status_code == 200, message="requests after the HUP")
    after = fleet_status(fleet)
    assert after["supervisor_pid"] == before["supervisor_pid"] and after["models"]["a"]["pids"] == [pid]


def test_a_gateway_that_launches_nothing_runs_no_supervisor(gateway):
    master = gateway.proc.popen.pid
    with open(f"/proc/{master}/task/{master}/children") as handle:
        children = [open(f"/proc/{pid}/cmdline", "rb").read() for pid in handle.read().split()]
    assert children and not any(b"gateway.fleet.supervisor" in cmdline for cmdline in children)


def workers(master: int, supervisor_pid: int) -> list[int]:
    with open(f"/proc/{master}/task/{master}/children") as handle:
        return [int(p) for p in handle.read().split() if int(p) != supervisor_pid]


def model_or_none(gw: Any, name: str) -> dict[str, Any] | None:
    try:
        return model(gw, name)
    except (requests.RequestException, AssertionError):
        return None


SWITCH_GROUP_WAIT = 3


@pytest.fixture(scope="module")
def switching(start_gateway, model_path, logs):
    """Two models, room for one: runtime model switching."""
    doc = fleet_doc(logs, {"one": {"model": str(model_path.resolve())}, "two": {"model": str(model_path.resolve())}},
                    max_resident=1, group_wait=SWITCH_GROUP_WAIT)
    return start_fleet(start_gateway, doc)


def test_a_request_sent_right_after_a_kill_9_waits_for_the_restart(switching):
    with requests.Session() as session:  # a warm connection: the next request leaves at once
        assert chat(switching, "one", session=session).status_code == 200
        before = model(switching, "one")
        [pid] = before["pids"]
        os.kill(pid, signal.SIGKILL)
        resp = chat(switching, "one", session=session)
    # Its connection is refused; it waits for the fleet's restart (out of first_byte), not a 503.
    assert resp.status_code == 200, resp.text
    after = model(switching, "one")
    assert after["restarts"] == before["restarts"] + 1 and after["pids"] != [pid]
    assert fleet_status(switching)["swaps"] == 0  # a restart, not a swap


def test_a_swap_waits_for_the_stream_in_flight_to_end(switching):
    assert chat(switching, "one").status_code == 200
    events: list[str] = []
    answer: dict[str, Any] = {}

    def other() -> None:
        resp = chat(switching, "two")
        events.append("two answered")
        answer["status"] = resp.status_code

    with chat(switching, "one", max_tokens=60, stream=True, stream_options={"include_usage": True}) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line)
        waiting = threading.Thread(target=other)
        waiting.start()
        wait_for(lambda: model(switching, "two")["queued"] == 1, message="the request for two to queue")
        assert model(switching, "one")["state"] in ("ready", "draining")
        rest = [line for line in lines if line]
        events.append("one ended")
    waiting.join(120)
    assert events == ["one ended", "two answered"] and answer["status"] == 200
    assert rest[-1] == b"data: [DONE]"
    finish = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in rest[:-1]
              if json.loads(line[6:])["choices"]]
    assert finish[-1] in ("length", "stop")  # the stream of one came whole
    status = fleet_status(switching)
    assert status["models"]["one"]["state"] == "stopped" and status["models"]["two"]["state"] == "ready"
    assert status["swaps"] == 1 and status["resident"] == 1
    assert wait_for(lambda: switching.statsd.named("fleet.swaps"), message="the swap in statsd") == \
        ["fleet-test.fleet.swaps:1|c"]


def test_alternating_requests_are_served_in_groups_not_thrashed(switching):
    before = fleet_status(switching)["swaps"]
    per_model = 8
    results: dict[str, list[int]] = {"one": [], "two": []}

    def client(name: str) -> None:
        for _ in range(per_model):
            results[name].append(chat(switching, name).status_code)

    threads = [threading.Thread(target=client, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert results == {"one": [200] * per_model, "two": [200] * per_model}  # neither starved
    swaps = fleet_status(switching)["swaps"] - before
    # Swapping per request would take about 2 * per_model - 1 swaps; groups take a few.
    assert 1 <= swaps <= per_model // 2, swaps


def eager_gateway(start_gateway, model_path, logs) -> tuple[Any, dict[str, Any]]:
    """A gateway with one model started with it; and the fleet once that model is ready."""
    doc = fleet_doc(logs, {"eager": {"model": str(model_path.resolve()), "start": "eager", "parallel": 1}})
    gw = start_fleet(start_gateway, doc)
    status = wait_for(lambda: (s := fleet_status(gw))["models"]["eager"]["state"] == "ready" and s,
                      message="the eager model to start")
    return gw, status


def test_no_llama_server_survives_a_kill_9_of_the_supervisor(start_gateway, model_path, logs):
    gw, status = eager_gateway(start_gateway, model_path, logs)
    [server] = status["models"]["eager"]["pids"]
    os.kill(status["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not alive(server), timeout=30, message="the llama-server to go with its supervisor")
    # Without a supervisor, launched models answer 503 model_unavailable (the gateway keeps serving).
    resp = chat(gw, "eager")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_unavailable"


def test_no_llama_server_survives_a_kill_9_of_the_gunicorn_master(start_gateway, model_path, logs):
    gw, status = eager_gateway(start_gateway, model_path, logs)
    [server] = status["models"]["eager"]["pids"]
    supervisor = status["supervisor_pid"]
    assert alive(server) and alive(supervisor)
    os.kill(gw.proc.popen.pid, signal.SIGKILL)
    gw.proc.popen.wait()
    wait_for(lambda: not alive(supervisor) and not alive(server), timeout=30,
             message="the supervisor and its llama-server to go")
    assert listeners(status["models"]["eager"]["ports"][0]) == []


def test_streams_queued_for_two_models_are_served_in_one_round_each(switching):
    """Six streams for each model at once, room for one model, two workers with one slot
    each per model: every request queued for a model is served before it is swapped out
    (no one, two, one, two), and the slowest first byte stays within the documented bound:
    group_wait, the loads, and the streams ahead of it one after another."""
    story = [{"role": "user", "content": "Write a very long story about a llama."}]
    # Streams of about 0.6 group_wait each, whatever this machine's speed: a model's six
    # (three rounds of two) outlast group_wait, so requests still wait for a slot when the
    # other model has waited group_wait.
    status = fleet_status(switching)["models"]
    resident = next((name for name in ("one", "two") if status[name]["state"] == "ready"), "one")
    assert chat(switching, resident).status_code == 200  # loaded, if it was not
    start = time.monotonic()
    assert chat(switching, resident, max_tokens=32, ignore_eos=True, messages=story).status_code == 200
    tokens = max(16, int(32 / (time.monotonic() - start) * 0.6 * SWITCH_GROUP_WAIT))
    before = fleet_status(switching)

    def stream(name: str) -> tuple[float, float]:
        sent = time.monotonic()
        with chat(switching, name, max_tokens=tokens, ignore_eos=True, stream=True, messages=story) as resp:
            assert resp.status_code == 200, resp.text
            lines = (line for line in resp.iter_lines() if line)
            next(lines)
            first = time.monotonic()
            assert list(lines)[-1] == b"data: [DONE]"
        return first - sent, time.monotonic() - first

    with ThreadPoolExecutor(12) as pool:
        timings = list(pool.map(stream, ["one", "two"] * 6))
    after = fleet_status(switching)
    loads = {name: after["models"][name]["loads"] - before["models"][name]["loads"] for name in ("one", "two")}
    assert after["swaps"] - before["swaps"] == 1 and max(loads.values()) == 1, (tokens, loads, timings)
    load_seconds = sum(after["models"][name]["last_load_seconds"] for name, count in loads.items() if count)
    slowest = max(first_byte for first_byte, _ in timings)
    assert slowest <= SWITCH_GROUP_WAIT + load_seconds + sum(took for _, took in timings), (slowest, timings)


def test_a_key_alternating_between_two_models_swaps_at_most_once_per_group_wait(switching):
    """One key, single requests, each for the model that is not resident: every one needs a
    swap, but each model stays resident group_wait after its load (the minimum residency),
    so the key cannot swap faster than one load plus group_wait."""
    status = fleet_status(switching)["models"]
    resident = next(name for name in ("one", "two") if status[name]["state"] == "ready")
    other = "two" if resident == "one" else "one"
    order = [other, resident, other]
    start = time.monotonic()
    load_seconds = 0.0
    for name in order:
        loads = model(switching, name)["loads"]
        assert chat(switching, name).status_code == 200
        served = model(switching, name)
        assert served["loads"] == loads + 1  # a swap each time
        load_seconds += served["last_load_seconds"]
    elapsed = time.monotonic() - start
    # Each load after the first starts once the model before it was resident group_wait.
    assert elapsed - load_seconds >= (len(order) - 1) * SWITCH_GROUP_WAIT, (elapsed, load_seconds)
