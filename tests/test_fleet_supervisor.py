"""The fleet supervisor's decisions, one piece: fake llama-server processes and a fake
clock drive :class:`gateway.fleet.scheduler.Fleet` step by step. (The real parts are in
tests/integration/test_fleet.py.)"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.fleet import processes, scheduler
from gateway.fleet.spec import fleet_problems
from gateway.testing import launched_backend, pipelines_doc

PIDS = itertools.count(1000)


class FakePopen:
    """A llama-server that starts at once and leaves on SIGTERM (or, ``crash``, at once)."""

    launched: list[FakePopen] = []
    crash = False

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.args = args
        self.pid = next(PIDS)
        self.code: int | None = 1 if FakePopen.crash else None
        FakePopen.launched.append(self)

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.code = -15

    def kill(self) -> None:
        self.code = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code

    @property
    def port(self) -> int:
        return int(self.args[self.args.index("--port") + 1])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    clock = Clock()
    FakePopen.launched, FakePopen.crash = [], False
    monkeypatch.setattr(scheduler, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(processes.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(processes, "healthy", lambda port: True)
    monkeypatch.setattr(processes, "port_in_use", lambda port: False)
    monkeypatch.setattr(processes, "rss", lambda pid: 0)
    return clock


def make_fleet(tmp_path, names=("one", "two"), **fleet: Any) -> scheduler.Fleet:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 64)
    doc = pipelines_doc({name: launched_backend(model, memory="100MiB") for name in names},
                        {name: name for name in names}, pipeline_name="p", routes={"/v1/chat/completions": "p"},
                        fleet={"ports": {"first": 9100, "last": 9199}, **fleet})
    return scheduler.Fleet(parse_config(doc, file=str(tmp_path / "pipelines.yaml")), str(tmp_path))


def settle(fleet: scheduler.Fleet, clock: Clock, steps: int = 5) -> None:
    for _ in range(steps):
        clock.now += 0.1
        fleet.step()


def lease(fleet: scheduler.Fleet, clock: Clock, name: str) -> tuple[Any, scheduler.Waiter]:
    unit, waiter = fleet.enqueue(name)
    settle(fleet, clock)
    return unit, waiter


def state(fleet: scheduler.Fleet, name: str) -> str:
    return fleet.units[name].state


def test_concurrent_first_requests_start_one_process(clock, tmp_path):
    fleet = make_fleet(tmp_path)
    waiters = [fleet.enqueue("one")[1] for _ in range(10)]
    settle(fleet, clock)
    assert len(FakePopen.launched) == 1 and all(w.event.is_set() and w.error is None for w in waiters)
    assert fleet.units["one"].leases == 10 and state(fleet, "one") == "ready"
    assert [w.report for w in waiters if w.report] == [{"load_seconds": pytest.approx(0.1), "swap": False,
                                                        "restart": False}]  # reported once


def test_a_busy_model_keeps_its_place_until_the_group_wait_then_drains_without_killing(clock, tmp_path):
    fleet = make_fleet(tmp_path, max_resident=1, group_wait=5)
    one, _ = lease(fleet, clock, "one")
    _, waiting = fleet.enqueue("two")
    settle(fleet, clock, 20)  # 2 s: one is busy and the wait is short
    assert state(fleet, "one") == "ready" and not waiting.event.is_set()
    settle(fleet, clock, 40)  # past group_wait: one drains, but its request is still in flight
    assert state(fleet, "one") == "draining" and FakePopen.launched[0].code is None
    _, late = fleet.enqueue("one")  # a new request for the draining model queues
    settle(fleet, clock)
    assert not late.event.is_set()
    fleet.release(one)
    settle(fleet, clock)
    assert FakePopen.launched[0].code == -15 and state(fleet, "two") == "ready"
    assert waiting.event.is_set() and waiting.report["swap"] is True and fleet.swaps == 1
    assert state(fleet, "one") == "stopped" and not late.event.is_set()  # it waits its turn


def test_an_idle_model_goes_for_a_newcomer_once_it_has_lingered(clock, tmp_path):
    fleet = make_fleet(tmp_path, max_resident=1, group_wait=2)
    one, _ = lease(fleet, clock, "one")
    clock.now += 2  # resident for group_wait
    fleet.release(one)
    _, waiting = fleet.enqueue("two")
    fleet.step()  # idle for a moment only: a client between two requests is not idle
    assert state(fleet, "one") == "ready"
    settle(fleet, clock, 10)
    assert state(fleet, "two") == "ready" and waiting.event.is_set() and waiting.error is None


def test_no_model_is_swapped_out_before_it_was_resident_group_wait(clock, tmp_path):
    fleet = make_fleet(tmp_path, max_resident=1, group_wait=30)
    one, _ = lease(fleet, clock, "one")
    fleet.release(one)  # idle at once: a client that alternates between two models
    _, waiting = fleet.enqueue("two")
    settle(fleet, clock, 280)
    assert state(fleet, "one") == "ready" and not waiting.event.is_set()
    settle(fleet, clock, 30)
    assert state(fleet, "two") == "ready" and waiting.event.is_set() and fleet.swaps == 1


def test_a_refused_connection_has_the_fleet_look_for_a_crash_at_once(clock, tmp_path):
    fleet = make_fleet(tmp_path)
    unit, _ = lease(fleet, clock, "one")
    FakePopen.launched[0].code = -9  # died; the main thread has not looked yet
    _, granted = fleet.enqueue("one")
    assert granted.event.is_set()  # without the check: granted the dead one
    _, waiting = fleet.enqueue("one", check=True)
    assert not waiting.event.is_set() and state(fleet, "one") == "starting" and unit.restarts == 1
    settle(fleet, clock, 10)
    assert waiting.event.is_set() and waiting.error is None and len(FakePopen.launched) == 2


def test_the_memory_budget_swaps_the_least_recently_used(clock, tmp_path):
    fleet = make_fleet(tmp_path, names=("one", "two", "three"), memory_budget="250MiB")
    for name in ("one", "two"):
        unit, _ = lease(fleet, clock, name)
        fleet.release(unit)
        clock.now += 1
    unit, _ = lease(fleet, clock, "one")  # one is now the most recently used
    fleet.release(unit)
    clock.now += 5  # both resident for group_wait
    lease(fleet, clock, "three")
    settle(fleet, clock)
    assert (state(fleet, "one"), state(fleet, "two"), state(fleet, "three")) == ("ready", "stopped", "ready")


def test_a_model_that_keeps_failing_is_failed_with_its_reason(clock, tmp_path):
    fleet = make_fleet(tmp_path, max_restarts=2)
    FakePopen.crash = True
    _, waiter = fleet.enqueue("one")
    settle(fleet, clock, 100)  # backoff 0.5 s, 1 s
    assert state(fleet, "one") == "failed" and len(FakePopen.launched) == 3
    assert waiter.event.is_set() and "failed 3 time(s) in a row (exited with code 1)" in waiter.error
    assert fleet.enqueue("one")[1].error == waiter.error  # refused at once, no loop
    settle(fleet, clock, 100)
    assert len(FakePopen.launched) == 3
    FakePopen.crash = False
    fleet.units["one"].pinned = False
    assert fleet.load("one", timeout=0)["state"] == "stopped"  # a fresh round, started by the next step
    settle(fleet, clock)
    assert state(fleet, "one") == "ready"


def test_a_crash_restarts_with_backoff_and_counts(clock, tmp_path):
    fleet = make_fleet(tmp_path)
    unit, _ = lease(fleet, clock, "one")
    FakePopen.launched[0].code = -9
    settle(fleet, clock, 2)
    assert state(fleet, "one") == "starting" and unit.restarts == 1 and "killed by signal 9" in unit.last_error
    settle(fleet, clock, 10)
    assert state(fleet, "one") == "ready" and len(FakePopen.launched) == 2
    _, after = fleet.enqueue("one")
    assert after.report == {"load_seconds": pytest.approx(after.report["load_seconds"]), "swap": False,
                            "restart": True}


def test_idle_ttl_stops_an_idle_model(clock, tmp_path):
    fleet = make_fleet(tmp_path)
    fleet.units["one"].launch = fleet.units["one"].launch.__class__(
        **{**fleet.units["one"].launch.__dict__, "idle_ttl": 2})
    unit, _ = lease(fleet, clock, "one")
    settle(fleet, clock, 30)
    assert state(fleet, "one") == "ready"  # in use: no ttl
    fleet.release(unit)
    settle(fleet, clock, 15)
    assert state(fleet, "one") == "ready"
    settle(fleet, clock, 10)
    assert state(fleet, "one") == "stopped"


def test_check_refuses_a_missing_file_a_non_gguf_and_a_budget_no_model_fits(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    doc = {"fleet": {"memory_budget": "50MiB"},
           "backends": {"gone": {"launch": {"model": "nowhere.gguf"}},
                        "junk": {"launch": {"model": str(junk), "memory": "10MiB"}},
                        "big": {"launch": {"model": str(junk), "memory": "1GiB", "ctx": 128, "parallel": 4}}},
           "models": {"m": {"backend": "gone"}},
           "pipelines": {"p": []}, "routes": {"/v1/chat/completions": "p"}}
    problems = dict(fleet_problems(parse_config(doc, file=str(tmp_path / "pipelines.yaml"))))
    assert problems["backends.gone.launch.model"] == f"no model file at {tmp_path / 'nowhere.gguf'}"
    assert problems["backends.junk.launch.model"] == f"{junk} is not a GGUF file"
    assert "more than the whole fleet.memory_budget" in problems["backends.big.launch"]
    assert "slots leave under 64 tokens" in problems["backends.big.launch.parallel"]


def test_a_llama_server_that_never_answers_health_is_killed_after_load_timeout(clock, tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "healthy", lambda port: False)
    fleet = make_fleet(tmp_path, max_restarts=0)
    fleet.units["one"].launch = fleet.units["one"].launch.__class__(
        **{**fleet.units["one"].launch.__dict__, "load_timeout": 1})
    _, waiter = fleet.enqueue("one")
    settle(fleet, clock, 5)
    assert state(fleet, "one") == "starting" and FakePopen.launched[0].code is None
    settle(fleet, clock, 10)
    assert FakePopen.launched[0].code == -9 and state(fleet, "one") == "failed"
    assert "not ready after 1 s" in waiter.error
