"""API keys in PostgreSQL: the table, the ``llamagate keys --db`` operations, and the
mirror the ``auth`` plugin serves from.

Only SHA-256 hashes are stored, as in keys files (:mod:`gateway.storage.keys`). A key's row
holds its client, role, allowed models, limits (the rate limits of ``ratelimit`` and
the quotas of ``quota``), admission priority, when it was created, when it expires
and when it was revoked (a revoked key's row stays, for the ledger's sake).

Every change to the table bumps a one-row version counter (a trigger, so a change
made with plain SQL counts too). Each gateway worker keeps the live keys in memory
and polls that counter in the background (``poll_interval``, 0.5 s by default): a
revoke reaches every worker of every host within about that, without a reload, and
no request waits on the database. When the database is unreachable the workers keep
the last keys they read (logged once per outage, counted as
``auth.keys_db_stale`` on each request meanwhile).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from . import pg
from ..context import MAX_PRIORITY, Principal
from ..errors import LlamagateError
from .keys import MIN_REVOKE_PREFIX, ROLES, check_client_id, check_limits, key_hash, new_key

log = logging.getLogger("llamagate")

# Append only: a shipped migration is never edited (gateway.storage.pg.migrate).
MIGRATIONS = (
    """
    CREATE TABLE llamagate_keys (
        id bigserial PRIMARY KEY,
        sha256 text NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
        client text NOT NULL CHECK (client <> ''),
        role text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
        models text[] NOT NULL DEFAULT '{}',
        limits jsonb NOT NULL DEFAULT '{}',
        priority integer,
        created timestamptz NOT NULL DEFAULT now(),
        expires timestamptz,
        revoked timestamptz);
    CREATE INDEX llamagate_keys_client ON llamagate_keys (client);
    CREATE TABLE llamagate_keys_version (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        version bigint NOT NULL);
    INSERT INTO llamagate_keys_version VALUES (true, 0);
    CREATE FUNCTION llamagate_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE llamagate_keys_version SET version = version + 1; RETURN NULL; END $$;
    CREATE TRIGGER llamagate_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llamagate_keys
        FOR EACH STATEMENT EXECUTE FUNCTION llamagate_keys_changed();
    """,
)
COMPONENT = "keys"
KEY_ID_CHARS = 12  # a key's public id: the first hex digits of its hash


class NoSuchKey(LlamagateError, ValueError):
    """No live key matches (rotate, update_key)."""


def key_id(digest: str) -> str:
    return digest[:KEY_ID_CHARS]


def prepare(conn: Any) -> int:
    """Create or migrate the keys table (idempotent); returns the schema version."""
    return pg.migrate(conn, COMPONENT, MIGRATIONS)


@dataclass(frozen=True)
class KeyRow:
    """One key as the table holds it (the hash, never the key)."""

    key_id: str
    client: str
    role: str
    models: tuple[str, ...]
    limits: dict[str, int]
    priority: int | None
    created: datetime
    expires: datetime | None
    revoked: datetime | None


_COLUMNS = "sha256, client, role, models, limits, priority, created, expires, revoked"


def _row(values: list[Any]) -> KeyRow:
    digest, client, role, models, limits, priority, created, expires, revoked = values
    return KeyRow(key_id(digest), client, role, tuple(models or ()), dict(limits or {}), priority, created, expires,
                  revoked)


def check_key(client: str, role: str, models: list[str] | None, limits: dict[str, int] | None,
              priority: int | None) -> None:
    """Raises ValueError for a bad client, role, model list, limit or priority."""
    if not isinstance(client, str) or not client.strip():
        raise ValueError("client must be a non-empty string")
    if role not in ROLES:
        raise ValueError(f"role must be user or admin, not {role!r}")
    if models is not None and not all(isinstance(m, str) and m for m in models):
        raise ValueError("models must be model ids")
    check_limits(limits, "the new key")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= MAX_PRIORITY):
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY} (higher goes first)")


def add_key(conn: Any, client: str, role: str = "user", models: list[str] | None = None,
            limits: dict[str, int] | None = None, priority: int | None = None,
            expires: datetime | None = None) -> tuple[str, KeyRow]:
    """Store a new key's hash; returns the key (shown once, never stored) and its row.

    Raises:
        ValueError: a bad field (nothing is written).
    """
    check_key(client, role, models, limits, priority)
    client = check_client_id(client)
    key = new_key()
    rows = conn.run(f"INSERT INTO llamagate_keys (sha256, client, role, models, limits, priority, expires) "
                    f"VALUES (:sha, :client, :role, CAST(:models AS text[]), CAST(:limits AS jsonb), :priority, "
                    f"CAST(:expires AS timestamptz)) RETURNING {_COLUMNS}",
                    sha=key_hash(key), client=client, role=role, models=list(models or []),
                    limits=json.dumps(limits or {}), priority=priority,
                    expires=expires.isoformat() if expires is not None else None)
    return key, _row(rows[0])


def list_keys(conn: Any, client: str | None = None, include_revoked: bool = False) -> list[KeyRow]:
    where = ["(:client::text IS NULL OR client = :client)"]
    if not include_revoked:
        where.append("revoked IS NULL")
    rows = conn.run(f"SELECT {_COLUMNS} FROM llamagate_keys WHERE {' AND '.join(where)} ORDER BY client, created",
                    client=client)
    return [_row(r) for r in rows]


def _matching(conn: Any, who: str, key_id_only: bool = False) -> list[list[Any]]:
    """The live keys of client ``who``, else the live key whose id starts with ``who``
    (with ``key_id_only``, only the latter: a client named like a key id is not taken
    for it)."""
    who = who.strip()
    if not who:
        raise ValueError("name a client or a key id")
    if not key_id_only:
        rows = conn.run(f"SELECT {_COLUMNS} FROM llamagate_keys WHERE revoked IS NULL AND client = :who FOR UPDATE",
                        who=who)
        if rows:
            return rows
    prefix = who.lower()
    if len(prefix) < MIN_REVOKE_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
        if key_id_only:
            raise ValueError(f"a key id is at least {MIN_REVOKE_PREFIX} hex digits")
        return []
    rows = conn.run(f"SELECT {_COLUMNS} FROM llamagate_keys WHERE revoked IS NULL AND sha256 LIKE :p FOR UPDATE",
                    p=prefix + "%")
    if len(rows) > 1:
        raise ValueError(f"{len(rows)} keys have an id starting with {who}; give more digits")
    return rows


def revoke(conn: Any, who: str, key_id_only: bool = False) -> int:
    """Revoke the live keys of client ``who``, or the one whose key id starts with
    ``who`` (at least 8 hex digits; with ``key_id_only`` only that); returns how many.

    Raises:
        ValueError: ``who`` is empty or an ambiguous key id (nothing is revoked).
    """
    conn.run("BEGIN")
    try:
        rows = _matching(conn, who, key_id_only)
        for row in rows:
            conn.run("UPDATE llamagate_keys SET revoked = now() WHERE sha256 = :sha", sha=row[0])
        conn.run("COMMIT")
    except BaseException:
        pg.rollback_quietly(conn)
        raise
    return len(rows)


def rotate(conn: Any, who: str, grace: float = 0.0, key_id_only: bool = False) -> tuple[str, KeyRow]:
    """A new key with the same client, role, models, limits, priority and expiry as the
    one live key of ``who`` (a client or a key id; with ``key_id_only`` a key id); the
    old one is revoked, or expires after ``grace`` seconds (time to deploy the new one).
    Returns the new key and row.

    Raises:
        NoSuchKey: no live key matches.
        ValueError: several do (name one by its key id).
    """
    conn.run("BEGIN")
    try:
        rows = _matching(conn, who, key_id_only)
        if len(rows) > 1:
            raise ValueError(f"{who!r} has {len(rows)} live keys; name one by its key id")
        if not rows:
            raise NoSuchKey(f"no live key of a client or with a key id {who!r}")
        old = _row(rows[0])
        key = new_key()
        new = conn.run(f"INSERT INTO llamagate_keys (sha256, client, role, models, limits, priority, expires) "
                       f"SELECT :sha, client, role, models, limits, priority, expires FROM llamagate_keys "
                       f"WHERE sha256 = :old RETURNING {_COLUMNS}", sha=key_hash(key), old=rows[0][0])
        if grace > 0:
            until = datetime.now(timezone.utc) + timedelta(seconds=grace)
            if old.expires is None or old.expires > until:
                conn.run("UPDATE llamagate_keys SET expires = CAST(:t AS timestamptz) WHERE sha256 = :old",
                         t=until.isoformat(), old=rows[0][0])
        else:
            conn.run("UPDATE llamagate_keys SET revoked = now() WHERE sha256 = :old", old=rows[0][0])
        conn.run("COMMIT")
    except BaseException:
        pg.rollback_quietly(conn)
        raise
    return key, _row(new[0])


_UNSET: Any = object()


def update_key(conn: Any, key_id: str, models: list[str] | None = _UNSET, limits: dict[str, int] | None = _UNSET,
               priority: int | None = _UNSET) -> KeyRow:
    """Replace the models, limits and/or priority (those given; None clears one) of the
    live key whose id starts with ``key_id``; returns its row.

    Raises:
        NoSuchKey: no live key has that id.
        ValueError: an ambiguous or malformed id, or a bad value (nothing is written).
    """
    conn.run("BEGIN")
    try:
        rows = _matching(conn, key_id, key_id_only=True)
        if not rows:
            raise NoSuchKey(f"no live key with an id starting with {key_id}")
        old = _row(rows[0])
        models = list(old.models) if models is _UNSET else list(models or [])
        limits = old.limits if limits is _UNSET else dict(limits or {})
        priority = old.priority if priority is _UNSET else priority
        check_key(old.client, old.role, models, limits, priority)
        new = conn.run(f"UPDATE llamagate_keys SET models = CAST(:models AS text[]), limits = CAST(:limits AS jsonb), "
                       f"priority = :priority WHERE sha256 = :sha RETURNING {_COLUMNS}",
                       models=models, limits=json.dumps(limits), priority=priority, sha=rows[0][0])
        conn.run("COMMIT")
    except BaseException:
        pg.rollback_quietly(conn)
        raise
    return _row(new[0])


def version(conn: Any) -> int:
    return conn.run("SELECT version FROM llamagate_keys_version")[0][0]


def load_keys(conn: Any) -> tuple[int, dict[str, Principal], dict[str, float]]:
    """The version, the live keys' principals by hash, and the expiry (epoch seconds) of
    those that expire; read in one snapshot. Rows that break the rules are skipped
    (logged), never served."""
    conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        current = version(conn)
        rows = conn.run(f"SELECT {_COLUMNS} FROM llamagate_keys WHERE revoked IS NULL "
                        f"AND (expires IS NULL OR expires > now())")
        conn.run("COMMIT")
    except BaseException:
        pg.rollback_quietly(conn)
        raise
    principals: dict[str, Principal] = {}
    expiries: dict[str, float] = {}
    for values in rows:
        row = _row(values)
        try:
            check_key(row.client, row.role, list(row.models), row.limits, row.priority)
        except ValueError as exc:
            log.error("keys_db: key %s is skipped: %s", row.key_id, exc)
            continue
        principals[values[0]] = Principal(client_id=row.client, role=row.role, models=frozenset(row.models),
                                          limits=row.limits, key_id=row.key_id, priority=row.priority or 0)
        if row.expires is not None:
            expiries[values[0]] = row.expires.timestamp()
    return current, principals, expiries


@dataclass(frozen=True)
class Snapshot:
    version: int
    principals: dict[str, Principal]
    expiries: dict[str, float]


# The last keys read from each database, per process: a plugin instance made by a
# reload while the database is down starts from them instead of from nothing.
_last_known: dict[str, Snapshot] = {}


class KeyMirror:
    """The live keys of one database, in memory, refreshed by a background thread (a
    greenlet under gevent) whenever the table's version counter moves.

    Args:
        url: The database URL.
        poll_interval: Seconds between two looks at the version counter.
        timeout: Seconds for each database operation.
    """

    def __init__(self, url: str, poll_interval: float = 0.5, timeout: float = 5.0) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.conn = pg.Connection(url, timeout)
        self.snapshot: Snapshot | None = _last_known.get(url)
        self.stale = False  # the last look failed: serving the last known keys
        self.loaded = threading.Event()
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self, wait: float) -> None:
        """Start refreshing (once), and wait up to ``wait`` seconds for a first read."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="llamagate-keys", daemon=True)
                    self._thread.start()
        self.loaded.wait(wait)

    def _run(self) -> None:
        prepared = False
        while not self.stopped.is_set():
            try:
                if not prepared:
                    with self.conn.session() as conn:
                        prepare(conn)
                    prepared = True
                self.refresh()
                if self.stale:
                    log.warning("keys_db: the database answers again; keys are current")
                self.stale = False
            except (*pg.ERRORS, RuntimeError) as exc:
                if not self.stale:
                    log.error("keys_db: the database is unreachable (%s: %s); serving the last known keys (%s)",
                              type(exc).__name__, exc,
                              len(self.snapshot.principals) if self.snapshot else "none yet")
                self.stale = True
            self.loaded.set()
            self.stopped.wait(self.poll_interval)

    def refresh(self) -> None:
        """Read the keys again when their version moved."""
        if self.snapshot is not None and version(self.conn) == self.snapshot.version:
            return
        with self.conn.session() as conn:
            current, principals, expiries = load_keys(conn)
        self.snapshot = _last_known[self.url] = Snapshot(current, principals, expiries)

    def lookup(self, digest: str, now: float | None = None) -> Principal | None:
        snapshot = self.snapshot
        if snapshot is None:
            return None
        principal = snapshot.principals.get(digest)
        if principal is not None and digest in snapshot.expiries:
            if (time.time() if now is None else now) >= snapshot.expiries[digest]:
                return None
        return principal

    def stop(self) -> None:
        self.stopped.set()
        self.conn.close()

