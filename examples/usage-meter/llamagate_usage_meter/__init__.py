"""usage_meter: tokens per client per day in SQLite, and ``GET /v1/usage`` for admins.

Usage is added up in memory when requests complete and written to SQLite in batches
(at most every ``flush_seconds``, before every query, and in ``shutdown`` when a
reload retires the plugin or the worker exits, so nothing buffered is lost), so no
request waits on a disk write. Each gunicorn worker writes its own batches into the same file; SQLite's
locking keeps the sums right.

``GET /v1/usage`` (admin key) answers ``{"object": "list", "data": [{"client", "day",
"requests", "prompt_tokens", "completion_tokens", "total_tokens"}]}``; ``?client=`` and
``?day=YYYY-MM-DD`` filter it.

SQLite's calls block the thread that makes them (a locked database for up to 10 s), so
under gunicorn's gevent worker they run in gevent's thread pool, and the worker's other
requests go on meanwhile. The database file is made private (0600). Token counts that
are not numbers >= 0 (a broken backend's usage) count as 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable

from gateway.plugin import InvalidRequestError, PermissionDeniedError, Response, hookimpl

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    client TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (client, day))
"""
UPSERT = """
INSERT INTO usage VALUES (?, ?, ?, ?, ?)
ON CONFLICT (client, day) DO UPDATE SET requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


def off_hub(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` (blocking SQLite work) without stalling the gevent hub: in gevent's
    thread pool when the process is monkey-patched (gunicorn's gevent worker), else
    directly."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent comes with the gateway
        return fn(*args)
    if monkey.is_module_patched("socket"):
        return get_hub().threadpool.apply(fn, args)
    return fn(*args)


def tokens(value: Any) -> int:
    """A token count from the backend's usage: a number >= 0, else 0."""
    if type(value) is float and math.isfinite(value):
        value = int(value)
    return value if type(value) is int and value >= 0 else 0


def run_sql(database: str, sql: str, args: Any = (), many: bool = False) -> list[Any]:
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db, db:
        cursor = db.executemany(sql, args) if many else db.execute(sql, args)
        return cursor.fetchall()


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.database = config["database"]
        self.route = config["route"]
        self.flush_seconds = config["flush_seconds"]
        if not os.path.exists(self.database):  # per-client usage is nobody else's business
            os.close(os.open(self.database, os.O_WRONLY | os.O_CREAT, 0o600))
        run_sql(self.database, SCHEMA)
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flushed_at = time.monotonic()
        self.lock = threading.Lock()

    def flush(self) -> None:
        with self.lock:
            rows = [(client, day, *counts) for (client, day), counts in self.pending.items()]
            self.pending.clear()
            self.flushed_at = time.monotonic()
        if rows:
            off_hub(run_sql, self.database, UPSERT, rows, True)

    @hookimpl
    def shutdown(self):
        self.flush()

    @hookimpl
    def request(self, ctx):
        if ctx.route != self.route:
            return None
        if ctx.principal is None or ctx.principal.role != "admin":
            raise PermissionDeniedError("Usage is for admin keys.", code="admin_required")
        self.flush()
        query, args = "SELECT client, day, requests, prompt_tokens, completion_tokens FROM usage WHERE 1=1", []
        for field in ("client", "day"):
            value = ctx.query.get(field)
            if isinstance(value, list):
                raise InvalidRequestError(f"Give one {field}.", param=field)
            if value:
                query += f" AND {field} = ?"
                args.append(value)
        rows = off_hub(run_sql, self.database, query + " ORDER BY day, client", args)
        return Response(body={"object": "list", "data": [
            {"client": client, "day": day, "requests": requests, "prompt_tokens": prompt,
             "completion_tokens": completion, "total_tokens": prompt + completion}
            for client, day, requests, prompt, completion in rows]})

    @hookimpl
    def complete(self, ctx, outcome):
        if ctx.route == self.route or ctx.principal is None or not ctx.usage:
            return
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        with self.lock:
            counts = self.pending[(ctx.principal.client_id, day)]
            counts[0] += 1
            counts[1] += tokens(ctx.usage.get("prompt_tokens"))
            counts[2] += tokens(ctx.usage.get("completion_tokens"))
            due = time.monotonic() - self.flushed_at >= self.flush_seconds
        if due:
            self.flush()
