"""The supervisor's Unix socket: one JSON line in, one JSON line out, a thread per
connection; an ``acquire`` keeps its connection as the lease (the other side is
:mod:`gateway.fleet.client`)."""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
from typing import Any

from .scheduler import Fleet

MAX_LINE = 65536


class _Handler(socketserver.StreamRequestHandler):
    """One connection: one JSON line in, one JSON line out; an ``acquire`` keeps the
    connection as its lease."""

    server: LeaseServer

    def handle(self) -> None:
        fleet = self.server.fleet
        try:
            line = self.rfile.readline(MAX_LINE)
            message = json.loads(line)
            op = message["op"]
        except (ValueError, KeyError, TypeError, OSError):
            return
        if op == "acquire":
            self._lease(fleet, str(message.get("backend")), bool(message.get("check")))
            return
        try:
            if op == "status":
                answer: dict[str, Any] = fleet.status()
            elif op in ("load", "unload"):
                act = fleet.load if op == "load" else fleet.unload
                answer = act(str(message.get("backend")), float(message.get("timeout", 300)))
            else:
                answer = {"error": f"unknown op {op!r}"}
        except KeyError:
            answer = {"error": "not_found"}
        self._send(answer)

    def _send(self, answer: dict[str, Any]) -> None:
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            pass

    def _lease(self, fleet: Fleet, name: str, check: bool) -> None:
        unit, waiter = fleet.enqueue(name, check)
        while not waiter.event.wait(0.5):
            if _closed(self.connection):
                assert unit is not None
                fleet.abandon(unit, waiter)
                return
        if waiter.error is not None or unit is None:
            self._send({"ok": False, "reason": waiter.error})
            return
        try:
            self._send({"ok": True, **waiter.report})
            while self.connection.recv(64):  # until the worker closes it (or dies)
                pass
        except OSError:
            pass
        finally:
            fleet.release(unit)


def _closed(sock: socket.socket) -> bool:
    """Did the other end close (or send something, which a waiting worker never does)?"""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class LeaseServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: str, fleet: Fleet) -> None:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        old_umask = os.umask(0o077)  # only this user may connect
        try:
            super().__init__(socket_path, _Handler)
        finally:
            os.umask(old_umask)
        self.fleet = fleet
