"""The order of a backend's admission queue, one rule for local admission
(:class:`gateway.backends.admission.LocalAdmission`) and shared admission (the Lua of
:class:`gateway.backends.admission.SharedAdmission`, which keeps the same order in Redis): admins first, then keys by
priority (0-100, higher first), then the clients of one rank in turn, first come first
served within a client; and how many places of the queue one client may hold."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..context import MAX_PRIORITY, Principal

T = TypeVar("T")


@dataclass(frozen=True)
class QueuePlace:
    """Where a request queues.

    Attributes:
        rank: Lower goes first: admins 0, keys 1 + 100 - priority.
        client: Whose turn it is; a client served goes to the back of its rank.
    """

    rank: int
    client: str

    @classmethod
    def of(cls, principal: Principal | None) -> QueuePlace:
        if principal is None:
            return cls(1 + MAX_PRIORITY, "-")
        rank = 0 if principal.role == "admin" else 1 + MAX_PRIORITY - principal.priority
        return cls(rank, f"{rank}:{principal.client_id}")


def client_places(max_queue: int) -> int:
    """The places of a queue of ``max_queue`` one client may hold: a quarter (at least one),
    so that a client that fills its own leaves the rest of the queue to the others."""
    return max(1, max_queue // 4)


class TurnQueue(Generic[T]):
    """Waiting items in :class:`QueuePlace` order."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[int, int]] = {}  # client -> (rank, turn): the lowest goes next
        self._waiting: dict[str, deque[T]] = {}  # client -> its items, first come first
        self._turn = itertools.count()
        self.size = 0

    def count(self, client: str) -> int:
        return len(self._waiting.get(client, ()))

    def push(self, place: QueuePlace, item: T) -> None:
        if place.client not in self._waiting:
            self._turns[place.client] = (place.rank, next(self._turn))
            self._waiting[place.client] = deque()
        self._waiting[place.client].append(item)
        self.size += 1

    def pop(self) -> T:
        """The next item; its client goes to the back of its rank."""
        client = min(self._turns, key=self._turns.__getitem__)
        waiting = self._waiting[client]
        item = waiting.popleft()
        if waiting:
            self._turns[client] = (self._turns[client][0], next(self._turn))
        else:
            self._forget(client)
        self.size -= 1
        return item

    def remove(self, client: str, item: T) -> None:
        waiting = self._waiting[client]
        waiting.remove(item)
        if not waiting:
            self._forget(client)
        self.size -= 1

    def _forget(self, client: str) -> None:
        del self._turns[client], self._waiting[client]
