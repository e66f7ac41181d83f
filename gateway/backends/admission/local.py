"""This worker's own admission: its slots and a bounded queue in turns."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ...errors import queue_full, queue_timeout
from ..turns import QueuePlace, TurnQueue, client_places
from .protocol import Admitted, AdmittedBackend


@dataclass(eq=False)
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    granted: bool = False


class LocalAdmission:
    """At most ``limit`` requests in flight; the rest wait in a bounded queue in
    :class:`QueuePlace` order, each client in at most :func:`client_places` of its places.

    A freed slot is handed straight to the next waiter, so a newcomer cannot overtake
    the queue.
    """

    shared = None

    def __init__(self, backend: AdmittedBackend, max_queue: int, timeout: float) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.timeout = timeout
        self.in_flight = 0
        self._queue: TurnQueue[_Waiter] = TurnQueue()
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        return self._queue.size

    def acquire(self, place: QueuePlace, in_flight: Admitted | None = None) -> float:
        """See :meth:`Admission.acquire`."""
        name = self.backend.name
        with self._lock:
            if self.in_flight < self.backend.limit and not self._queue.size:
                self.in_flight += 1
                return 0.0
            if self._queue.size >= self.max_queue:
                raise queue_full(name, mine=False)
            if self._queue.count(place.client) >= client_places(self.max_queue):
                raise queue_full(name, mine=True)
            waiter = _Waiter()
            self._queue.push(place, waiter)
        start = time.monotonic()
        if in_flight is not None:
            in_flight.wake = waiter.event.set
        try:
            waiter.event.wait(self.timeout)
        except BaseException:
            self._leave(place, waiter)
            raise
        finally:
            if in_flight is not None:
                in_flight.wake = None
        stopped = in_flight.stopped if in_flight is not None else None
        if stopped is not None:
            self._leave(place, waiter)
            raise stopped
        if waiter.granted:
            return time.monotonic() - start
        self._leave(place, waiter)
        raise queue_timeout(name, self.timeout)

    def _leave(self, place: QueuePlace, waiter: _Waiter) -> None:
        """A waiter gives up: out of the queue, or, if a slot reached it meanwhile,
        the slot passes on."""
        with self._lock:
            if not waiter.granted:
                self._queue.remove(place.client, waiter)
                return
        self.release()

    def adopt(self, backend: AdmittedBackend, max_queue: int, timeout: float) -> None:
        self.backend, self.max_queue, self.timeout = backend, max_queue, timeout

    def release(self, in_flight: Admitted | None = None) -> None:
        with self._lock:
            if self._queue.size:
                waiter = self._queue.pop()
                waiter.granted = True  # the slot passes to it; in_flight stays
                waiter.event.set()
            else:
                self.in_flight -= 1
