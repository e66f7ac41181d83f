"""ledger: one row per request in PostgreSQL, and the usage API.

Each completed request becomes a row (:mod:`gateway.storage.ledger` has the table) put in a
bounded buffer; a background thread (a greenlet under gevent) writes the buffer in
batches. No request waits on the database: when it is slow or down the rows wait in
the buffer and go when it is back; only past ``buffer_rows`` are new rows dropped,
counted (``ledger.dropped``) and logged. A worker stopping or reloading flushes its
buffer (the ``shutdown`` hook, for up to ``shutdown_flush_seconds``). The schema is
created or migrated when the writer first connects (versioned, idempotent).

Rows are written for requests with a principal (a key); with
``record_unauthenticated`` also for the others (a flood of bad keys then fills the
table, so it is off by default). The tokens are the answer's ``usage``, which the
gateway records for streams left early too.

The usage API answers the plugin routes ``usage_route`` (the caller's own usage, per
day and model) and ``admin_usage_route`` (admins: any client, ``?client=``, and
``?top=N``: the top clients of the last day): declare them under ``routes:`` with
this pipeline. Both take ``?from=`` and ``?to=`` (UTC days, YYYY-MM-DD, both
included; default the last 30 days). The operator console's usage page reads
``console_usage_route`` (admins: ``?days=N&by=key|model``, tokens per day per key or
per model) and its CSV twin ``<console_usage_route>.csv`` (per day, client, key and
model). Rows appear there within about
``flush_interval``, also once a database that was down is back (a failed write is
retried sooner, never later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.plugin import (
    PG_ERRORS,
    InvalidRequestError,
    MethodNotAllowedError,
    PermissionDeniedError,
    PgConnection,
    Response,
    ServiceUnavailableError,
    day_range,
    hookimpl,
    insert_ledger_rows,
    new_row_id,
    parse_pg_url,
    prepare_ledger,
    top_clients,
    usage_csv,
    usage_report,
)

log = logging.getLogger("llamagate")
MAX_BACKOFF = 5.0  # seconds between two tries while the database is down
MAX_CONSOLE_DAYS = 366


def tokens(usage: Any, name: str) -> int | None:
    value = usage.get(name) if isinstance(usage, dict) else None
    if type(value) is float and value.is_integer():
        value = int(value)
    return value if type(value) is int and 0 <= value < 2**31 else None


def row_of(ctx: Any, outcome: str, now: float) -> dict[str, Any]:
    principal = ctx.principal
    latency = ctx.latency_ms
    queue = ctx.timings.get(f"queue.{ctx.backend}") if ctx.backend else None
    return {
        "row_id": new_row_id(),
        "at": datetime.fromtimestamp(now - latency / 1000.0, timezone.utc).isoformat(),
        "request_id": ctx.request_id,
        "client": principal.client_id if principal else None,
        "key_id": principal.key_id if principal else None,
        "model": ctx.model,
        "route": ctx.route,
        "status": ctx.status or 0,
        "outcome": outcome,
        "error": (ctx.error.code or ctx.error.type) if ctx.error is not None else None,
        "prompt_tokens": tokens(ctx.usage, "prompt_tokens"),
        "completion_tokens": tokens(ctx.usage, "completion_tokens"),
        "total_tokens": tokens(ctx.usage, "total_tokens"),
        "latency_ms": round(latency, 3),
        "ttfb_ms": round(ctx.ttfb_ms, 3) if ctx.ttfb_ms is not None else None,
        "queue_ms": round(queue, 3) if queue is not None else None,
        "bytes_in": ctx.bytes_in,
        "bytes_out": ctx.bytes_out,
        "cache_hit": ctx.cache == "HIT",
        "backend": ctx.backend,
        "replica": ctx.replica,
        "pipeline": ctx.pipeline,
    }


class Writer:
    """The bounded buffer and the thread that empties it into the database."""

    def __init__(self, url: str, buffer_rows: int, batch_rows: int, flush_interval: float, timeout: float) -> None:
        self.conn = PgConnection(url, timeout)
        self.buffer: deque[dict[str, Any]] = deque()
        self.buffer_rows = buffer_rows
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.dropped = 0
        self.down = False
        self.prepared = False
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # one writer at a time: the thread, or shutdown's flush

    def add(self, row: dict[str, Any]) -> bool:
        """Buffer a row; False when the buffer is full and it was dropped."""
        if self.thread is None:  # not in __init__: `llamagate check` builds plugins too
            self.thread = threading.Thread(target=self._run, name="llamagate-ledger", daemon=True)
            self.thread.start()
        if len(self.buffer) >= self.buffer_rows:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("ledger: the buffer is full (%d rows, the database is slow or down): %d rows dropped so far",
                          self.buffer_rows, self.dropped)
            return False
        self.buffer.append(row)
        if len(self.buffer) >= self.batch_rows:
            self.wake.set()
        return True

    def _run(self) -> None:
        backoff = 0.0
        while not self.stopped.is_set():
            self.wake.wait(backoff or self.flush_interval)
            self.wake.clear()
            if self.stopped.is_set():
                return
            # Retries back off, but never wait longer than flush_interval: rows reach the
            # usage API within about flush_interval of the database's return.
            backoff = 0.0 if self.flush() else min(MAX_BACKOFF, self.flush_interval, max(0.25, backoff * 2))

    def flush(self) -> bool:
        """Write what is buffered, a batch at a time; False when the database failed
        (the rows stay buffered)."""
        with self.lock:
            while self.buffer:
                batch = [self.buffer[i] for i in range(min(self.batch_rows, len(self.buffer)))]
                try:
                    with self.conn.session() as conn:
                        if not self.prepared:
                            prepare_ledger(conn)
                            self.prepared = True
                        insert_ledger_rows(conn, batch)
                except (*PG_ERRORS, RuntimeError) as exc:
                    if not self.down:
                        log.error("ledger: cannot write to the database (%s: %s); %d rows wait in the buffer",
                                  type(exc).__name__, exc, len(self.buffer))
                    self.down = True
                    return False
                for _ in batch:
                    self.buffer.popleft()
                if self.down:
                    log.warning("ledger: the database answers again; buffered rows are being written")
                    self.down = False
            return True

    def stop(self, deadline: float) -> None:
        """Stop the thread and write what is left, trying until ``deadline`` (monotonic)."""
        self.stopped.set()
        self.wake.set()
        while self.buffer and not self.flush() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.buffer:
            log.error("ledger: %d rows could not be written before the worker stopped; they are lost",
                      len(self.buffer))
        self.conn.close()


class Plugin:
    """Records every request in PostgreSQL and answers the usage API."""

    def __init__(self, config: dict[str, Any]) -> None:
        try:
            parse_pg_url(config["database"])
        except ValueError as exc:
            raise ValueError(f"database: {exc}") from None
        if config["batch_rows"] > config["buffer_rows"]:
            raise ValueError("batch_rows is larger than buffer_rows")
        self.writer = Writer(config["database"], config["buffer_rows"], config["batch_rows"],
                             config["flush_interval"], config["timeout"])
        self.reports = PgConnection(config["database"], config["timeout"])
        self.record_unauthenticated = config["record_unauthenticated"]
        self.usage_route = config["usage_route"]
        self.admin_usage_route = config["admin_usage_route"]
        console = config["console_usage_route"]
        self.console_routes = {console: False, f"{console}.csv": True} if console else {}
        self.shutdown_flush_seconds = config["shutdown_flush_seconds"]

    @staticmethod
    def one(ctx: Any, name: str) -> str | None:
        value = ctx.query.get(name)
        if isinstance(value, list):
            raise InvalidRequestError(f"Give one {name}.", param=name)
        return value

    def report(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self.reports, *args, **kwargs)
        except (*PG_ERRORS, RuntimeError) as exc:
            log.error("ledger: a usage query failed: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailableError("The usage ledger is unreachable; try again shortly.",
                                          headers={"Retry-After": "5"}) from None

    def answer(self, ctx: Any, admin: bool) -> Response:
        if ctx.method != "GET":
            raise InvalidRequestError("Use GET.", code="method_not_allowed")
        if ctx.principal is None:
            raise PermissionDeniedError("Usage needs an API key (put the auth plugin before ledger).")
        if admin and ctx.principal.role != "admin":
            raise PermissionDeniedError("This endpoint needs an admin key.", code="admin_required")
        today = datetime.now(timezone.utc).date()
        try:
            first, last = day_range(self.one(ctx, "from"), self.one(ctx, "to"), today)
        except ValueError as exc:
            raise InvalidRequestError(f"{exc}.", param="from") from None
        if not admin:
            data = self.report(usage_report, first, last, client=ctx.principal.client_id)
            return Response(body={"object": "list", "client": ctx.principal.client_id,
                                  "from": first.isoformat(), "to": last.isoformat(), "data": data})
        top = self.one(ctx, "top")
        if top is not None:
            if not top.isdigit() or not 1 <= int(top) <= 1000:
                raise InvalidRequestError("top must be a number from 1 to 1000.", param="top")
            data = self.report(top_clients, last, int(top))
            return Response(body={"object": "list", "day": last.isoformat(), "data": data})
        data = self.report(usage_report, first, last, client=self.one(ctx, "client") or None)
        return Response(body={"object": "list", "from": first.isoformat(), "to": last.isoformat(), "data": data})

    def console(self, ctx: Any, csv: bool) -> Response:
        """The console's usage: ``?days=N`` (1 to 366, default 30, to today) ``&by=key|model``
        as JSON, or every day, client, key and model as CSV."""
        if ctx.method != "GET":
            raise MethodNotAllowedError("Use GET.", headers={"Allow": "GET"})
        if ctx.principal is None or ctx.principal.role != "admin":
            raise PermissionDeniedError("This endpoint needs an admin key.", code="admin_required")
        days = self.one(ctx, "days") or "30"
        if not days.isdigit() or not 1 <= int(days) <= MAX_CONSOLE_DAYS:
            raise InvalidRequestError(f"days must be a number from 1 to {MAX_CONSOLE_DAYS}.", param="days")
        last = datetime.now(timezone.utc).date()
        first = last - timedelta(days=int(days) - 1)
        span = {"from": first.isoformat(), "to": last.isoformat()}
        if csv:
            rows = self.report(usage_report, first, last, by_key=True)
            return Response(content=usage_csv(rows).encode(), content_type="text/csv; charset=utf-8",
                            headers={"Cache-Control": "no-store", "Content-Disposition":
                                     f'attachment; filename="usage-{span["from"]}-{span["to"]}.csv"'})
        by = self.one(ctx, "by") or "key"
        if by not in ("key", "model"):
            raise InvalidRequestError("by must be key or model.", param="by")
        rows = self.report(usage_report, first, last, by_key=by == "key", by_model=by == "model",
                           by_client=by == "key")
        return Response(body={"object": "list", **span, "by": by, "data": rows}, headers={"Cache-Control": "no-store"})

    @hookimpl
    def request(self, ctx):
        if ctx.route in self.console_routes:
            return self.console(ctx, self.console_routes[ctx.route])
        if ctx.route == self.usage_route:
            return self.answer(ctx, admin=False)
        if ctx.route == self.admin_usage_route:
            return self.answer(ctx, admin=True)
        return None

    @hookimpl
    def complete(self, ctx, outcome):
        if ctx.principal is None and not self.record_unauthenticated:
            return
        if not self.writer.add(row_of(ctx, outcome, time.time())):
            ctx.incr("ledger.dropped")

    @hookimpl
    def shutdown(self):
        self.writer.stop(time.monotonic() + self.shutdown_flush_seconds)
        self.reports.close()
