"""The WSGI entry gunicorn runs: ``gateway.web.wsgi:get_app()``."""

from __future__ import annotations

import logging
from typing import Any

import yaml

from .. import lifecycle, settings
from ..config import ConfigError, load_config, parse_config
from ..logs import setup_logging  # (importing it also bounds the llamagate logger's lines)
from ..pipeline import build_pipelines
from .reload import ReloadingApp
from .state import Gateway

log = logging.getLogger("llamagate")


def get_app() -> Any:
    """The app gunicorn runs: config from ``GATEWAY_CONFIG`` (default ``pipelines.yaml``),
    reloaded when it changes (``GATEWAY_RELOAD_INTERVAL`` seconds between looks, 0: never).

    When the file is not valid (a bad edit before a restart), the worker serves the
    last configuration the master found good, and logs why.
    """
    current = settings.current()  # gunicorn.conf.py already refused bad values
    setup_logging(current.log_level)
    path = current.config
    try:
        config = load_config(path)
        pipelines = build_pipelines(config)
    except ConfigError as exc:
        if lifecycle.last_good_config is None:
            raise
        log.error("%s is not valid; serving the last good configuration instead:\n%s", path, exc)
        config = parse_config(yaml.safe_load(lifecycle.last_good_config), file=path)
        pipelines = build_pipelines(config)
    gateway = Gateway(config, pipelines)
    gateway.upstreams.start_health_checks()
    app = ReloadingApp(gateway)
    if gateway.shared is not None:
        gateway.shared.start(lambda: app.gateway)
    if current.reload_interval > 0:
        app.watch(current.reload_interval)
    return app
