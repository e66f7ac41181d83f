"""Hot reload: a new ``pipelines.yaml`` (or a file a plugin watches, such as the auth
plugin's keys file) replaces the configuration of a running worker without a restart.

The worker's WSGI callable is a :class:`ReloadingApp`. A watcher greenlet looks at the
files every ``GATEWAY_RELOAD_INTERVAL`` seconds; on a change it checks the whole new
configuration (schemas, every plugin loaded and configured) and only then swaps in a
new app for new requests, in one assignment. Requests in flight finish on the gateway
they started with, and the old gateway's health checks stop. What must outlive a
reload is one object, :class:`gateway.web.state.Carried`, handed from each gateway to the
next: unchanged backends (pools, breakers) and every backend's admission (so old and
new never admit twice the limit), the requests in flight (still cancellable), and the
Redis link; memory stores (rate limits and caches) outlive it as the process's own
(:func:`gateway.storage.stores.make_store`). Once the old gateway's last request completed,
its plugins' ``shutdown`` hooks run (to flush what they buffer). A bad file leaves the old
configuration serving, logged with its path and reason, and counted in StatsD
(``config.reload_failed``; a good one counts ``config.reloaded``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Iterable

from .app import build_app
from .state import Gateway
from ..config import ConfigError, load_config
from ..hookspecs import plugin_attribute
from ..pipeline import build_pipelines

log = logging.getLogger("llamagate")
RETIRE_POLL = 0.2  # seconds between looks at whether a replaced gateway is idle


def watched_files(gateway: Gateway) -> list[str]:
    """The config file and every file a plugin asks to have watched (``watch_files``)."""
    files = [gateway.config.file]
    for pipeline in gateway.pipelines.values():
        for _, plugin in pipeline.plugins:
            files.extend(plugin_attribute(plugin, "watch_files") or ())
    return files


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class ReloadingApp:
    """A WSGI app that can be replaced while it serves.

    Args:
        gateway: The gateway it starts with (its health checks already running).
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.app = build_app(gateway)
        gateway.carried.keep(gateway)
        self._stamps = {path: _stamp(path) for path in watched_files(gateway)}
        self._stop = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.app(environ, start_response)

    def changed(self) -> bool:
        return any(_stamp(path) != stamp for path, stamp in self._stamps.items())

    def reload(self) -> bool:
        """Check the files again and swap in the new configuration if it is good."""
        old = self.gateway
        path = old.config.file
        stamps = {p: _stamp(p) for p in self._stamps}
        try:
            config = load_config(path)
            gateway = Gateway(config, build_pipelines(config), carried=old.carried)
        except ConfigError as exc:
            self._stamps = stamps  # do not retry the same bad file every interval
            old.pending_counters["config.reload_failed"] = old.pending_counters.get("config.reload_failed", 0) + 1
            log.error("not reloading: %s is not valid; the previous configuration keeps serving:\n%s", path, exc)
            return False
        gateway.pending_counters["config.reloaded"] = 1
        old.upstreams.stop()
        gateway.upstreams.start_health_checks()
        self.app, self.gateway = build_app(gateway), gateway
        gateway.carried.keep(gateway)  # stops the old Redis link if shared: changed
        if gateway.shared is not None:  # started once per link
            gateway.shared.start(lambda: self.gateway)
        self._stamps = {p: _stamp(p) for p in watched_files(gateway)}
        self._retire(old)
        log.info("reloaded %s", path)
        return True

    def _retire(self, old: Gateway) -> None:
        """Shut the old gateway's plugins down once its last request completed."""

        def wait_then_shut_down() -> None:
            while old.active > 0 and not self._stop.wait(RETIRE_POLL):
                pass
            old.shutdown()

        threading.Thread(target=wait_then_shut_down, name="llamagate-retire", daemon=True).start()

    def shutdown(self) -> None:
        """The worker is exiting (its requests done or abandoned): stop watching and
        run the plugins' ``shutdown`` hooks."""
        self._stop.set()
        self.gateway.upstreams.stop()
        self.gateway.shutdown()

    def watch(self, interval: float) -> None:
        """Check for changes every ``interval`` seconds, in the background."""

        def loop() -> None:
            while not self._stop.wait(interval):
                if self.changed():
                    self.reload()

        threading.Thread(target=loop, name="llamagate-reload", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

