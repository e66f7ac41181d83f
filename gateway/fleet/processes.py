"""The operating system's side of the fleet: launching one llama-server, asking it for
``/health``, and reading what it left behind (its log, its memory). No decisions here:
:mod:`gateway.fleet.states` decides when to call these."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys

from ..backends import kvstates
from ..config import BackendConfig
from .orphans import die_with_parent

LOG_TAIL_CHARS = 2000


def launch(backend: BackendConfig, port: int, log_path: str) -> subprocess.Popen[bytes]:
    """Start one llama-server of ``backend`` on ``port``, its output appended to ``log_path``."""
    launch = backend.launch
    assert launch is not None
    args = [sys.executable, "-m", "gateway.cli", "backend", "--model", launch.model, "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(launch.parallel), "--ctx", str(launch.ctx),
            "--cache-ram", str(launch.cache_ram)]
    if launch.threads:
        args += ["--threads", str(launch.threads)]
    if launch.embeddings:
        args.append("--embeddings")
    elif backend.kv_states and kvstates.states().enabled:
        # the host's one folder: a conversation saved from one replica restores into another
        args += ["--slot-save-path", kvstates.states().directory]
    if launch.extra_args:
        args += ["--", *launch.extra_args]
    env = dict(os.environ)
    env.pop("LLAMA_API_KEY", None)
    if backend.api_key:
        env["LLAMA_API_KEY"] = backend.api_key  # not on the command line: ps shows it
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Its own session: a Ctrl-C in the terminal reaches the supervisor, which stops it.
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
    finally:
        os.close(fd)


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - LOG_TAIL_CHARS))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def bound_log(path: str, limit: int) -> None:
    """A log past ``limit`` starts over (the writer appends, so it goes on at the start)."""
    try:
        if os.path.getsize(path) > limit:
            os.truncate(path, 0)
    except OSError:
        pass
