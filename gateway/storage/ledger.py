"""The usage ledger in PostgreSQL: the table, batched inserts, and the usage reports
that ``GET /v1/usage``, ``GET /admin/usage`` and ``llamagate usage`` answer.

One row per request (the ``ledger`` plugin writes them). Each row carries a random
``row_id`` made when the request completed, so a batch sent again after a timeout
whose commit did go through adds nothing (``ON CONFLICT DO NOTHING``); the client's
``x-request-id`` is recorded but is not the key (a client could repeat one to hide
requests).
"""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from . import pg

COMPONENT = "ledger"
# Append only: a shipped migration is never edited (gateway.storage.pg.migrate).
MIGRATIONS = (
    """
    CREATE TABLE llamagate_requests (
        row_id uuid PRIMARY KEY,
        at timestamptz NOT NULL,
        request_id text NOT NULL,
        client text,
        key_id text,
        model text,
        route text NOT NULL,
        status integer NOT NULL,
        outcome text NOT NULL,
        error text,
        prompt_tokens integer,
        completion_tokens integer,
        total_tokens integer,
        latency_ms real NOT NULL,
        ttfb_ms real,
        queue_ms real,
        bytes_in bigint NOT NULL,
        bytes_out bigint NOT NULL,
        cache_hit boolean NOT NULL,
        backend text,
        replica text,
        pipeline text NOT NULL);
    CREATE INDEX llamagate_requests_at ON llamagate_requests (at);
    CREATE INDEX llamagate_requests_client_at ON llamagate_requests (client, at);
    """,
)
COLUMNS = (
    ("row_id", "uuid"), ("at", "timestamptz"), ("request_id", "text"), ("client", "text"), ("key_id", "text"),
    ("model", "text"), ("route", "text"), ("status", "integer"), ("outcome", "text"), ("error", "text"),
    ("prompt_tokens", "integer"), ("completion_tokens", "integer"), ("total_tokens", "integer"),
    ("latency_ms", "real"), ("ttfb_ms", "real"), ("queue_ms", "real"), ("bytes_in", "bigint"),
    ("bytes_out", "bigint"), ("cache_hit", "boolean"), ("backend", "text"), ("replica", "text"),
    ("pipeline", "text"),
)
_NAMES = ", ".join(name for name, _ in COLUMNS)
_INSERT = (f"INSERT INTO llamagate_requests ({_NAMES}) SELECT {_NAMES} FROM jsonb_to_recordset(CAST(:rows AS jsonb)) "
           f"AS r({', '.join(f'{name} {kind}' for name, kind in COLUMNS)}) ON CONFLICT (row_id) DO NOTHING")
MAX_DAYS = 366  # the longest range a usage query may cover


def prepare(conn: Any) -> int:
    """Create or migrate the ledger table (idempotent); returns the schema version."""
    return pg.migrate(conn, COMPONENT, MIGRATIONS)


def new_row_id() -> str:
    return str(uuid.uuid4())


def insert(conn: Any, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows (dicts of :data:`COLUMNS`, ``at`` an ISO timestamp) in one statement."""
    conn.run(_INSERT, rows=json.dumps(list(rows)))


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def day_range(start: str | None, end: str | None, today: date, default_days: int = 30) -> tuple[date, date]:
    """``from``/``to`` (YYYY-MM-DD, both included, UTC days) checked; by default the
    last ``default_days`` days to today.

    Raises:
        ValueError: a malformed day, ``to`` before ``from``, or more than MAX_DAYS days.
    """
    def parse(value: str | None, name: str) -> date | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _DAY.fullmatch(value):
            raise ValueError(f"{name} must be a day, YYYY-MM-DD")
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{name} must be a day, YYYY-MM-DD") from None

    last = parse(end, "to") or today
    first = parse(start, "from") or last - timedelta(days=default_days - 1)
    if last < first:
        raise ValueError("to is before from")
    if (last - first).days >= MAX_DAYS:
        raise ValueError(f"a range covers at most {MAX_DAYS} days")
    return first, last


def _bounds(first: date, last: date) -> dict[str, str]:
    start = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
    return {"start": start.isoformat(), "end": (start + timedelta(days=(last - first).days + 1)).isoformat()}


def usage(conn: Any, first: date, last: date, client: str | None = None, by_model: bool = True,
          by_key: bool = False, by_client: bool = True) -> list[dict[str, Any]]:
    """Requests and tokens per UTC day and client (and model, and key id: ``by_model``,
    ``by_key``; without ``by_client`` across clients) within ``first``..``last`` (both
    included), for one client or all; the oldest day first."""
    groups = [name for name, wanted in (("client", by_client), ("key_id", by_key), ("model", by_model)) if wanted]
    selected = "".join(f", {name}" for name in groups)
    rows = conn.run(
        f"SELECT to_char(date_trunc('day', at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') AS day{selected}, "
        f"count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
        f"coalesce(sum(total_tokens), 0) FROM llamagate_requests "
        f"WHERE at >= CAST(:start AS timestamptz) AND at < CAST(:end AS timestamptz) "
        f"AND client IS NOT NULL AND (CAST(:client AS text) IS NULL OR client = :client) "
        f"GROUP BY {', '.join(str(i) for i in range(1, len(groups) + 2))} "
        f"ORDER BY {', '.join(str(i) for i in range(1, len(groups) + 2))}", client=client, **_bounds(first, last))
    result = []
    for values in rows:
        entry = dict(zip(["day", *groups], values))
        requests, prompt, completion, total = values[len(groups) + 1:]
        entry.update(requests=requests, prompt_tokens=int(prompt), completion_tokens=int(completion),
                     total_tokens=int(total))
        result.append(entry)
    return result


USAGE_CSV_COLUMNS = ("day", "client", "key_id", "model", "requests", "prompt_tokens", "completion_tokens",
                     "total_tokens")


def csv_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: one starting with ``= + - @`` (or a tab
    or carriage return) would be read as a formula, so it gets a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def usage_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """Rows of :func:`usage` (by client, key id and model) as CSV, a header line first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(USAGE_CSV_COLUMNS)
    for row in rows:
        writer.writerow([csv_cell(row.get(name)) for name in USAGE_CSV_COLUMNS])
    return out.getvalue()


def top_clients(conn: Any, day: date, limit: int = 10) -> list[dict[str, Any]]:
    """The clients that used the most tokens on ``day`` (UTC)."""
    rows = conn.run(
        "SELECT client, count(*), coalesce(sum(total_tokens), 0) FROM llamagate_requests "
        "WHERE at >= CAST(:start AS timestamptz) AND at < CAST(:end AS timestamptz) AND client IS NOT NULL "
        "GROUP BY client ORDER BY 3 DESC, 2 DESC, client LIMIT :limit", limit=limit, **_bounds(day, day))
    return [{"client": client, "requests": requests, "total_tokens": int(total)} for client, requests, total in rows]
