"""usage_meter: tokens per client per day in SQLite, and ``GET /v1/usage`` for admins.

Usage is added up in memory when requests complete and written to SQLite in batches
(at most every ``flush_seconds``, before every query, and in ``shutdown`` when a
reload retires the plugin or the worker exits, so nothing buffered is lost), so no
request waits on a disk write. Each gunicorn worker writes its own batches into the same file; SQLite's
locking keeps the sums right.

``GET /v1/usage`` (admin key) answers ``{"object": "list", "data": [{"client", "day",
"requests", "prompt_tokens", "completion_tokens", "total_tokens"}]}``; ``?client=`` and
``?day=YYYY-MM-DD`` filter it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

from gateway import PermissionDeniedError, Response, hookimpl

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


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.database = config["database"]
        self.route = config["route"]
        self.flush_seconds = config["flush_seconds"]
        with sqlite3.connect(self.database) as db:
            db.execute(SCHEMA)
        self.pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.flushed_at = time.monotonic()
        self.lock = threading.Lock()

    def flush(self) -> None:
        with self.lock:
            rows = [(client, day, *counts) for (client, day), counts in self.pending.items()]
            self.pending.clear()
            self.flushed_at = time.monotonic()
        if rows:
            with sqlite3.connect(self.database, timeout=10) as db:
                db.executemany(UPSERT, rows)

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
            if ctx.query.get(field):
                query += f" AND {field} = ?"
                args.append(ctx.query[field])
        with sqlite3.connect(self.database, timeout=10) as db:
            rows = db.execute(query + " ORDER BY day, client", args).fetchall()
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
            counts[1] += int(ctx.usage.get("prompt_tokens") or 0)
            counts[2] += int(ctx.usage.get("completion_tokens") or 0)
            due = time.monotonic() - self.flushed_at >= self.flush_seconds
        if due:
            self.flush()
