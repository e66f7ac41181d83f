"""A prefix-route backend that sends more than its answer, through real gunicorn gevent
workers: the bytes it leaves on a pooled keep-alive connection must never become another
tenant's answer."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

import pytest
import requests

ALICE, BOB = "sk-desync-alice-0123456789", "sk-desync-bob-0123456789"
# An answer of its own, as a tenant whose words the backend echoes can write it.
INJECTED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nleaked"


class OverSendingEcho:
    """A keep-alive HTTP/1.1 server that echoes each request's body as text, with a
    Content-Length counted in characters instead of bytes: a UTF-8 body with multi-byte
    characters leaves its last bytes past the announced end. It writes the announced
    bytes first and the rest in a second flush, once ``release`` is set (after the
    gateway is done with the answer), and sets ``overflowed`` when those bytes reached
    the gateway's kernel (the peer acknowledged them)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.release = threading.Event()
        self.overflowed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:  # the gateway closed it
            pass
        finally:
            conn.close()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, data = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(data) < length:
                data += conn.recv(65536)
            body, data = data[:length], data[length:]
            text = body.decode()
            announced = len(text)  # characters, not bytes: the bug this backend has
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         + f"Content-Length: {announced}\r\n\r\n".encode() + body[:announced])
            if len(body) > announced:
                self.release.wait(10)
                conn.sendall(body[announced:])
                until_acknowledged(conn)
                self.overflowed.set()

    def close(self) -> None:
        self.listener.close()


def until_acknowledged(conn: socket.socket) -> None:
    """Until the peer's kernel has acknowledged all we sent (nothing left in our send queue)."""
    deadline = time.monotonic() + 5
    while struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]:
        assert time.monotonic() < deadline, "the gateway never took the bytes"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def relayed(start_gateway, canned_url):
    echo = OverSendingEcho()
    doc = {
        "health_interval": 1,
        "backends": {"chat": {"urls": [canned_url]}, "echo": {"urls": [echo.url]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"auth": {"env_keys": {"DESYNC_KEYS": "user"}}}]},
        "routes": {"/v1/chat/completions": "default", "/echo/*": {"pipeline": "default", "backend": "echo"}},
    }
    # one worker: both tenants' requests share its pool of connections to the echo backend
    gw = start_gateway(doc, workers=1, DESYNC_KEYS=f"{ALICE}:alice,{BOB}:bob")
    gw.echo = echo
    yield gw
    echo.close()


def say(gw, key: str, text: str) -> requests.Response:
    return requests.post(gw.url + "/echo/say", data=text.encode(), timeout=10,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain"})


def test_bytes_a_backend_sends_past_its_answer_never_answer_another_tenant(relayed):
    """alice's text makes the backend over-send exactly an HTTP answer of her choosing, in
    a later flush; the pooled connection used to carry it to bob as his answer, and bob's
    real answer to whoever came next."""
    crafted = "é" * len(INJECTED) + INJECTED.decode()
    first = say(relayed, ALICE, crafted)
    assert first.status_code == 200
    assert first.content == crafted.encode()[:len(crafted)]  # what the backend announced
    relayed.echo.release.set()
    assert relayed.echo.overflowed.wait(10)  # the rest now waits on the idle pooled connection
    second = say(relayed, BOB, "bob's own question")
    assert (second.status_code, second.text) == (200, "bob's own question")
    third = say(relayed, ALICE, "alice again")
    assert (third.status_code, third.text) == (200, "alice again")
