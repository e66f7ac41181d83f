"""A drop-in plugin for the integration tests: fails on demand, like a buggy plugin."""

from gateway import hookimpl


class Plugin:
    def __init__(self, config):
        self.config = config

    @hookimpl
    def request(self, ctx):
        if ctx.body and ctx.body.get("boom"):
            raise RuntimeError("a plugin bug")
