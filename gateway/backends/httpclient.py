"""The HTTP/1.1 client of the request path: one keep-alive pool per replica.

Why not ``requests`` here: a bare Falcon + gunicorn + requests pass-through spends
two thirds of its CPU inside requests and urllib3 (preparing, merging settings,
wrapping the response, reading it through three layers); this client sends a
request with one ``sendall`` and reads the answer with as few Python steps per
chunk as HTTP allows. It speaks just what llama-server and the prefix routes'
backends need: ``Content-Length``, chunked and close-delimited bodies, 1xx
interim answers skipped, keep-alive, TLS. No proxies, redirects, cookies or
compression (nothing asks for them). Health checks, plugins' ``call_backend``
and the CLI keep using ``requests``.

A keep-alive connection is reused only while it is in step: a byte past an answer's
end, whether it came with the answer or later while the connection sat idle, closes
it, so a backend that over-sends cannot hand one request's leftovers to the next; and
as such bytes could also come only after the next request went out, the pool then stops
reusing that backend's connections at all (:meth:`Pool.out_of_step`).

Under gunicorn's gevent worker the ``socket`` and ``ssl`` modules are patched, so
every wait here yields to the hub.

The errors, all :class:`HTTPFailure`, are declared in :mod:`gateway.errors` (its
tree shows them under the gateway's one root) and re-exported here::

    HTTPFailure
    ├── ConnectFailed        the connection was never made (``refused`` when refused)
    │   └── ConnectTimedOut
    ├── ReadTimedOut         nothing came for the read timeout
    └── ConnectionBroken     reset, closed early, or not HTTP
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import unquote, urlsplit

from ..errors import (
    ConnectFailed,
    ConnectionBroken,
    ConnectTimedOut,
    HTTPFailure,
    LlamagateError,
    ReadTimedOut,
)

MAX_HEAD_BYTES = 65536  # status line and headers; more is not an answer we read
RECV_BYTES = 65536
_NO_BODY_STATUSES = (204, 304)


class Connection:
    """One socket to the backend, and whether it already carried an answer."""

    __slots__ = ("sock", "reused")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reused = False

    def waiting(self) -> bytes | None:
        """What an idle connection has to read: None when nothing (open and idle, it can
        carry another request); ``b""`` when the backend closed it; else its first byte:
        the backend sent more than its last answer (e.g. a Content-Length counted in
        characters, the rest in a later flush), and the next request would read it as its
        own answer, each later one its predecessor's."""
        raw = getattr(self.sock, "_sock", self.sock)  # gevent's wrapper: ask the real socket, without a switch
        try:
            timeout = raw.gettimeout()
            if timeout:  # not under gevent (whose real sockets never wait): a peek would wait that long
                raw.settimeout(0)
            try:
                return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            finally:
                if timeout:
                    raw.settimeout(timeout)
        except BlockingIOError:
            return None
        except (OSError, ValueError):
            return b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Pool:
    """Keep-alive connections to one backend base URL.

    Args:
        url: The base URL (``http://host:port[/prefix]``); userinfo becomes Basic
            authorization unless ``headers`` has its own.
        maxsize: Idle connections kept for reuse; more may be open at once, the
            extra ones are closed when their answer ends.
        connect_timeout: Seconds to connect.
        headers: Sent with every request (e.g. the backend's ``Authorization``).

    Attributes:
        keep_alive: Whether answers' connections are kept for reuse: until the backend
            is found sending bytes past an answer (:meth:`out_of_step`).
    """

    def __init__(self, url: str, maxsize: int, connect_timeout: float,
                 headers: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        default_port = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"Host": host if self.port == default_port else f"{host}:{self.port}",
                 "User-Agent": "llamagate", "Accept-Encoding": "identity"}
        if parts.username is not None:
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            fixed["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        fixed.update(headers or {})
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._idle: list[Connection] = []
        self.keep_alive = True

    def request(self, method: str, path: str, body: bytes, headers: Mapping[str, str], timeout: float,
                on_socket: Callable[[socket.socket], None] | None = None) -> Response:
        """Send a request and read the answer's status and headers; the body is left to
        the :class:`Response`, which must be closed.

        Args:
            timeout: Seconds each read may wait, from the request's end to its answer's
                headers, and then for each piece of the body (see :meth:`Response.set_timeout`).
            on_socket: Called with the socket as soon as it carries the request (to
                cut it from elsewhere, e.g. on a cancel).

        Raises:
            HTTPFailure: no answer (see the module's doc for which).
        """
        line = method + path
        if " " in line or not line.isprintable() or not all(value.isprintable() for value in headers.values()):
            # callers pass checked values; this keeps a slip from splitting the request
            raise ValueError("a request line or header value with a space, line break or control character")
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\n{self._fixed}"
                + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                + (f"Content-Length: {len(body)}\r\n\r\n" if body or method in ("POST", "PUT", "PATCH")
                   else "\r\n")).encode("latin-1")
        message = head + body
        while True:
            conn = self._take()
            if on_socket is not None:
                on_socket(conn.sock)
            try:
                conn.sock.settimeout(timeout)
                try:
                    conn.sock.sendall(message)
                except OSError as exc:
                    if conn.reused:
                        raise _StaleConnection() from None
                    raise ConnectionBroken(f"sending to the backend failed: {exc.strerror or exc}") from None
                return Response(self, conn, method)
            except _StaleConnection:
                conn.close()  # the backend closed it while it sat idle, before reading a byte: a fresh one
            except BaseException:
                conn.close()
                raise

    def _take(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            waiting = conn.waiting()
            if waiting is None:
                conn.reused = True
                return conn
            conn.close()
            if waiting:
                self.out_of_step()
        return Connection(self._connect())

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise ConnectTimedOut(f"connecting to {self.host}:{self.port} timed out") from None
        except ConnectionRefusedError:
            raise ConnectFailed(f"{self.host}:{self.port} refused the connection", refused=True) from None
        except OSError as exc:
            raise ConnectFailed(f"could not connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small events leave at once
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectFailed(f"TLS with {self.host}:{self.port} failed: {exc}") from None
        return sock

    def out_of_step(self) -> None:
        """The backend sent bytes past an answer's end. Bytes of that kind that come only
        after the next request went out cannot be told from its answer: none of this
        backend's connections is reused any more."""
        self.keep_alive = False
        self.close()

    def _give_back(self, conn: Connection) -> None:
        if self.keep_alive and len(self._idle) < self.maxsize:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the idle connections (answers being read keep theirs until they end)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _StaleConnection(LlamagateError):
    """A reused keep-alive connection the backend had closed before reading a byte:
    caught in :meth:`Pool.request`, which sends again on a fresh one (never an
    :class:`HTTPFailure`, so that no caller's ``except`` takes it for one)."""


class Response:
    """An answer whose status and headers were read; its body is read by :meth:`chunks`
    (as it arrives) or :meth:`read` (whole). :meth:`close` gives the connection back
    to the pool when the body was read to its end, else closes it.

    Attributes:
        status: The HTTP status.
        headers: Header names in lower case; repeated headers joined with ``", "``.
    """

    def __init__(self, pool: Pool, conn: Connection, method: str) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self._buffer = b""
        self._ended = False
        self._reusable = True
        status, headers = self._read_head(conn)
        while 100 <= status < 200 and status != 101:  # interim answers (100 Continue): the real one follows
            status, headers = self._read_head(conn)
        self.status = status
        self.headers = headers
        if method == "HEAD" or status in _NO_BODY_STATUSES or status == 101:
            self._length: int | None = 0
            self._chunked = False
        else:
            self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = headers.get("content-length")
            try:
                self._length = None if self._chunked or length is None else int(length)
            except ValueError:
                raise ConnectionBroken(f"a bad Content-Length: {length[:40]!r}") from None
            if self._length is not None and self._length < 0:
                raise ConnectionBroken("a negative Content-Length")
        connection = headers.get("connection", "").lower()
        if "close" in connection or (not self._chunked and self._length is None):
            self._reusable = False
        if self._length == 0:
            self._ended = True

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def set_timeout(self, seconds: float) -> None:
        """From now on a read that waits longer than ``seconds`` fails."""
        if self._conn is not None:
            self._conn.sock.settimeout(seconds)

    def _recv(self, conn: Connection | None = None) -> bytes:
        conn = conn or self._conn
        if conn is None:
            raise ConnectionBroken("the answer was closed")
        try:
            return conn.sock.recv(RECV_BYTES)
        except TimeoutError:
            raise ReadTimedOut("the backend sent nothing for the read timeout") from None
        except OSError as exc:
            raise ConnectionBroken(f"the connection broke: {exc.strerror or exc}") from None

    def _read_head(self, conn: Connection) -> tuple[int, dict[str, str]]:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buffer) > MAX_HEAD_BYTES:
                raise ConnectionBroken("the answer's headers were too long")
            try:
                data = self._recv(conn)
            except ConnectionBroken:
                if conn.reused and not buffer:
                    raise _StaleConnection() from None
                raise
            if not data:
                if conn.reused and not buffer:
                    raise _StaleConnection()
                raise ConnectionBroken("the backend closed the connection without an answer")
            buffer += data
        lines = buffer[:end].decode("latin-1").split("\r\n")
        self._buffer = buffer[end + 4:]
        conn.reused = False  # an answer came: any failure from here on is not a stale connection
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ConnectionBroken("the backend did not answer in HTTP/1.x")
        if version == "HTTP/1.0":
            self._reusable = False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ConnectionBroken("a malformed header line in the answer")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(code), headers

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives, in the pieces the network delivers (never empty).

        Raises:
            HTTPFailure: the body broke off or timed out.
        """
        if self._ended:
            return
        if self._chunked:
            yield from self._dechunk()
        elif self._length is not None:
            yield from self._part(self._buffer, self._length)
            self._end()
        else:  # ends when the backend closes the connection
            data, self._buffer = self._buffer, b""
            while data:
                yield data
                data = self._recv()
        self._ended = True

    def _dechunk(self) -> Iterator[bytes]:
        """Chunked transfer coding, decoded: each recv's complete chunks leave together."""
        buffer, self._buffer = self._buffer, b""
        out: list[bytes] = []
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > 4096:
                    raise ConnectionBroken("a malformed chunk size in the answer")
                if out:
                    yield b"".join(out)
                    out = []
                buffer += self._more()
                continue
            try:
                size = int(buffer[:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise ConnectionBroken("a malformed chunk size in the answer") from None
            if size < 0:
                raise ConnectionBroken("a malformed chunk size in the answer")
            if size == 0:
                if out:
                    yield b"".join(out)
                self._buffer = buffer[line_end + 2:]
                self._end_trailers()
                return
            start = line_end + 2
            end = start + size
            if len(buffer) >= end + 2:  # the whole chunk is here
                if buffer[end:end + 2] != b"\r\n":
                    raise ConnectionBroken("a malformed chunk in the answer")
                out.append(buffer[start:end])
                buffer = buffer[end + 2:]
                continue
            # a chunk still arriving: pass on what came, then the rest as it comes
            if out:
                yield b"".join(out)
                out = []
            yield from self._part(buffer[start:], size)
            buffer = self._buffer
            while len(buffer) < 2:
                buffer += self._more()
            if buffer[:2] != b"\r\n":
                raise ConnectionBroken("a malformed chunk in the answer")
            buffer = buffer[2:]

    def _part(self, data: bytes, size: int) -> Iterator[bytes]:
        """``size`` bytes of the body, starting with ``data``, as they arrive; what comes
        past them is left in ``self._buffer``."""
        while len(data) < size:
            if data:
                size -= len(data)
                yield data
            data = self._more()
        if size:
            yield data[:size]
        self._buffer = data[size:]

    def _more(self) -> bytes:
        data = self._recv()
        if not data:
            raise ConnectionBroken("the backend closed the connection before the answer's end")
        return data

    def _end_trailers(self) -> None:
        """Read the trailer section after the last chunk (llama-server sends none)."""
        buffer = self._buffer
        while True:
            if buffer.startswith(b"\r\n"):
                self._buffer = buffer[2:]
                break
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                self._buffer = buffer[end + 4:]
                break
            if len(buffer) > MAX_HEAD_BYTES:
                raise ConnectionBroken("the answer's trailers were too long")
            buffer += self._more()
        self._end()

    def _end(self) -> None:
        """At the answer's end: bytes read past it put the connection and its backend out of step."""
        if self._buffer:
            self._reusable = False
            self._pool.out_of_step()

    def read(self) -> bytes:
        """The whole body.

        Raises:
            HTTPFailure: the body broke off or timed out.
        """
        return b"".join(self.chunks())

    def json(self) -> Any:
        """The body decoded as JSON (``ValueError`` when it is not)."""
        return json.loads(self.read())

    @property
    def ended(self) -> bool:
        """The body was read to its end."""
        return self._ended

    def close(self) -> None:
        """Give the connection back for reuse when the body was read to its end and the
        backend keeps it alive; else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._ended and self._reusable:
            self._pool._give_back(conn)
        else:
            conn.close()
