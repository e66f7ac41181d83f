"""The operator console at ``/admin/`` (docs/console.md): its page and assets, and the
JSON its core pages read under ``/admin/api/``.

The page and its assets hold no data and need no key (a ``<script src>`` cannot send one);
every figure comes from ``/admin/api/...`` with ``Authorization: Bearer <admin key>``, the
key kept in the tab's ``sessionStorage`` (never a URL, never a cookie: nothing another
origin can make the browser send). The assets are read once from ``static/console/`` and
served by name from that fixed table: no path reaches the file system. Every answer of the
console carries a strict Content-Security-Policy (scripts and styles from this origin
only, no inline script, no framing).

Pages whose data a plugin holds (keys, usage) read the plugin routes their plugins answer
under ``/admin/api/`` (declared under ``routes:``), not this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import falcon

from ..context import RequestContext
from ..errors import NotFoundError
from ..storage.shared import SharedUnavailable
from .resources import serve_admin
from .state import Gateway
from .stats import HOUR_MINUTES

ASSETS_DIR = Path(__file__).resolve().parent / "static" / "console"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _read_assets() -> dict[str, tuple[bytes, str]]:
    return {path.relative_to(ASSETS_DIR).as_posix(): (path.read_bytes(), CONTENT_TYPES[path.suffix])
            for path in sorted(ASSETS_DIR.rglob("*")) if path.is_file() and path.suffix in CONTENT_TYPES}


ASSETS = _read_assets()


def _send(resp: falcon.Response, asset: tuple[bytes, str]) -> None:
    resp.data, resp.content_type = asset
    resp.set_header("Content-Security-Policy", CSP)
    resp.set_header("Cache-Control", "no-cache")


class ConsolePageResource:
    """``GET /admin/`` (and ``/admin``): the console's one HTML page."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(resp, ASSETS["index.html"])


class ConsoleAssetResource:
    """``GET /admin/assets/{name}``: the console's scripts and styles, by name."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        asset = ASSETS.get(name)
        if asset is None or name == "index.html":
            raise falcon.HTTPNotFound()
        _send(resp, asset)


class ConsoleApiResource:
    """The core pages' JSON (admin keys only; any other key gets 403). With ``shared:``
    every figure is the whole gateway's (every worker of every host); without, or while
    Redis is unreachable, this worker's (``scope`` says which):

    * ``GET /admin/api/overview``: the last hour per minute (requests, errors, tokens,
      first byte and queue wait), per backend its slots busy and queued;
    * ``GET /admin/api/live``: the requests in flight, each worker's oldest
      (:data:`gateway.web.state.LIVE_LISTED`), from the workers' snapshots;
    * ``GET /admin/api/errors``: the latest errors with their request ids;
    * ``POST /admin/api/requests/{request_id}/cancel``: cancel a request wherever it runs.
    """

    def __init__(self, gateway: Gateway, pipeline_name: str) -> None:
        self.gateway = gateway
        self.pipeline_name = pipeline_name

    def _serve(self, req: falcon.Request, resp: falcon.Response, route: str, act: Callable[[], dict[str, Any]]) -> None:
        serve_admin(self.gateway, self.pipeline_name, req, resp, route, True, lambda ctx: act())

    def on_get_overview(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp, "/admin/api/overview", self.overview)

    def on_get_live(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp, "/admin/api/live", self.live)

    def on_get_errors(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp, "/admin/api/errors", self.errors)

    def on_post_cancel(self, req: falcon.Request, resp: falcon.Response, request_id: str) -> None:
        def cancel(ctx: RequestContext) -> dict[str, Any]:
            if not self.gateway.cancel_anywhere(request_id, ctx.principal):
                raise NotFoundError(f"No request {request_id!r} is in flight.", code="request_not_found")
            return {"id": request_id, "object": "request.cancelled", "cancelled": True}

        serve_admin(self.gateway, self.pipeline_name, req, resp, "/admin/api/requests/{request_id}/cancel", True,
                    cancel)

    def _scope(self, shared: str) -> str:
        return "gateway" if shared == "ok" else "worker"

    def _traffic(self, first: int, last: int) -> tuple[dict[int, dict[str, int]], str]:
        shared = self.gateway.shared
        if shared is not None:
            try:
                return shared.traffic(first, last), "ok"
            except SharedUnavailable:
                pass
        return self.gateway.traffic.counts(), "off" if shared is None else "unreachable"

    def overview(self) -> dict[str, Any]:
        last = int(time.time() // 60)
        first = last - HOUR_MINUTES + 1
        counts, shared = self._traffic(first, last)

        def mean(total: int, count: int) -> float | None:
            return round(total / count, 1) if count else None

        minutes = []
        for minute in range(first, last + 1):
            c = counts.get(minute, {})
            minutes.append({"at": minute * 60, "requests": c.get("requests", 0), "errors": c.get("errors", 0),
                            "prompt_tokens": c.get("prompt_tokens", 0),
                            "completion_tokens": c.get("completion_tokens", 0),
                            "first_byte_ms": mean(c.get("first_byte_ms", 0), c.get("first_byte_count", 0)),
                            "queue_ms": mean(c.get("queue_ms", 0), c.get("queue_count", 0))})
        hour = {field: sum(m[field] for m in minutes)
                for field in ("requests", "errors", "prompt_tokens", "completion_tokens")}
        status = self.gateway.status()
        totals = status["totals"]
        backends = {name: {"limit": detail["limit"], "admission": detail["admission"], "ready": detail["ready"],
                           "slots": sum(r["slots"] or 0 for r in detail["replicas"]),
                           "busy": totals["backends"][name]["in_flight"], "queued": totals["backends"][name]["queued"]}
                    for name, detail in status["backends"].items()}
        return {"object": "console.overview", "scope": self._scope(shared), "shared": shared,
                "workers": totals["workers"], "hosts": totals["hosts"], "in_flight": totals["in_flight"],
                "hour": hour, "minutes": minutes, "backends": backends}

    def live(self) -> dict[str, Any]:
        workers, shared = self.gateway.workers()
        requests = [dict(r, worker=w["worker"], host=w["host"]) for w in workers for r in w.get("live", [])]
        requests.sort(key=lambda r: -r["age_s"])
        return {"object": "list", "scope": self._scope(shared), "shared": shared, "workers": len(workers),
                "answered_by": self.gateway.worker, "in_flight": sum(w["in_flight"] for w in workers),
                "data": requests}

    def errors(self) -> dict[str, Any]:
        shared, state = self.gateway.shared, "off"
        latest = None
        if shared is not None:
            try:
                latest, state = shared.recent_errors(), "ok"
            except SharedUnavailable:
                state = "unreachable"
        if latest is None:
            latest = [dict(e, worker=self.gateway.worker) for e in reversed(self.gateway.traffic.errors)]
        now = time.time()
        return {"object": "list", "scope": self._scope(state), "shared": state,
                "data": [dict(e, age_s=round(max(0.0, now - e["at"]), 1)) for e in latest]}
