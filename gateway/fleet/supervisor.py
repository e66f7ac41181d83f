"""The fleet supervisor: one process per gateway host that owns the launched
llama-servers (docs/fleet.md). This module wires the parts together and runs them:
:mod:`.states` (one model's state machine), :mod:`.scheduler` (the decisions),
:mod:`.server` (the Unix socket of leases), :mod:`.processes` (launching, /health).

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
import logging
import os
import signal
import sys
import tempfile
import threading
import time

from ..config import Config, ConfigError, load_config
from .scheduler import Fleet
from .server import LeaseServer

log = logging.getLogger("llamagate.fleet")

TICK = 0.1
RELOAD_EVERY = 1.0  # seconds between looks at the pipelines file


def serve(config: Config, socket_path: str, log_dir: str) -> None:
    """Run until SIGTERM or SIGINT (or the death of the parent), then stop every llama-server."""
    fleet = Fleet(config, log_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = LeaseServer(socket_path, fleet)
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
