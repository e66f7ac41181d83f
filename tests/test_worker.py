"""gateway.web.worker.linger on real loopback TCP connections: how a connection whose request
body was left unread is closed."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.web import worker


@pytest.fixture
def connection():
    """(server side, client side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield server, client
    server.close()
    client.close()


def queued(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def until_queued(sock: socket.socket, count: int) -> None:
    deadline = time.monotonic() + 5
    while queued(sock) < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_it_half_closes_and_discards_no_more_than_its_bytes(connection):
    server, client = connection
    client.sendall(b"x" * 100_000)
    until_queued(server, 100_000)
    server.sendall(b"the answer")
    worker.linger(server, 65536, 5)
    assert queued(server) == 100_000 - 65536  # the rest was left unread
    client.settimeout(5)
    assert client.recv(100) == b"the answer" and client.recv(100) == b""  # then end-of-file, not a reset


def test_it_ends_when_the_client_goes_quiet(connection, monkeypatch):
    server, client = connection
    monkeypatch.setattr(worker, "LINGER_SECONDS", 0.2)
    worker.linger(server, 1 << 30, 30)  # returns after LINGER_SECONDS of silence, whatever its allowance
    client.settimeout(5)
    assert client.recv(100) == b""


def test_it_ends_when_the_client_closes(connection):
    server, client = connection
    client.sendall(b"x" * 1000)
    client.close()
    worker.linger(server, 1 << 30, 30)  # returns at the client's end-of-file
    assert queued(server) == 0


def test_it_closes_only_once_the_client_has_the_whole_answer(connection):
    """An answer the client's kernel has not acknowledged yet (here: it does not read, and
    its window is small) would be destroyed by the reset a close with unread bytes sends."""
    server, client = connection
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sendall(b"the body nobody reads")
    answer = bytes(range(256)) * 256  # 64 KiB, more than the client's window
    server.setblocking(False)
    sent = server.send(answer)
    server.setblocking(True)
    assert worker.unacknowledged(server) > 0

    def read_later() -> bytes:
        time.sleep(0.3)
        client.settimeout(5)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        return data

    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(read_later)
        worker.linger(server, 0, 10)
        server.close()  # with the body unread: a reset, after the client acknowledged the answer
        assert received.result() == answer[:sent]
