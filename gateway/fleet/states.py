"""One launched backend's state machine: its states, the transitions allowed between them,
and what each change does to its llama-servers (docs/fleet.md, "States").

Every change of state goes through :meth:`Unit.to`, which checks :data:`TRANSITIONS`: a
change the table does not allow is a bug in the supervisor, and raises. (llama-swap does
the same with a compare-and-swap on its process state; here every change already happens
under the fleet's one lock, so checking the table is enough.)
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

from ..backends import kvstates, slots
from ..config import BackendConfig
from ..errors import LlamagateError
from . import processes
from .spec import backend_memory

log = logging.getLogger("llamagate.fleet")

STOP_GRACE = 10.0  # seconds from SIGTERM to SIGKILL
STABLE = 30.0  # a replica healthy this long resets the failures in a row
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
HEALTH_POLL = 0.05  # at most one /health poll per replica this often, however often the loop wakes


class State(str, enum.Enum):
    STOPPED = "stopped"  # no process; a request or an operator's load starts it
    STARTING = "starting"  # launched, waiting for /health; requests queue
    READY = "ready"  # serving; requests are granted at once
    DRAINING = "draining"  # chosen to stop: what it granted finishes, new requests queue
    STOPPING = "stopping"  # SIGTERM sent, SIGKILL after STOP_GRACE
    FAILED = "failed"  # failed max_restarts + 1 times in a row; refuses until an operator's load


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({
        State.STARTING,  # the scheduler starts it: a request, an operator's load, start: eager
    }),
    State.STARTING: frozenset({
        State.READY,  # every replica answers /health
        State.STOPPING,  # an unload, a reload that removed it, the shutdown
        State.FAILED,  # max_restarts + 1 failures in a row
    }),
    State.READY: frozenset({
        State.DRAINING,  # a swap, idle_ttl, an unload, a reload that removed it
        State.STARTING,  # its last healthy replica crashed: restarting
        State.STOPPING,  # the shutdown
        State.FAILED,  # a crashed replica kept failing
    }),
    State.DRAINING: frozenset({
        State.STOPPING,  # its last lease went back (or the shutdown)
        State.FAILED,  # a replica relaunched while it drains kept failing
    }),
    State.STOPPING: frozenset({
        State.STOPPED,  # every process exited (SIGKILL after STOP_GRACE)
    }),
    State.FAILED: frozenset({
        State.STOPPED,  # an operator's load or unload: a fresh round
    }),
}
RESIDENT = frozenset({State.STARTING, State.READY, State.DRAINING, State.STOPPING})  # these hold memory


class IllegalTransition(LlamagateError, RuntimeError):
    """A change of state that :data:`TRANSITIONS` does not allow: a bug in the supervisor."""


@dataclass(eq=False)
class Waiter:
    """A request waiting for its model; ``event`` is set once it is granted or refused."""

    arrived: float
    event: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Replica:
    """One llama-server process of a launched backend (or the place for one)."""

    port: int
    log_path: str
    popen: subprocess.Popen[bytes] | None = None
    launched_at: float = 0.0
    healthy_since: float | None = None
    polled_at: float = 0.0  # the last /health poll while it starts
    relaunch_at: float = 0.0
    term_sent_at: float | None = None
    expected_exit: bool = False  # stopped on purpose: its exit is not a failure


@dataclass
class Load:
    """The start in progress: when it began and why (for the first request it grants)."""

    started: float
    swap: bool = False  # another model was drained to make room for it
    restart: bool = False  # it follows a crash


class Unit:
    """A launched backend: its replicas, its requests, and its :class:`State`."""

    def __init__(self, backend: BackendConfig, models: list[str], log_dir: str, now: float) -> None:
        assert backend.launch is not None
        self.name = backend.name
        self.backend = backend
        self.launch = backend.launch
        self.models = models
        self.memory = backend_memory(backend)
        self.replicas = [Replica(port, os.path.join(log_dir, f"{backend.name}-{port}.log"))
                         for port in backend.launch.ports]
        self._state = State.STOPPED
        self.leases = 0
        self.waiters: list[Waiter] = []
        self.last_used = now
        self.ready_since: float | None = None
        self.load: Load | None = None  # while starting
        self.report: dict[str, Any] | None = None  # the last load's figures, until a request carries them
        self.restarts = 0
        self.failures = 0  # in a row
        self.loads = 0
        self.last_load_seconds: float | None = None
        self.last_error = ""
        self.reason = ""  # short, for clients
        self.pinned = False  # an operator's load is waiting
        self.waits_for_room = False  # the scheduler found it does not fit: its start will be a swap

    @property
    def state(self) -> State:
        return self._state

    def to(self, new: State) -> None:
        """The one way to change state: refuses what :data:`TRANSITIONS` does not allow."""
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"fleet: {self.name} cannot go from {self._state.value} to {new.value}")
        log.debug("fleet: %s %s -> %s", self.name, self._state.value, new.value)
        self._state = new

    @property
    def oldest_wait(self) -> float | None:
        if self.pinned:
            return float("-inf")
        return min((w.arrived for w in self.waiters), default=None)

    # --- the transitions and what they do -------------------------------------------------------

    def start(self, now: float, max_restarts: int) -> None:
        self.to(State.STARTING)
        log.info("fleet: starting %s", self.name)
        self.load = Load(now, swap=self.waits_for_room)
        self.pinned = self.waits_for_room = False
        self.reason = ""
        for replica in self.replicas:
            replica.relaunch_at = now
            self.launch_replica(replica, now, max_restarts)

    def ready(self, now: float) -> None:
        self.to(State.READY)
        self.ready_since = self.last_used = now
        self.loads += 1
        assert self.load is not None
        self.last_load_seconds = round(now - self.load.started, 3)
        self.report = {"load_seconds": self.last_load_seconds, "swap": self.load.swap, "restart": self.load.restart}
        self.load = None
        log.info("fleet: %s ready in %.2f s", self.name, self.last_load_seconds)

    def stop(self, now: float) -> None:
        if self._state in (State.READY, State.DRAINING) and self.backend.kv_states:
            self.save_conversations()
        self.to(State.STOPPING)
        self.load = None
        self.terminate(now)

    def save_conversations(self) -> None:
        """Save the conversations its llama-servers' idle slots hold, so that they come
        back warm when the model is loaded again (docs/kv-states.md). Its requests have
        all ended (a drain waits for them), so every slot is idle."""
        for replica in self.replicas:
            if replica.popen is None or replica.healthy_since is None:
                continue
            saved, size = kvstates.save_replica(f"http://127.0.0.1:{replica.port}", self.launch.parallel,
                                                self.backend.api_key)
            if saved:
                log.info("fleet: %s (port %d) saved %d conversation(s), %d bytes, before stopping", self.name,
                         replica.port, saved, size)

    def stopped(self) -> None:
        self.to(State.STOPPED)
        self.ready_since = None

    def reset(self) -> None:
        """An operator's fresh round for a failed model."""
        self.to(State.STOPPED)
        self.failures, self.reason = 0, ""

    def fail(self, reason: str, now: float) -> None:
        self.to(State.FAILED)
        self.reason, self.load = reason, None
        self.terminate(now)
        self.refuse(reason)

    def terminate(self, now: float) -> None:
        """SIGTERM to every replica still running; from now on their exits are expected."""
        for replica in self.replicas:
            replica.expected_exit = True
            replica.healthy_since = None
            if replica.popen is not None and replica.popen.poll() is None:
                replica.popen.terminate()
                replica.term_sent_at = now

    # --- its requests ---------------------------------------------------------------------------

    def grant(self) -> None:
        """Every waiting request gets a lease; the first one carries the last load's figures."""
        for waiter in self.waiters:
            if self.report is not None:
                waiter.report, self.report = self.report, None
            self.leases += 1
            waiter.event.set()
        self.waiters.clear()

    def refuse(self, error: str) -> None:
        for waiter in self.waiters:
            waiter.error = error
            waiter.event.set()
        self.waiters.clear()

    # --- its processes --------------------------------------------------------------------------

    def launch_replica(self, replica: Replica, now: float, max_restarts: int) -> None:
        replica.expected_exit, replica.term_sent_at, replica.healthy_since = False, None, None
        replica.launched_at = now
        if processes.port_in_use(replica.port):
            replica.relaunch_at = now
            self.replica_failed(replica, now, f"port {replica.port} is in use by another process", max_restarts)
            return
        slots.table().forget(f"http://127.0.0.1:{replica.port}")  # a new llama-server: its slots hold nothing
        replica.popen = processes.launch(self.backend, replica.port, replica.log_path)

    def reap(self, now: float, max_restarts: int) -> None:
        """Take note of the llama-servers that exited: a failure, unless stopped on purpose."""
        for replica in self.replicas:
            code = replica.popen.poll() if replica.popen is not None else None
            if code is None:
                continue
            replica.popen = None
            if not replica.expected_exit:
                self.replica_failed(replica, now, f"exited with code {code}" if code >= 0 else
                                    f"killed by signal {-code}", max_restarts)

    def watch(self, now: float, log_bytes: int, max_restarts: int) -> None:
        """Reap exited llama-servers, see which became healthy, bound the logs."""
        self.reap(now, max_restarts)
        for replica in self.replicas:
            popen = replica.popen
            if popen is None:
                continue
            processes.bound_log(replica.log_path, log_bytes)
            if replica.expected_exit:  # on its way out: only STOP_GRACE applies
                continue
            if replica.healthy_since is None:
                if now - replica.polled_at >= HEALTH_POLL:
                    replica.polled_at = now
                    if processes.healthy(replica.port):
                        replica.healthy_since = now
                if replica.healthy_since is None and now - replica.launched_at > self.launch.load_timeout:
                    replica.popen = None
                    popen.kill()
                    popen.wait()
                    self.replica_failed(replica, now, f"not ready after {self.launch.load_timeout:g} s", max_restarts)
            elif now - replica.healthy_since >= STABLE:
                self.failures = 0

    def kill_late(self, now: float) -> None:
        """SIGKILL to the replicas that did not exit within STOP_GRACE of their SIGTERM."""
        for replica in self.replicas:
            if replica.popen is not None and replica.term_sent_at is not None and \
                    now - replica.term_sent_at > STOP_GRACE:
                replica.popen.kill()

    def replica_failed(self, replica: Replica, now: float, what: str, max_restarts: int) -> None:
        was_up = replica.healthy_since is not None
        replica.healthy_since = None
        self.failures += 1
        self.last_error = f"{what}; log tail ({replica.log_path}):\n{processes.tail(replica.log_path)}"
        log.warning("fleet: %s (port %d) %s", self.name, replica.port, what)
        if was_up:
            self.restarts += 1
        if self.failures > max_restarts:
            self.fail(f"The model's llama-server ({self.name}) failed {self.failures} time(s) in a row "
                      f"({what}); an operator must load it again.", now)
            return
        replica.relaunch_at = now + min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.failures - 1))
        if self._state is State.READY and not any(r.healthy_since for r in self.replicas):
            self.to(State.STARTING)
            self.load = Load(now, restart=True)
        elif was_up and self.load is not None:
            self.load.restart = True

    # --- what the operator sees -----------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        idle = self._state is State.READY and self.leases == 0 and not self.waiters
        alive = [r.popen for r in self.replicas if r.popen is not None and r.popen.poll() is None]
        return {"backend": self.name, "models": self.models, "state": self._state.value,
                "pids": [p.pid for p in alive], "ports": [r.port for r in self.replicas],
                "resident_bytes": sum(processes.rss(p.pid) for p in alive),
                "memory_estimate": self.memory, "in_flight": self.leases, "queued": len(self.waiters),
                "idle_for": round(now - self.last_used, 1) if idle else 0.0,
                "start": self.launch.start, "idle_ttl": self.launch.idle_ttl,
                "restarts": self.restarts, "loads": self.loads, "last_load_seconds": self.last_load_seconds,
                "reason": self.reason or None, "last_error": self.last_error or None}
