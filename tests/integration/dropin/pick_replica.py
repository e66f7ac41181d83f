"""A drop-in plugin for the integration tests: the request's ``x-test-replica`` header
names the replica (its index) to send it to, so a test can move a conversation."""

from gateway import hookimpl


class Plugin:
    def __init__(self, config):
        self.config = config

    @hookimpl
    def route(self, ctx, backends):
        index = ctx.headers.get("X-TEST-REPLICA")
        backend = backends.get(ctx.backend)
        if index is None or backend is None:
            return None
        ctx.routing = "test"
        return backend.replicas[int(index)]
