"""The floor: the least a Python gateway on this stack costs. A bare Falcon app, under
gunicorn's plain gevent worker (``-k gevent``), that relays POST /v1/chat/completions to
one upstream with one ``requests.Session`` and nothing else: no routing, admission,
retries, plugins, normalisation, timeouts beyond requests' own, or error shaping.
Plain answers are read whole and sent with their length; streams are relayed as they
come (``iter_content(chunk_size=None)``). ``make bench`` compares the gateway with it.

    FLOOR_UPSTREAM=http://127.0.0.1:8081 gunicorn -k gevent --chdir bench 'floor:create_app()'
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import falcon
import requests
from requests.adapters import HTTPAdapter


class Relay:
    """POST -> the upstream's same route, the answer back as it is."""

    def __init__(self, session: requests.Session, url: str) -> None:
        self.session = session
        self.url = url

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        upstream = self.session.post(self.url, data=req.bounded_stream.read(), stream=True, timeout=(5, 300),
                                     headers={"Content-Type": req.content_type or "application/json"})
        resp.status = upstream.status_code
        resp.content_type = upstream.headers.get("Content-Type", "application/json")
        if resp.content_type.startswith("text/event-stream"):
            resp.stream = _relay(upstream)
        else:
            resp.data = upstream.content
            upstream.close()  # back to the pool


def _relay(upstream: requests.Response) -> Iterator[bytes]:
    try:
        yield from upstream.iter_content(chunk_size=None)
    finally:
        upstream.close()  # all read: back to the pool; a client gone mid-stream: closed


def create_app(upstream: str | None = None, connections: int | None = None) -> Any:
    """The floor's WSGI app.

    Args:
        upstream: Base URL of the llama-server (default: ``FLOOR_UPSTREAM``).
        connections: The pool's size, as many as the worker's connections
            (default: ``FLOOR_CONNECTIONS``, else 1000).
    """
    upstream = (upstream or os.environ.get("FLOOR_UPSTREAM") or "http://127.0.0.1:8081").rstrip("/")
    connections = connections or int(os.environ.get("FLOOR_CONNECTIONS") or 1000)
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=connections))
    app = falcon.App()
    app.add_route("/v1/chat/completions", Relay(session, upstream + "/v1/chat/completions"))
    return app
