"""gunicorn settings for Llamagate, each read from the environment.

GATEWAY_BIND                 address to listen on            (127.0.0.1:8000)
GATEWAY_WORKERS              worker processes                (1)
GATEWAY_WORKER_CONNECTIONS   concurrent connections a worker (1000)
GATEWAY_TIMEOUT              worker heartbeat timeout, s     (30)
GATEWAY_GRACEFUL_TIMEOUT     how long streams survive a stop or reload, s (30)
GATEWAY_KEEPALIVE            idle keep-alive, s              (5)
GATEWAY_CONFIG               pipelines file the workers load (pipelines.yaml)
LLAMAGATE_LOG_LEVEL          debug, info, warning, error or critical, any case (info)
"""

import os
import sys

from gateway.logs import env_log_level

wsgi_app = "gateway.wsgi:get_app()"
bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GATEWAY_WORKERS", "1"))
# gunicorn's gevent worker with JSON errors, client timeouts and draining (gateway/worker.py)
worker_class = "gateway.worker.Worker"
worker_connections = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS", "1000"))
# With gevent workers the timeout is only a heartbeat: a long stream does not trip it.
timeout = int(os.environ.get("GATEWAY_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GATEWAY_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("GATEWAY_KEEPALIVE", "5"))
# Each worker builds its own app: backends' connection pools and health checks must
# not be shared across a fork.
preload_app = False
# gunicorn 25+ opens a control socket under ~/.gunicorn by default; we don't use it.
control_socket_disable = True
accesslog = None
errorlog = "-"
try:  # any case; a value that names no level stops the start with one line, before any worker
    loglevel = env_log_level().lower()
except ValueError as exc:
    sys.stderr.write(f"llamagate: {exc}\n")
    raise SystemExit(1) from None


def _check_config(server) -> bool:
    """Validate the pipelines file in a subprocess and, when it is good, keep its text
    for the workers to fall back on. A subprocess, because the master must not import
    requests (and ssl) before the workers patch the standard library for gevent."""
    import subprocess
    import sys

    from gateway import lifecycle

    path = os.environ.get("GATEWAY_CONFIG", "pipelines.yaml")
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "check", path], capture_output=True, text=True)
    if result.returncode != 0:
        server.log.error("%s is not valid:\n%s", path, result.stderr.strip())
        return False
    with open(path) as handle:
        lifecycle.last_good_config = handle.read()
    return True


def worker_exit(server, worker) -> None:
    # In the worker, after its last request: plugins flush what they buffer.
    app = getattr(worker, "wsgi", None)
    if hasattr(app, "shutdown"):
        app.shutdown()


def on_starting(server) -> None:
    # A bad config stops the start, with the reason.
    if not _check_config(server):
        raise SystemExit(1)


def on_reload(server) -> None:
    # HUP: new workers load the file again; when it is bad they keep serving the
    # last good configuration (the one checked here before), and say why.
    if not _check_config(server):
        server.log.error("keeping the last good configuration")
