"""Test plugin: shifts the quota plugin's clock by the seconds written in a file, so a
test can move every worker to the next day without waiting for it (clock injection:
the quota's counters, Redis and the rest stay real)."""

import os
import time

import plugins.quota


class Plugin:
    config_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"offset_file": {"type": "string", "description": "seconds to add", "default": ""}}}

    def __init__(self, config):
        path = config["offset_file"]

        def shifted() -> float:
            offset = float(open(path).read() or 0) if path and os.path.exists(path) else 0.0
            return time.time() + offset

        plugins.quota.clock = shifted
