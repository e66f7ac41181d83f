"""The fleet's decisions: which model starts, which drains to make room, which stops when
idle (docs/fleet.md, "Swapping within the budget").

:class:`Fleet` holds every launched backend of a config as a :class:`~.states.Unit` and one
condition. Connections' threads queue and release requests; the main thread runs
:meth:`Fleet.step`, the only place that starts llama-servers (see supervisor.py for why).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from typing import Any

from ..config import Config, FleetConfig
from .states import RESIDENT, STOP_GRACE, State, Unit, Waiter

log = logging.getLogger("llamagate.fleet")

LINGER = 0.5  # an idle model used this recently is not swapped out for a newcomer at once
BUG_LOG_EVERY = 60.0  # seconds between two logs of the same failing part of a step


def _models_by_backend(config: Config) -> dict[str, list[str]]:
    models: dict[str, list[str]] = {}
    for model in config.models.values():
        models.setdefault(model.backend, []).append(model.id)
    return models


class Fleet:
    """Every launched backend of a config, and the decisions: start, grant, drain, stop."""

    def __init__(self, config: Config, log_dir: str) -> None:
        self.config = config
        self.fleet: FleetConfig = config.fleet
        self.log_dir = log_dir
        models, now = _models_by_backend(config), time.monotonic()
        self.units = {name: Unit(b, models.get(name, []), log_dir, now) for name, b in config.launched.items()}
        self.retired: list[Unit] = []  # changed or removed by a reload, still stopping
        self.lock = threading.Condition()
        self.swaps = 0
        self.stopping = False
        self._bugs_logged: dict[str, float] = {}  # a failing part of a step -> when it was last logged

    # --- what connections ask (any thread) -----------------------------------------------------

    def enqueue(self, name: str, check: bool = False) -> tuple[Unit | None, Waiter]:
        """Queue a request for the model of backend ``name``; its waiter's event is set
        once it is granted (a lease on the unit returned) or refused (``error``).
        ``check``: a llama-server of it refused the request's connection, so look now
        whether one exited rather than at the next tick: a crashed model is restarting,
        and the request waits for it instead of being granted the dead one again."""
        waiter = Waiter(time.monotonic())
        with self.lock:
            unit = self.units.get(name)
            if unit is not None and check:
                unit.reap(waiter.arrived, self.fleet.max_restarts)
            if unit is None:
                waiter.error = f"no launched backend named {name!r}"
            elif unit.state is State.FAILED:
                waiter.error = unit.reason
            elif self.stopping:
                waiter.error = "the gateway is shutting down"
            else:
                unit.waiters.append(waiter)
                if unit.state is State.READY:  # the common case, without waiting for the main thread
                    unit.grant()
                self.lock.notify_all()
                return unit, waiter
        waiter.event.set()
        return None, waiter

    def abandon(self, unit: Unit, waiter: Waiter) -> None:
        """The waiting request left: out of the queue, or, granted meanwhile, its lease back."""
        with self.lock:
            if waiter in unit.waiters:
                unit.waiters.remove(waiter)
            elif waiter.error is None and waiter.event.is_set():
                self._release(unit)
            self.lock.notify_all()

    def release(self, unit: Unit) -> None:
        with self.lock:
            self._release(unit)
            self.lock.notify_all()

    def _release(self, unit: Unit) -> None:
        unit.leases -= 1
        unit.last_used = time.monotonic()

    def load(self, name: str, timeout: float) -> dict[str, Any]:
        """Start a model now (stopping the least recently used ones it needs room from);
        waits until it is ready or failed."""
        with self.lock:
            unit = self._unit(name)
            if unit.state is State.FAILED:
                unit.reset()
            if unit.state in (State.STOPPED, State.DRAINING, State.STOPPING):
                unit.pinned = True
            self.lock.notify_all()
            self.lock.wait_for(lambda: unit.state in (State.READY, State.FAILED) and not unit.pinned, timeout)
            return unit.status(time.monotonic())

    def unload(self, name: str, timeout: float) -> dict[str, Any]:
        """Stop a model once its requests in flight have finished; waits until it is stopped."""
        with self.lock:
            unit = self._unit(name)
            unit.pinned = False
            if unit.state is State.FAILED:
                unit.reset()
            elif unit.state is State.READY:
                unit.to(State.DRAINING)
            elif unit.state is State.STARTING:
                unit.stop(time.monotonic())
            self.lock.notify_all()
            # Stopped, or started again at once by requests that were waiting for it.
            self.lock.wait_for(lambda: unit.state not in (State.DRAINING, State.STOPPING), timeout)
            return unit.status(time.monotonic())

    def _unit(self, name: str) -> Unit:
        unit = self.units.get(name)
        if unit is None:
            raise KeyError(name)
        return unit

    def status(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            return {"memory_budget": self.fleet.memory_budget, "max_resident": self.fleet.max_resident,
                    "resident": sum(u.state in RESIDENT for u in self.units.values()),
                    "resident_memory_estimate": sum(u.memory for u in self._every() if u.state in RESIDENT),
                    "swaps": self.swaps, "supervisor_pid": os.getpid(),
                    "models": {name: unit.status(now) for name, unit in self.units.items()}}

    def reconfigure(self, config: Config) -> None:
        """A new configuration: unchanged launched backends carry on; a changed or removed
        one drains and stops (a changed one's queued requests wait for its replacement)."""
        with self.lock:
            models, now = _models_by_backend(config), time.monotonic()
            units: dict[str, Unit] = {}
            for name, backend in config.launched.items():
                old = self.units.get(name)
                if old is not None and old.backend == backend:
                    units[name] = old
                else:
                    units[name] = Unit(backend, [], self.log_dir, now)
                    if old is not None:
                        units[name].waiters, old.waiters = old.waiters, []
                units[name].models = models.get(name, [])
            for name, old in self.units.items():
                if units.get(name) is not old:
                    self._retire(old, now)
            self.units, self.config, self.fleet = units, config, config.fleet
            self.lock.notify_all()

    def _retire(self, unit: Unit, now: float) -> None:
        log.info("fleet: %s left the configuration, stopping it once idle", unit.name)
        unit.refuse(f"The model's backend {unit.name} was removed from the configuration.")
        if unit.state is State.READY:
            unit.to(State.DRAINING)
        elif unit.state is State.STARTING:
            unit.stop(now)
        if unit.state not in (State.STOPPED, State.FAILED):
            self.retired.append(unit)

    def _retired(self, unit: Unit) -> bool:
        return self.units.get(unit.name) is not unit

    def shutdown(self) -> None:
        """Stop every llama-server: SIGTERM, then SIGKILL after STOP_GRACE."""
        with self.lock:
            self.stopping = True
            now = time.monotonic()
            for unit in self._every():
                unit.refuse("the gateway is shutting down")
                if unit.state in (State.STARTING, State.READY, State.DRAINING):
                    unit.stop(now)
                else:
                    unit.terminate(now)
            popens = [r.popen for u in self._every() for r in u.replicas if r.popen is not None]
        log.info("fleet: stopping %d llama-server(s)", len(popens))
        deadline = time.monotonic() + STOP_GRACE
        for popen in popens:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    # --- the decisions (main thread) -----------------------------------------------------------

    def step(self) -> None:
        with self.lock:
            now = time.monotonic()
            for unit in self._every():
                self._contained(unit.name, unit.watch, now, self.fleet.log_bytes, self.fleet.max_restarts)
            for unit in self._every():
                self._contained(unit.name, self._advance, unit, now)
            self.retired = [u for u in self.retired if u.state is not State.STOPPED]
            self._contained("the schedule", self._schedule, now)
            self.lock.notify_all()

    def _contained(self, what: str, action: Any, *args: Any) -> None:
        """Run one part of a step; a bug in it (an :class:`~.states.IllegalTransition`, say)
        is logged with its traceback, at most once a minute for the same error, and the
        step goes on: the other models keep serving and the one concerned keeps its state.
        Stopping every llama-server of the host for one model's bug would be the larger outage."""
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - contained on purpose, see above
            key, now = f"{what}: {type(exc).__name__}: {exc}", time.monotonic()
            if self._bugs_logged.get(key, now - BUG_LOG_EVERY) <= now - BUG_LOG_EVERY:
                self._bugs_logged[key] = now
                log.exception("fleet: a step failed for %s (a supervisor bug; the fleet goes on)", what)

    def _every(self) -> list[Unit]:
        return [*self.units.values(), *self.retired]

    def _advance(self, unit: Unit, now: float) -> None:
        max_restarts = self.fleet.max_restarts
        if unit.state is State.STARTING:
            for replica in unit.replicas:
                if replica.popen is None and now >= replica.relaunch_at:
                    unit.launch_replica(replica, now, max_restarts)
            if unit.state is State.STARTING and all(r.healthy_since is not None for r in unit.replicas):
                unit.ready(now)
        elif unit.state in (State.READY, State.DRAINING):
            for replica in unit.replicas:  # a crashed replica of a model still up
                if replica.popen is None and not replica.expected_exit and not self._retired(unit) and \
                        now >= replica.relaunch_at:
                    unit.launch_replica(replica, now, max_restarts)
            if unit.state is State.READY:
                unit.grant()
                ttl = unit.launch.idle_ttl
                if ttl is not None and unit.leases == 0 and not unit.waiters and now - unit.last_used >= ttl:
                    log.info("fleet: %s idle for %g s, stopping", unit.name, ttl)
                    unit.to(State.DRAINING)
            if unit.state is State.DRAINING and unit.leases <= 0:
                unit.stop(now)
        elif unit.state is State.STOPPING:
            unit.kill_late(now)
            if all(r.popen is None for r in unit.replicas):
                unit.stopped()

    def _schedule(self, now: float) -> None:
        """Start the waited-for stopped models, oldest waiter first, swapping out the least
        recently used models when they do not fit; eager ones start when they fit."""
        held = {r.port for u in self.retired for r in u.replicas if r.popen is not None}
        wanted = sorted((u for u in self.units.values() if u.state is State.STOPPED and u.oldest_wait is not None
                         and not held & set(u.launch.ports)),
                        key=lambda u: u.oldest_wait)  # type: ignore[arg-type, return-value]
        for unit in wanted:
            if self._fits(unit, set()):
                self._contained(unit.name, self._start, unit, now)  # a bug in one start: the next still starts
                continue
            unit.waits_for_room = True
            leaving = {u.name for u in self._every()
                       if u.state in (State.DRAINING, State.STOPPING) and not self._retired(u)}
            if not self._fits(unit, leaving):  # not even once the models on their way out are gone
                for victim in self._victims(unit, now, leaving):
                    log.info("fleet: draining %s to make room for %s", victim.name, unit.name)
                    victim.to(State.DRAINING)
                    if victim.leases <= 0:
                        victim.stop(now)
            return  # first come, first served: a later model does not overtake this one
        for unit in self.units.values():
            if unit.launch.start == "eager" and unit.state is State.STOPPED and unit.failures == 0 \
                    and unit.loads == 0 and not held & set(unit.launch.ports) and self._fits(unit, set()):
                self._contained(unit.name, self._start, unit, now)

    def _start(self, unit: Unit, now: float) -> None:
        if unit.waits_for_room:
            self.swaps += 1
        unit.start(now, self.fleet.max_restarts)

    def _fits(self, unit: Unit, leaving: set[str]) -> bool:
        """Would ``unit`` fit, were the models named in ``leaving`` gone? (Models draining
        or stopping still hold their memory until they have exited.)"""
        resident = [u for u in self._every()
                    if u.state in RESIDENT and (u.name not in leaving or self._retired(u))]
        if self.fleet.max_resident is not None and len(resident) + 1 > self.fleet.max_resident:
            return False
        budget = self.fleet.memory_budget
        return budget is None or sum(u.memory for u in resident) + unit.memory <= budget

    def _victims(self, unit: Unit, now: float, leaving: set[str]) -> list[Unit]:
        """The ready models to drain so that ``unit`` fits (besides ``leaving``), least
        recently used first; none when it cannot fit yet. No model goes before it has
        been ready ``group_wait`` (the minimum residency: a load is paid for with that
        much service, however requests alternate); then an idle one goes (once it has
        been idle a moment), a busy one once ``unit`` has waited ``group_wait`` too:
        requests are served in groups, and neither side starves."""
        waited = now - unit.oldest_wait  # type: ignore[operator]
        group_wait = self.fleet.group_wait
        eligible = []
        for other in self.units.values():
            if other.state is not State.READY or other is unit or now - (other.ready_since or now) < group_wait:
                continue
            idle = other.leases <= 0 and not other.waiters
            if waited >= group_wait or (idle and now - other.last_used >= LINGER):
                eligible.append((not idle, other.last_used, other))
        chosen: list[Unit] = []
        for _, _, other in sorted(eligible, key=lambda e: (e[0], e[1])):
            chosen.append(other)
            if self._fits(unit, leaving | {u.name for u in chosen}):
                return chosen
        return []
