"""The fleet supervisor: one process per gateway host that owns the launched
llama-servers (docs/fleet.md).

gunicorn's master starts it (gunicorn.conf.py, ``on_starting``) before any worker, so
every worker, and every worker that replaces one (a crash, ``max_requests``, a HUP),
talks to the same supervisor over a Unix socket in a private folder. A request leases
its model: ``acquire`` waits until the model is ready (starting it, or swapping another
out, if need be) and the lease lasts as long as the worker keeps the connection open;
a worker that dies closes it, so its leases go back by themselves.

Threads: one per connection (waiting leases sleep on the fleet's condition); the main
thread runs :meth:`Fleet.step` ten times a second and on every change, and is the only
one that launches or signals llama-servers. Launching from the main thread matters:
``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends.

No orphans: the supervisor asks the kernel for SIGTERM when the master dies (even by
``kill -9``), stops its llama-servers on SIGTERM/SIGINT, and every llama-server gets
SIGKILL when the supervisor dies.

    python -m gateway.fleet.supervisor --config pipelines.yaml --socket /tmp/x/fleet.sock
"""

from __future__ import annotations

import argparse
import faulthandler
import http.client
import json
import logging
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import BackendConfig, Config, ConfigError, FleetConfig, load_config
from .orphans import die_with_parent
from .spec import backend_memory

log = logging.getLogger("llamagate.fleet")

STATES = ("stopped", "starting", "ready", "draining", "stopping", "failed")
RESIDENT = ("starting", "ready", "draining", "stopping")  # take memory
TICK = 0.1
STOP_GRACE = 10.0  # seconds from SIGTERM to SIGKILL
STABLE = 30.0  # a replica healthy this long resets the failures in a row
LINGER = 0.5  # an idle model used this recently is not swapped out for a newcomer at once
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
LOG_TAIL_CHARS = 2000
MAX_LINE = 65536
RELOAD_EVERY = 1.0  # seconds between looks at the pipelines file


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
    expected_exit: bool = False


class Unit:
    """A launched backend and its state (one of :data:`STATES`)."""

    def __init__(self, backend: BackendConfig, models: list[str], log_dir: str) -> None:
        assert backend.launch is not None
        self.name = backend.name
        self.backend = backend
        self.launch = backend.launch
        self.models = models
        self.memory = backend_memory(backend)
        self.replicas = [Replica(port, os.path.join(log_dir, f"{backend.name}-{port}.log"))
                         for port in backend.launch.ports]
        self.state = "stopped"
        self.leases = 0
        self.waiters: list[Waiter] = []
        self.last_used = time.monotonic()
        self.ready_since: float | None = None
        self.load_started: float | None = None
        self.restarts = 0
        self.failures = 0  # in a row
        self.loads = 0
        self.last_load_seconds: float | None = None
        self.last_error = ""
        self.reason = ""  # short, for clients
        self.pinned = False  # an operator's load is waiting
        self.swap = False  # waiting for another model to make room
        self.report_swap = False  # the start in progress followed a swap
        self.restarting = False  # the start in progress follows a crash
        self.report_pending = False  # the next granted waiter carries the load figures
        self.retired = False  # no longer in the configuration: stops once its requests end

    @property
    def oldest_wait(self) -> float | None:
        if self.pinned:
            return float("-inf")
        return min((w.arrived for w in self.waiters), default=None)

    def status(self, now: float) -> dict[str, Any]:
        idle = self.state == "ready" and self.leases == 0 and not self.waiters
        alive = [r for r in self.replicas if r.popen is not None and r.popen.poll() is None]
        return {"backend": self.name, "models": self.models, "state": self.state,
                "pids": [r.popen.pid for r in alive if r.popen is not None], "ports": [r.port for r in self.replicas],
                "resident_bytes": sum(_rss(r.popen.pid) for r in alive if r.popen is not None),
                "memory_estimate": self.memory, "in_flight": self.leases, "queued": len(self.waiters),
                "idle_for": round(now - self.last_used, 1) if idle else 0.0,
                "start": self.launch.start, "idle_ttl": self.launch.idle_ttl,
                "restarts": self.restarts, "loads": self.loads, "last_load_seconds": self.last_load_seconds,
                "reason": self.reason or None, "last_error": self.last_error or None}


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Fleet:
    """Every launched backend of a config, and the decisions: start, grant, drain, stop."""

    def __init__(self, config: Config, log_dir: str) -> None:
        self.config = config
        self.fleet: FleetConfig = config.fleet
        self.log_dir = log_dir
        models: dict[str, list[str]] = {}
        for model in config.models.values():
            models.setdefault(model.backend, []).append(model.id)
        self.units = {name: Unit(b, models.get(name, []), log_dir) for name, b in config.launched.items()}
        self.retired: list[Unit] = []  # changed or removed by a reload, still stopping
        self.lock = threading.Condition()
        self.swaps = 0
        self.stopping = False

    # --- what connections ask (any thread) -----------------------------------------------------

    def enqueue(self, name: str) -> tuple[Unit | None, Waiter]:
        """Queue a request for the model of backend ``name``; its waiter's event is set
        once it is granted (a lease on the unit returned) or refused (``error``)."""
        waiter = Waiter(time.monotonic())
        with self.lock:
            unit = self.units.get(name)
            if unit is None:
                waiter.error = f"no launched backend named {name!r}"
            elif unit.state == "failed":
                waiter.error = unit.reason
            elif self.stopping:
                waiter.error = "the gateway is shutting down"
            else:
                unit.waiters.append(waiter)
                if unit.state == "ready":  # the common case, without waiting for the main thread
                    self._grant(unit)
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
            if unit.state == "failed":
                unit.state, unit.failures, unit.reason = "stopped", 0, ""
            if unit.state in ("stopped", "draining", "stopping"):
                unit.pinned = True
            self.lock.notify_all()
            self.lock.wait_for(lambda: unit.state in ("ready", "failed") and not unit.pinned, timeout)
            return unit.status(time.monotonic())

    def unload(self, name: str, timeout: float) -> dict[str, Any]:
        """Stop a model once its requests in flight have finished; waits until it is stopped."""
        with self.lock:
            unit = self._unit(name)
            unit.pinned = False
            if unit.state == "failed":
                unit.state, unit.failures, unit.reason = "stopped", 0, ""
            elif unit.state == "ready":
                unit.state = "draining"
            elif unit.state == "starting":
                self._stop(unit)
            self.lock.notify_all()
            # Stopped, or started again at once by requests that were waiting for it.
            self.lock.wait_for(lambda: unit.state not in ("draining", "stopping"), timeout)
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
                    "resident_memory_estimate": self._resident_memory(), "swaps": self.swaps,
                    "supervisor_pid": os.getpid(),
                    "models": {name: unit.status(now) for name, unit in self.units.items()}}

    # --- the decisions (main thread) -----------------------------------------------------------

    def step(self) -> None:
        with self.lock:
            now = time.monotonic()
            for unit in self._every():
                self._watch(unit, now)
            for unit in self._every():
                self._advance(unit, now)
            self.retired = [u for u in self.retired if u.state != "stopped"]
            self._schedule(now)
            self.lock.notify_all()

    def _every(self) -> list[Unit]:
        return [*self.units.values(), *self.retired]

    def reconfigure(self, config: Config) -> None:
        """A new configuration: unchanged launched backends carry on; a changed or removed
        one drains and stops (a changed one's queued requests wait for its replacement)."""
        with self.lock:
            models: dict[str, list[str]] = {}
            for model in config.models.values():
                models.setdefault(model.backend, []).append(model.id)
            units: dict[str, Unit] = {}
            for name, backend in config.launched.items():
                old = self.units.get(name)
                if old is not None and old.backend == backend:
                    units[name] = old
                else:
                    units[name] = Unit(backend, [], self.log_dir)
                    if old is not None:
                        units[name].waiters, old.waiters = old.waiters, []
                units[name].models = models.get(name, [])
            for name, old in self.units.items():
                if units.get(name) is not old:
                    self._retire(old)
            self.units, self.config, self.fleet = units, config, config.fleet
            self.lock.notify_all()

    def _retire(self, unit: Unit) -> None:
        log.info("fleet: %s left the configuration, stopping it once idle", unit.name)
        unit.retired = True
        for waiter in unit.waiters:
            waiter.error = f"The model's backend {unit.name} was removed from the configuration."
            waiter.event.set()
        unit.waiters.clear()
        if unit.state == "ready":
            unit.state = "draining"
        elif unit.state == "starting":
            self._stop(unit)
        if unit.state not in ("stopped", "failed"):
            self.retired.append(unit)

    def _watch(self, unit: Unit, now: float) -> None:
        """Reap exited llama-servers, see which became healthy, bound the logs."""
        for replica in unit.replicas:
            popen = replica.popen
            if popen is None:
                continue
            _bound_log(replica.log_path, self.fleet.log_bytes)
            code = popen.poll()
            if code is None:
                if replica.healthy_since is None:
                    # About one /health poll per tick, however often requests wake the loop.
                    if now - replica.polled_at >= TICK / 2:
                        replica.polled_at = now
                        if _healthy(replica.port):
                            replica.healthy_since = now
                    if replica.healthy_since is None and now - replica.launched_at > unit.launch.load_timeout:
                        replica.popen = None
                        popen.kill()
                        popen.wait()
                        self._failed_replica(unit, replica, now, f"not ready after {unit.launch.load_timeout:g} s")
                elif now - replica.healthy_since >= STABLE:
                    unit.failures = 0
                continue
            replica.popen = None
            if replica.expected_exit:
                continue
            self._failed_replica(unit, replica, now, f"exited with code {code}" if code >= 0 else
                                 f"killed by signal {-code}")

    def _failed_replica(self, unit: Unit, replica: Replica, now: float, what: str) -> None:
        was_up = replica.healthy_since is not None
        replica.healthy_since = None
        unit.failures += 1
        unit.last_error = f"{what}; log tail ({replica.log_path}):\n{_tail(replica.log_path)}"
        log.warning("fleet: %s (port %d) %s", unit.name, replica.port, what)
        if was_up:
            unit.restarts += 1
            unit.restarting = True
        if unit.failures > self.fleet.max_restarts:
            unit.reason = (f"The model's llama-server ({unit.name}) failed {unit.failures} time(s) in a row "
                           f"({what}); an operator must load it again.")
            self._stop(unit)
            unit.state = "failed"
            for waiter in unit.waiters:
                waiter.error = unit.reason
                waiter.event.set()
            unit.waiters.clear()
            return
        replica.relaunch_at = now + min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (unit.failures - 1))
        if unit.state == "ready" and not any(r.healthy_since for r in unit.replicas):
            unit.state, unit.load_started = "starting", now

    def _advance(self, unit: Unit, now: float) -> None:
        state = unit.state
        if state == "starting":
            for replica in unit.replicas:
                if replica.popen is None and now >= replica.relaunch_at:
                    self._launch(unit, replica, now)
            if all(r.healthy_since is not None for r in unit.replicas):
                self._ready(unit, now)
        elif state in ("ready", "draining"):
            for replica in unit.replicas:  # a crashed replica of a model still up
                if replica.popen is None and not replica.expected_exit and not unit.retired and \
                        now >= replica.relaunch_at:
                    self._launch(unit, replica, now)
            if state == "ready":
                self._grant(unit)
                ttl = unit.launch.idle_ttl
                if ttl is not None and unit.leases == 0 and not unit.waiters and now - unit.last_used >= ttl:
                    log.info("fleet: %s idle for %g s, stopping", unit.name, ttl)
                    unit.state = "draining"
            if unit.state == "draining" and unit.leases <= 0:
                self._stop(unit)
        elif state == "stopping":
            for replica in unit.replicas:
                if replica.popen is not None and replica.term_sent_at is not None and \
                        now - replica.term_sent_at > STOP_GRACE:
                    replica.popen.kill()
            if all(r.popen is None for r in unit.replicas):
                unit.state, unit.ready_since = "stopped", None

    def _schedule(self, now: float) -> None:
        """Start the waited-for stopped models, oldest waiter first, swapping out the least
        recently used models when they do not fit; eager ones start when they fit."""
        held = {r.port for u in self.retired for r in u.replicas if r.popen is not None}
        wanted = sorted((u for u in self.units.values() if u.state == "stopped" and u.oldest_wait is not None
                         and not held & set(u.launch.ports)),
                        key=lambda u: u.oldest_wait)  # type: ignore[arg-type, return-value]
        for unit in wanted:
            if self._fits(unit, set()):
                self._start(unit, now)
                continue
            unit.swap = True
            leaving = {u.name for u in self._every() if u.state in ("draining", "stopping") and not u.retired}
            if not self._fits(unit, leaving):  # not even once the models on their way out are gone
                for victim in self._victims(unit, now, leaving):
                    log.info("fleet: draining %s to make room for %s", victim.name, unit.name)
                    victim.state = "draining"
                    if victim.leases <= 0:
                        self._stop(victim)
            return  # first come, first served: a later model does not overtake this one
        for unit in self.units.values():
            if unit.launch.start == "eager" and unit.state == "stopped" and unit.failures == 0 \
                    and unit.loads == 0 and not held & set(unit.launch.ports) and self._fits(unit, set()):
                self._start(unit, now)

    def _resident_memory(self) -> int:
        return sum(u.memory for u in self._every() if u.state in RESIDENT)

    def _fits(self, unit: Unit, leaving: set[str]) -> bool:
        """Would ``unit`` fit, were the models named in ``leaving`` gone? (Models draining
        or stopping still hold their memory until they have exited.)"""
        resident = [u for u in self._every() if u.state in RESIDENT and (u.name not in leaving or u.retired)]
        if self.fleet.max_resident is not None and len(resident) + 1 > self.fleet.max_resident:
            return False
        budget = self.fleet.memory_budget
        return budget is None or sum(u.memory for u in resident) + unit.memory <= budget

    def _victims(self, unit: Unit, now: float, leaving: set[str]) -> list[Unit]:
        """The ready models to drain so that ``unit`` fits (besides ``leaving``), least
        recently used first; none when it cannot fit yet. An idle model may go (once it has
        been idle a moment); a busy one only once ``unit`` has waited ``group_wait`` and the
        busy one has been resident as long: requests are served in groups, and neither
        side starves."""
        waited = now - unit.oldest_wait  # type: ignore[operator]
        group_wait = self.fleet.group_wait
        eligible = []
        for other in self.units.values():
            if other.state != "ready" or other is unit:
                continue
            idle = other.leases <= 0 and not other.waiters
            resident_for = now - (other.ready_since or now)
            if (idle and (now - other.last_used >= LINGER or waited >= group_wait)) or \
                    (waited >= group_wait and resident_for >= group_wait):
                eligible.append((not idle, other.last_used, other))
        chosen: list[Unit] = []
        for _, _, other in sorted(eligible, key=lambda e: (e[0], e[1])):
            chosen.append(other)
            if self._fits(unit, leaving | {u.name for u in chosen}):
                return chosen
        return []

    def _start(self, unit: Unit, now: float) -> None:
        log.info("fleet: starting %s", unit.name)
        unit.state, unit.pinned, unit.load_started = "starting", False, now
        unit.reason = ""
        unit.report_swap, unit.swap = unit.swap, False
        if unit.report_swap:
            self.swaps += 1
        for replica in unit.replicas:
            replica.relaunch_at = now
            self._launch(unit, replica, now)

    def _launch(self, unit: Unit, replica: Replica, now: float) -> None:
        replica.expected_exit, replica.term_sent_at, replica.healthy_since = False, None, None
        replica.launched_at = now
        if _port_in_use(replica.port):
            replica.relaunch_at = now
            self._failed_replica(unit, replica, now, f"port {replica.port} is in use by another process")
            return
        launch = unit.launch
        args = [sys.executable, "-m", "gateway.cli", "backend", "--model", launch.model, "--host", "127.0.0.1",
                "--port", str(replica.port), "--parallel", str(launch.parallel), "--ctx", str(launch.ctx),
                "--cache-ram", str(launch.cache_ram)]
        if launch.threads:
            args += ["--threads", str(launch.threads)]
        if launch.embeddings:
            args.append("--embeddings")
        if launch.extra_args:
            args += ["--", *launch.extra_args]
        env = dict(os.environ)
        env.pop("LLAMA_API_KEY", None)
        if unit.backend.api_key:
            env["LLAMA_API_KEY"] = unit.backend.api_key  # not on the command line: ps shows it
        fd = os.open(replica.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # Its own session: a Ctrl-C in the terminal reaches the supervisor, which stops it.
            replica.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                             start_new_session=True,
                                             preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        finally:
            os.close(fd)

    def _ready(self, unit: Unit, now: float) -> None:
        unit.state, unit.ready_since = "ready", now
        unit.loads += 1
        if unit.load_started is not None:
            unit.last_load_seconds = round(now - unit.load_started, 3)
        unit.report_pending = True
        unit.last_used = now
        log.info("fleet: %s ready in %.2f s", unit.name, unit.last_load_seconds or 0)

    def _grant(self, unit: Unit) -> None:
        for waiter in unit.waiters:
            if unit.report_pending:
                waiter.report = {"load_seconds": unit.last_load_seconds, "swap": unit.report_swap,
                                 "restart": unit.restarting}
                unit.report_pending = unit.report_swap = unit.restarting = False
            unit.leases += 1
            waiter.event.set()
        unit.waiters.clear()

    def _stop(self, unit: Unit) -> None:
        unit.state = "stopping"
        for replica in unit.replicas:
            replica.expected_exit = True
            replica.healthy_since = None
            if replica.popen is not None and replica.popen.poll() is None:
                replica.popen.terminate()
                replica.term_sent_at = time.monotonic()

    def shutdown(self) -> None:
        """Stop every llama-server: SIGTERM, then SIGKILL after STOP_GRACE."""
        with self.lock:
            self.stopping = True
            for unit in self._every():
                for waiter in unit.waiters:
                    waiter.error = "the gateway is shutting down"
                    waiter.event.set()
                unit.waiters.clear()
                self._stop(unit)
            popens = [r.popen for u in self._every() for r in u.replicas if r.popen is not None]
        log.info("fleet: stopping %d llama-server(s)", len(popens))
        deadline = time.monotonic() + STOP_GRACE
        for popen in popens:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - LOG_TAIL_CHARS))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _bound_log(path: str, limit: int) -> None:
    """A log past ``limit`` starts over (the writer appends, so it goes on at the start)."""
    try:
        if os.path.getsize(path) > limit:
            os.truncate(path, 0)
    except OSError:
        pass


class _Handler(socketserver.StreamRequestHandler):
    """One connection: one JSON line in, one JSON line out; an ``acquire`` keeps the
    connection as its lease."""

    server: _Server

    def handle(self) -> None:
        fleet = self.server.fleet
        try:
            line = self.rfile.readline(MAX_LINE)
            message = json.loads(line)
            op = message["op"]
        except (ValueError, KeyError, TypeError, OSError):
            return
        if op == "acquire":
            self._lease(fleet, str(message.get("backend")))
            return
        try:
            if op == "status":
                answer: dict[str, Any] = fleet.status()
            elif op in ("load", "unload"):
                act = fleet.load if op == "load" else fleet.unload
                answer = act(str(message.get("backend")), float(message.get("timeout", 300)))
            else:
                answer = {"error": f"unknown op {op!r}"}
        except KeyError:
            answer = {"error": "not_found"}
        self._send(answer)

    def _send(self, answer: dict[str, Any]) -> None:
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            pass

    def _lease(self, fleet: Fleet, name: str) -> None:
        unit, waiter = fleet.enqueue(name)
        while not waiter.event.wait(0.5):
            if _closed(self.connection):
                assert unit is not None
                fleet.abandon(unit, waiter)
                return
        if waiter.error is not None or unit is None:
            self._send({"ok": False, "reason": waiter.error})
            return
        try:
            self._send({"ok": True, **waiter.report})
            while self.connection.recv(64):  # until the worker closes it (or dies)
                pass
        except OSError:
            pass
        finally:
            fleet.release(unit)


def _closed(sock: socket.socket) -> bool:
    """Did the other end close (or send something, which a waiting worker never does)?"""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fleet: Fleet


def serve(config: Config, socket_path: str, log_dir: str) -> None:
    """Run until SIGTERM or SIGINT (or the death of the parent), then stop every llama-server."""
    fleet = Fleet(config, log_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    old_umask = os.umask(0o077)  # only this user may connect
    try:
        server = _Server(socket_path, _Handler)
    finally:
        os.umask(old_umask)
    server.fleet = fleet
    threading.Thread(target=server.serve_forever, name="fleet-server", daemon=True).start()
    log.info("fleet: supervisor %d on %s, %d launched backend(s)", os.getpid(), socket_path, len(fleet.units))
    watched, next_look = _mtime(config.file), time.monotonic() + RELOAD_EVERY
    try:
        while not stop.is_set():
            fleet.step()
            with fleet.lock:
                fleet.lock.wait(TICK)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + RELOAD_EVERY
                mtime = _mtime(config.file)
                if mtime != watched:
                    watched = mtime
                    _reload(fleet, config.file)
    finally:
        server.shutdown()
        fleet.shutdown()
        try:
            os.unlink(socket_path)
        except OSError:
            pass


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _reload(fleet: Fleet, path: str) -> None:
    """The pipelines file changed: the fleet follows it, unless it does not load."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("fleet: %s is not valid; the fleet keeps its configuration:\n%s", path, exc)
        return
    fleet.reconfigure(config)
    log.info("fleet: reloaded %s", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.fleet.supervisor")
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent", type=int, default=None, help="exit when this pid is no longer our parent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where is every thread?
    # The parent may have died between our fork and the prctl call.
    if args.parent is not None and os.getppid() != args.parent:
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    log_dir = config.fleet.log_dir or tempfile.mkdtemp(prefix="llamagate-fleet-logs-")
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    serve(config, args.socket, log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
