"""gunicorn settings for Llamagate, from the environment through ``gateway.settings``
(``llamagate settings`` lists them; docs/configuration-environment.md describes them):
GATEWAY_BIND, GATEWAY_WORKERS, GATEWAY_WORKER_CONNECTIONS, GATEWAY_TIMEOUT,
GATEWAY_GRACEFUL_TIMEOUT, GATEWAY_KEEPALIVE, GATEWAY_CONFIG and LLAMAGATE_LOG_LEVEL.

Bad values stop the start before any worker, with one line per problem on stderr.
"""

import sys

from gateway import settings as gateway_settings

try:
    _settings = gateway_settings.current()
except gateway_settings.SettingsError as exc:
    sys.stderr.write("".join(f"llamagate: {line}\n" for line in exc.problems))
    raise SystemExit(1) from None

if not _settings.metrics_dir:
    # prometheus_client's multiprocess mode: one directory per run of the gateway, shared
    # by its workers (a HUP re-reads this file: the variable is set by then, so it stays)
    import os
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llamagate-metrics-")
    gateway_settings.reset()
    _settings = gateway_settings.current()

wsgi_app = "gateway.web.wsgi:get_app()"
bind = _settings.bind
workers = _settings.workers
# gunicorn's gevent worker with JSON errors, client timeouts and draining (gateway/web/worker.py)
worker_class = "gateway.web.worker.Worker"
worker_connections = _settings.worker_connections
# With gevent workers the timeout is only a heartbeat: a long stream does not trip it.
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
keepalive = _settings.keepalive
# Each worker builds its own app: backends' connection pools and health checks must
# not be shared across a fork.
preload_app = False
# gunicorn 25+ opens a control socket under ~/.gunicorn by default; we don't use it.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = _settings.log_level  # lower case, as gunicorn takes it


def _check_config(server) -> bool:
    """Validate the pipelines file in a subprocess and, when it is good, keep its text
    for the workers to fall back on. A subprocess, because the master must not import
    requests (and ssl) before the workers patch the standard library for gevent."""
    import subprocess

    from gateway import lifecycle

    path = _settings.config
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


def child_exit(server, worker) -> None:
    # A worker gone: its live gauges leave the prometheus plugin's sums (its counters stay).
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid)


def on_starting(server) -> None:
    # A bad config stops the start, with the reason.
    if not _check_config(server):
        raise SystemExit(1)
    # One fleet supervisor for every worker, present and future (docs/fleet.md).
    from gateway.fleet import master

    master.start(_settings.config, server.log)


def on_exit(server) -> None:
    # After the last worker: the supervisor stops every llama-server it launched, and
    # the metrics folder made above goes (an operator's own stays).
    import os
    import shutil

    from gateway.fleet import master

    master.stop()
    if os.path.basename(_settings.metrics_dir).startswith("llamagate-metrics-"):
        shutil.rmtree(_settings.metrics_dir, ignore_errors=True)


def on_reload(server) -> None:
    # HUP: new workers load the file again; when it is bad they keep serving the
    # last good configuration (the one checked here before), and say why.
    if not _check_config(server):
        server.log.error("keeping the last good configuration")
        return
    # The fleet supervisor follows the file itself; this starts one if the file now
    # launches a backend and none runs yet.
    from gateway.fleet import master

    master.start(_settings.config, server.log)
