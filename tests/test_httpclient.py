"""gateway.backends.httpclient against a scripted server: framing, keep-alive, failures."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from gateway.backends.httpclient import ConnectFailed, ConnectionBroken, Pool, ReadTimedOut
from gateway.testing import free_port


class Scripted:
    """A loopback server that answers each request with the next scripted reply: a list
    of byte strings sent one by one (with a short pause between, so they arrive apart),
    or a callable given the connection (alone or last in the list), after which the
    connection closes. Counts connections and keeps what it read."""

    def __init__(self, replies: list) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            while self.replies:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                reply = self.replies.pop(0)
                if callable(reply):
                    reply(conn)
                    return
                for piece in reply:
                    if callable(piece):  # the reply ends there: the callable decides what follows
                        piece(conn)
                        return
                    conn.sendall(piece)
                    time.sleep(0.01)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted():
    servers = []

    def make(*replies):
        server = Scripted(list(replies))
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.close()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunked_bodies_are_decoded_across_reads_with_extensions_and_trailers(scripted):
    server = scripted([OK_HEAD + b"5\r\nhel", b"lo\r\n6;ext=1\r\n world\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"])
    pool = Pool(server.url, 4, 2)
    response = pool.request("POST", "/v1/x", b'{"a":1}', {"Content-Type": "application/json"}, 2)
    assert response.status == 200 and response.content_type == "text/event-stream"
    assert b"".join(response.chunks()) == b"hello world" and response.ended
    response.close()
    head = server.requests[0]
    assert head.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"Content-Length: 7\r\n" in head
    assert head.endswith(b'\r\n\r\n{"a":1}')


def test_whole_chunks_that_arrive_together_leave_together(scripted):
    server = scripted([OK_HEAD + b"3\r\none\r\n3\r\ntwo\r\n", b"0\r\n\r\n"])
    response = Pool(server.url, 4, 2).request("GET", "/", b"", {}, 2)
    assert list(response.chunks()) == [b"onetwo"]


def test_a_chunk_announced_huge_is_passed_on_as_it_comes_not_gathered(scripted):
    server = scripted([OK_HEAD + b"7fffffffffff\r\n" + b"x" * 1000, b"y" * 1000, lambda conn: None])
    response = Pool(server.url, 4, 2).request("GET", "/", b"", {}, 2)
    pieces = response.chunks()
    assert next(pieces) == b"x" * 1000 and next(pieces) == b"y" * 1000
    with pytest.raises(ConnectionBroken):
        next(pieces)


def test_content_length_and_close_delimited_bodies(scripted):
    server = scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"56789"],
                      [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ", b"the end", lambda conn: None])
    pool = Pool(server.url, 4, 2)
    first = pool.request("GET", "/a", b"", {}, 2)
    assert first.read() == b"0123456789"
    first.close()
    second = pool.request("GET", "/b", b"", {}, 2)
    assert server.connections == 1  # the first answer's connection was reused
    assert second.read() == b"until the end"
    second.close()
    assert pool._idle == []  # "Connection: close": not kept


def test_an_interim_100_continue_is_skipped(scripted):
    server = scripted([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"])
    response = Pool(server.url, 4, 2).request("PUT", "/", b"x", {}, 2)
    assert response.status == 201 and response.read() == b"ok"


def test_a_connection_the_backend_closed_while_idle_is_replaced_unseen(scripted):
    def answer_then_close(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        time.sleep(0.05)
        conn.shutdown(socket.SHUT_RDWR)  # as a keep-alive timeout does

    server = scripted(answer_then_close, [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])
    pool = Pool(server.url, 4, 2)
    first = pool.request("GET", "/", b"", {}, 2)
    assert first.read() == b"a"
    first.close()
    time.sleep(0.2)
    assert pool.request("GET", "/", b"", {}, 2).read() == b"b"
    assert server.connections == 2


def test_an_answer_not_read_to_its_end_closes_its_connection(scripted):
    server = scripted([OK_HEAD + b"3\r\none\r\n", b"3\r\ntwo\r\n0\r\n\r\n"], [OK_HEAD + b"0\r\n\r\n"])
    pool = Pool(server.url, 4, 2)
    response = pool.request("GET", "/", b"", {}, 2)
    assert next(response.chunks()) == b"one"
    response.close()
    assert pool._idle == []


def test_bytes_past_an_answer_that_arrive_while_it_sits_idle_retire_its_connection(scripted):
    """A backend that sends more than its Content-Length in a later flush leaves bytes on
    the pooled connection: the next request must not read them as its own answer."""
    injected = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nleaked"
    server = scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", injected],
                      [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nown"])
    pool = Pool(server.url, 4, 2)
    first = pool.request("GET", "/a", b"", {}, 2)
    assert first.read() == b"abc"
    first.close()
    assert len(pool._idle) == 1  # nothing past the answer yet: it went back to the pool
    wait_for_bytes(pool._idle[0].sock, len(injected))
    second = pool.request("GET", "/b", b"", {}, 2)
    assert second.read() == b"own"
    assert server.connections == 2
    # leftovers could also come after the next request went out: this backend's
    # connections are not reused any more
    second.close()
    assert not pool.keep_alive and pool._idle == []


def test_bytes_past_an_answer_in_the_same_read_retire_the_backends_keep_alive(scripted):
    server = scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcXY"],
                      [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nown"])
    pool = Pool(server.url, 4, 2)
    first = pool.request("GET", "/a", b"", {}, 2)
    assert first.read() == b"abc"
    first.close()
    assert not pool.keep_alive and pool._idle == []
    assert pool.request("GET", "/b", b"", {}, 2).read() == b"own" and server.connections == 2


def wait_for_bytes(sock: socket.socket, count: int) -> None:
    """Until ``count`` bytes wait unread on ``sock`` (peeked, left there)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            if len(sock.recv(count, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= count:
                return
        except BlockingIOError:
            pass
        assert time.monotonic() < deadline, "the bytes never came"
        time.sleep(0.01)


def test_http_1_0_answers_are_not_reused(scripted):
    server = scripted([b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na"])
    pool = Pool(server.url, 4, 2)
    response = pool.request("GET", "/", b"", {}, 2)
    assert response.read() == b"a"
    response.close()
    assert pool._idle == []


def test_failures_are_told_apart(scripted):
    with pytest.raises(ConnectFailed) as refused:
        Pool(f"http://127.0.0.1:{free_port()}", 4, 2).request("GET", "/", b"", {}, 2)
    assert refused.value.refused
    silent = scripted([lambda conn: time.sleep(1)])
    with pytest.raises(ReadTimedOut):
        Pool(silent.url, 4, 2).request("GET", "/", b"", {}, 0.2)
    for reply in ([b"SSH-2.0-OpenSSH\r\n\r\n"], [OK_HEAD + b"zz\r\n"], [OK_HEAD + b"3\r\nabcXY"]):
        server = scripted(reply, lambda conn: None)
        with pytest.raises(ConnectionBroken):
            Pool(server.url, 4, 2).request("GET", "/", b"", {}, 2).read()


def test_userinfo_becomes_basic_authorization_and_a_path_prefix_is_kept(scripted):
    server = scripted([b"HTTP/1.1 204 No Content\r\n\r\n"])
    url = server.url.replace("http://", "http://user:p%40ss@") + "/base/"
    response = Pool(url, 4, 2).request("GET", "/health", b"", {}, 2)
    assert response.status == 204 and response.read() == b""
    head = server.requests[0]
    assert head.startswith(b"GET /base/health HTTP/1.1") and b"Authorization: Basic dXNlcjpwQHNz\r\n" in head


@pytest.mark.parametrize("path, headers", [("/a b", {}), ("/a\r\nX: y", {}), ("/", {"X-Request-Id": "a\r\nX-Admin: 1"})])
def test_nothing_can_split_the_request(scripted, path, headers):
    server = scripted([b"HTTP/1.1 204 No Content\r\n\r\n"])
    with pytest.raises(ValueError):
        Pool(server.url, 4, 2).request("GET", path, b"", headers, 2)
    assert server.requests == []
