"""gunicorn's master starts the fleet supervisor before any worker and stops it last
(gunicorn.conf.py: ``on_starting``, ``on_exit``). Workers find it through
``LLAMAGATE_FLEET_SOCKET``, which they inherit.

It imports only the standard library, ``gateway.settings`` and PyYAML: the master must
not import requests before the workers patch the standard library for gevent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from .. import settings
from .orphans import die_with_parent

STOP_WAIT = 20.0  # the supervisor gives its llama-servers 10 s, then kills them

_supervisor: subprocess.Popen[bytes] | None = None


def launches(config_path: str) -> bool:
    """Does the (already checked) pipelines file declare a launched backend?"""
    import yaml

    with open(config_path) as handle:
        doc = yaml.safe_load(handle)
    return any(isinstance(b, dict) and "launch" in b for b in (doc.get("backends") or {}).values())


def start(config_path: str, log: Any) -> None:
    """Start the supervisor for ``config_path``, its socket in a new private folder, when
    the file launches a backend and none runs yet (a gateway that launches nothing does
    not pay for one; a HUP after the first launched backend was added starts it)."""
    global _supervisor
    if _supervisor is not None and _supervisor.poll() is None or not launches(config_path):
        return
    folder = tempfile.mkdtemp(prefix="llamagate-fleet-")  # mode 0700: only this user connects
    path = os.path.join(folder, "fleet.sock")
    parent = os.getpid()
    # SIGTERM when the master dies, however it dies (kill -9 included).
    _supervisor = subprocess.Popen(
        [sys.executable, "-m", "gateway.fleet.supervisor", "--config", config_path, "--socket", path,
         "--parent", str(parent)],
        stdin=subprocess.DEVNULL, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    os.environ["LLAMAGATE_FLEET_SOCKET"] = path
    settings.reset()  # the workers, forked from here, read it
    log.info("fleet supervisor started (pid %d, socket %s)", _supervisor.pid, path)


def stop() -> None:
    """Stop the supervisor, which stops every llama-server first."""
    if _supervisor is None or _supervisor.poll() is not None:
        return
    _supervisor.terminate()
    try:
        _supervisor.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        _supervisor.kill()
        _supervisor.wait()
