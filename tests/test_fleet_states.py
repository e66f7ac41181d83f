"""The fleet's transition table (gateway/fleet/states.py): every change the supervisor
makes is one the table allows, every change the table allows is one the supervisor makes,
and every other change is refused. Driven like tests/test_fleet_supervisor.py: fake
llama-servers, a fake clock."""

from __future__ import annotations

import itertools

import pytest

from gateway.fleet import processes
from gateway.fleet.states import TRANSITIONS, IllegalTransition, State, Unit

from .test_fleet_supervisor import FakePopen, clock, lease, make_fleet, settle, state  # noqa: F401 (clock: a fixture)

ALLOWED = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


@pytest.fixture
def seen(monkeypatch):
    """Every (from, to) the supervisor asks of a unit; the real check still runs."""
    changes: set[tuple[State, State]] = set()
    to = Unit.to

    def recording(unit: Unit, new: State) -> None:
        old = unit.state
        to(unit, new)
        changes.add((old, new))

    monkeypatch.setattr(Unit, "to", recording)
    return changes


def with_launch(fleet, name, **changes):
    unit = fleet.units[name]
    unit.launch = unit.launch.__class__(**{**unit.launch.__dict__, **changes})
    return unit


@pytest.mark.parametrize("old,new", sorted(set(itertools.product(State, State)) - ALLOWED))
def test_a_change_the_table_does_not_allow_is_refused(tmp_path, old, new):
    unit = make_fleet(tmp_path).units["one"]
    unit._state = old
    with pytest.raises(IllegalTransition, match=f"from {old.value} to {new.value}"):
        unit.to(new)
    assert unit.state is old


def test_every_state_has_a_row_and_every_change_the_supervisor_makes_is_in_the_table(clock, seen, tmp_path,
                                                                                     monkeypatch):
    assert set(TRANSITIONS) == set(State)
    # Started, ready, unloaded: drains, stops.
    fleet = make_fleet(tmp_path)
    unit, _ = lease(fleet, clock, "one")
    fleet.unload("one", timeout=0)
    assert state(fleet, "one") == "draining"
    fleet.release(unit)
    settle(fleet, clock)
    assert state(fleet, "one") == "stopped"
    # A crash of the only replica: ready -> starting, then ready again.
    unit, _ = lease(fleet, clock, "one")
    FakePopen.launched[-1].code = -9
    fleet.step()
    assert state(fleet, "one") == "starting"
    settle(fleet, clock, 10)
    assert state(fleet, "one") == "ready"
    # An unload while it starts: starting -> stopping.
    monkeypatch.setattr(processes, "healthy", lambda port: False)
    fleet.enqueue("two")
    settle(fleet, clock, 2)
    assert state(fleet, "two") == "starting"
    fleet.unload("two", timeout=0)
    assert state(fleet, "two") == "stopping"
    settle(fleet, clock)
    monkeypatch.setattr(processes, "healthy", lambda port: True)
    # The shutdown: ready -> stopping.
    fleet.shutdown()
    assert state(fleet, "one") == "stopping"
    assert seen == ALLOWED - {(State.STARTING, State.FAILED), (State.READY, State.FAILED),
                              (State.DRAINING, State.FAILED), (State.FAILED, State.STOPPED)}


def test_failures_reach_failed_from_starting_ready_and_draining_and_a_load_leaves_it(clock, seen, tmp_path):
    fleet = make_fleet(tmp_path, names=("one", "two", "three"), max_restarts=0)
    FakePopen.crash = True
    fleet.enqueue("one")
    settle(fleet, clock)
    assert state(fleet, "one") == "failed" and (State.STARTING, State.FAILED) in seen
    FakePopen.crash = False
    lease(fleet, clock, "two")
    FakePopen.launched[-1].code = -9
    settle(fleet, clock)
    assert state(fleet, "two") == "failed" and (State.READY, State.FAILED) in seen
    held, _ = lease(fleet, clock, "three")
    fleet.unload("three", timeout=0)
    FakePopen.launched[-1].code = -9  # it crashes while its request finishes
    settle(fleet, clock)
    assert state(fleet, "three") == "failed" and (State.DRAINING, State.FAILED) in seen
    fleet.release(held)
    assert fleet.load("one", timeout=0)["state"] == "stopped" and (State.FAILED, State.STOPPED) in seen
    assert seen <= ALLOWED


def test_a_stopping_llama_server_gets_its_grace_and_is_no_failure(clock, tmp_path, monkeypatch):
    """It was launched longer ago than load_timeout and stops answering /health as soon as
    it has its SIGTERM, but takes a while to exit: neither a failed start nor a SIGKILL."""
    fleet = make_fleet(tmp_path, max_restarts=0)
    unit = with_launch(fleet, "one", load_timeout=1)
    held, _ = lease(fleet, clock, "one")
    fleet.release(held)
    settle(fleet, clock, 20)
    popen = FakePopen.launched[0]
    popen.terminate = lambda: None  # shuts down slowly
    monkeypatch.setattr(processes, "healthy", lambda port: False)
    fleet.unload("one", timeout=0)
    settle(fleet, clock, 50)  # 5 s: within STOP_GRACE
    assert popen.code is None and state(fleet, "one") == "stopping"
    assert unit.failures == 0 and unit.last_error == ""
    settle(fleet, clock, 60)
    assert popen.code == -9 and state(fleet, "one") == "stopped" and unit.failures == 0



def test_a_bug_in_one_model_is_logged_once_a_minute_and_the_others_keep_serving(clock, tmp_path, monkeypatch, caplog):
    fleet = make_fleet(tmp_path)
    to = Unit.to

    def buggy(unit: Unit, new: State) -> None:
        if unit.name == "one":
            raise IllegalTransition(f"fleet: one cannot go from {unit.state.value} to {new.value}")
        to(unit, new)

    monkeypatch.setattr(Unit, "to", buggy)
    fleet.enqueue("one")
    _, waiter = fleet.enqueue("two")
    with caplog.at_level("ERROR", logger="llamagate.fleet"):
        settle(fleet, clock, steps=20)  # two seconds of ticks: the bug recurs on every one
    assert state(fleet, "two") == "ready" and waiter.event.is_set() and waiter.error is None
    assert state(fleet, "one") == "stopped"  # it keeps its state
    logged = [r for r in caplog.records if "a step failed" in r.getMessage()]
    assert len(logged) == 1 and "one cannot go from stopped" in str(logged[0].exc_info[1])
    clock.now += 61
    with caplog.at_level("ERROR", logger="llamagate.fleet"):
        settle(fleet, clock, steps=1)
    assert len([r for r in caplog.records if "a step failed" in r.getMessage()]) == 2
