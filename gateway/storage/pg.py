"""PostgreSQL for plugins and tools: connections from a URL, and versioned migrations.

The driver is pg8000, pure Python: its socket is a plain ``socket.socket``, which
gevent's monkey patching (gunicorn's gevent worker) makes cooperative, so a slow
query waits like any network read and the worker's other requests go on. (psycopg 3
waits in C, and has no gevent wait callback.) One connection is not safe for two
greenlets at once: each user here keeps its own, or holds a lock around it.

URLs are libpq's: ``postgresql://user:password@host:port/database``; a host that is
a folder (``?host=/run/postgresql`` or a ``%2F``-encoded host) means the Unix socket
in it; ``?sslmode=require`` (or ``verify-full``) uses TLS with the system's CAs.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import pg8000.native

# What "the database did not answer" looks like: the caller keeps its state and retries.
ERRORS: tuple[type[BaseException], ...] = (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError)
# After these the connection is unusable (the network, not the SQL).
NETWORK_ERRORS: tuple[type[BaseException], ...] = (pg8000.native.InterfaceError, OSError)


@dataclass(frozen=True)
class Target:
    """Where a URL points, checked."""

    user: str
    password: str | None
    host: str
    port: int
    database: str
    unix_socket: str | None
    tls: bool


def parse_url(url: str) -> Target:
    """Raises ValueError for anything but a ``postgresql://`` (or ``postgres://``) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("a database URL starts with postgresql://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        port = parts.port or int(query.get("port", 5432))
    except ValueError:
        raise ValueError("the database URL's port is not a number") from None
    host = unquote(parts.hostname or "") or query.get("host", "") or "localhost"
    if "host" in query:
        host = query["host"]
    sslmode = query.get("sslmode", "disable")
    if sslmode not in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"):
        raise ValueError(f"sslmode {sslmode!r} is not one of libpq's")
    return Target(user=unquote(parts.username or "") or query.get("user", "postgres"),
                  password=unquote(parts.password) if parts.password is not None else query.get("password"),
                  host=host, port=port, database=unquote(parts.path.lstrip("/")) or query.get("dbname", "postgres"),
                  unix_socket=f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None,
                  tls=sslmode in ("require", "verify-ca", "verify-full"))


def connect(url: str, timeout: float = 5.0, application_name: str = "llamagate") -> pg8000.native.Connection:
    """A new connection; every socket operation gives up after ``timeout`` seconds.

    Raises:
        ValueError: a malformed URL. One of :data:`ERRORS` when the database is not there.
    """
    target = parse_url(url)
    context = None
    if target.tls:
        context = ssl.create_default_context()
    return pg8000.native.Connection(
        target.user, host=target.host, port=target.port, database=target.database, password=target.password,
        unix_sock=target.unix_socket, ssl_context=context, timeout=timeout, application_name=application_name)


def close_quietly(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection cannot be closed politely
            pass


_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS llamagate_migrations (
    component text NOT NULL,
    version integer NOT NULL,
    applied timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version))
"""


def migrate(conn: pg8000.native.Connection, component: str, migrations: Sequence[str]) -> int:
    """Bring ``component``'s tables to the last of ``migrations`` (SQL scripts, version
    1, 2, ... in order; never edit one that shipped: append). Each runs in its own
    transaction with its version row, under an advisory lock, so workers and hosts
    starting at once apply each exactly once. Returns the version now in force.

    Raises:
        RuntimeError: the database is at a version newer than this code knows.
    """
    conn.run("BEGIN")
    try:
        # The lock first: two first starts at once would race on CREATE TABLE itself.
        conn.run("SELECT pg_advisory_xact_lock(hashtext('llamagate_migrations'))")
        conn.run(_MIGRATIONS_TABLE)
        rows = conn.run("SELECT coalesce(max(version), 0) FROM llamagate_migrations WHERE component = :c",
                        c=component)
        current = rows[0][0]
        if current > len(migrations):
            raise RuntimeError(f"the database's {component} schema is at version {current}, newer than this "
                               f"gateway's {len(migrations)}: upgrade the gateway")
        for version, script in enumerate(migrations, start=1):
            if version <= current:
                continue
            for statement in split_sql(script):
                conn.run(statement)
            conn.run("INSERT INTO llamagate_migrations (component, version) VALUES (:c, :v)", c=component, v=version)
            current = version
        conn.run("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return current


def rollback_quietly(conn: Any) -> None:
    try:
        conn.run("ROLLBACK")
    except Exception:  # noqa: BLE001 - the connection may be gone; the server rolls back then
        pass


def split_sql(script: str) -> list[str]:
    """The statements of a script, split at ``;`` at the end of a line (enough for the
    migrations here: no function body holds one)."""
    statements, current = [], []
    for line in script.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";"))
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return [s for s in statements if s]


class Connection:
    """One lazily (re)opened connection, shared by the greenlets of a process under a
    lock: a network failure closes it, and the next use reconnects.

    Args:
        url: The database URL.
        timeout: Seconds for connecting and for each socket operation.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parse_url(url)  # a malformed URL fails now, where the config is checked
        self.url = url
        self.timeout = timeout
        self._conn: pg8000.native.Connection | None = None
        self._lock = threading.Lock()  # a gevent lock once the worker is patched

    @contextlib.contextmanager
    def session(self) -> Iterator[pg8000.native.Connection]:
        """The connection, for this greenlet alone until the block ends."""
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.url, self.timeout)
            try:
                yield self._conn
            except NETWORK_ERRORS:
                close_quietly(self._conn)
                self._conn = None
                raise

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        with self.session() as conn:
            return conn.run(sql, **params)

    def close(self) -> None:
        with self._lock:
            close_quietly(self._conn)
            self._conn = None
