"""Prefix affinity: which replica, and which llama-server slot, a prompt goes to.

Everything here is a pure function of the request and the replica set, except the
:class:`SlotTable`, a per-worker hint (see its docstring). The hashes are BLAKE2b, not
Python's ``hash()``: that one is salted per process, and every worker and every host
must map a conversation to the same replica and slot.

* the key a conversation keeps across its turns is the gateway's
  (``gateway.plugin.conversation_key``, which the core's saved KV states use too): for
  chat, the messages up to and including the first ``user`` message; for completions,
  the prompt's first ``prefix_chars`` characters. Scoped like the KV cache itself: by
  client unless the backend's ``kv_sharing`` puts clients together.
* :func:`rank`: weighted rendezvous (highest random weight) hashing of the key over
  the replicas: each replica's score depends on the key and its own URL only, so a
  replica joining or leaving moves only the keys it wins or held.
* :func:`pick`: consistent hashing with bounded loads (Mirrokni, Thorup and
  Zadimoghaddam, 2018): the first replica in the key's rank whose requests in flight,
  this one included, stay within ``ceil(load_factor * total * its weight share)``.
"""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Sequence

_TWO_64 = float(2**64)


def _unit(key: bytes, name: str) -> float:
    """A uniform number in (0, 1) from the key and a name, the same in every process."""
    word = int.from_bytes(blake2b(key + name.encode(), digest_size=8).digest(), "big")
    return (word + 0.5) / _TWO_64


def rank(key: bytes, names: Sequence[str], weights: Sequence[float] | None = None) -> list[int]:
    """Indices of ``names`` in the key's order of preference (weighted rendezvous
    hashing: ``weight / -ln(u)``, so a name wins a share of keys proportional to its
    weight, and adding or removing a name moves only the keys that name wins or held)."""
    if len(names) < 2:  # one replica (or slot): no hashing needed to rank it first
        return list(range(len(names)))
    if weights is None:
        weights = [1.0] * len(names)
    scores = [weight / -math.log(_unit(key, name)) for name, weight in zip(names, weights)]
    return sorted(range(len(names)), key=lambda i: scores[i], reverse=True)


def within_bounds(key: bytes, names: Sequence[str], loads: Sequence[int], weights: Sequence[float],
                  load_factor: float, usable: Sequence[bool] | None = None) -> tuple[list[int], int]:
    """Consistent hashing with bounded loads: the indices of the replicas a key may go
    to, in the key's order of preference, and the index of its first choice overall
    (when that is not the first of the list, the key spills: the replicas it prefers are
    full, or not ``usable``: down, or their breaker open).

    A usable replica may take the request while its load, this request included, is at
    most ``ceil(load_factor * (total load + 1) * weight / total weight)``, totals over
    the usable replicas. One with no load always qualifies, so with ``load_factor >= 1``
    the list is never empty while one replica is usable; should it be, it holds the
    least loaded for its weight.
    """
    if usable is None:
        usable = [True] * len(names)
    order = rank(key, names, weights)
    live = [i for i in order if usable[i]]
    if not live:
        return [], order[0]
    total = sum(loads[i] for i in live) + 1
    weight_sum = sum(weights[i] for i in live)
    fitting = [i for i in live if loads[i] + 1 <= math.ceil(load_factor * total * weights[i] / weight_sum)]
    return fitting or [min(live, key=lambda i: loads[i] / weights[i])], order[0]


def pick(key: bytes, names: Sequence[str], loads: Sequence[int], weights: Sequence[float],
         load_factor: float, usable: Sequence[bool] | None = None) -> tuple[int, bool]:
    """The replica :func:`within_bounds` puts first, and whether it is the key's first choice."""
    fitting, first = within_bounds(key, names, loads, weights, load_factor, usable)
    return fitting[0], fitting[0] == first


class SlotTable:
    """The slots of one replica as this worker last used them: a hint for keeping each
    conversation in a slot of its own.

    llama-server reuses the KV cache of the slot a request runs in; left to choose, it
    puts every conversation that shares a system prompt into the one slot holding it, so
    they overwrite each other. The table gives a key, in order:

    1. an idle slot it already holds;
    2. the first slot, in the key's own rendezvous order over the slot ids, that is idle
       and held by no conversation seen within ``ttl`` seconds;
    3. more live conversations than slots: the least recently used idle slot of the same
       client (``scope``), else of anyone (the oldest conversation loses its cache, and
       keeps at worst the prefix it shares with the newcomer);
    4. None: every slot is busy with this worker's requests; llama-server chooses.

    Per worker on purpose: it changes the choice only when this worker knows of a
    conflict. Without one, every worker takes the key's first slot, so workers agree.
    A conversation whose turns reach workers that disagree loses its cached history
    on that turn, not its answer.
    """

    __slots__ = ("owners", "scopes", "used", "busy")

    def __init__(self, slots: int) -> None:
        self.owners: list[bytes | None] = [None] * slots
        self.scopes: list[str | None] = [None] * slots
        self.used = [0.0] * slots
        self.busy = [0] * slots

    def __len__(self) -> int:
        return len(self.owners)

    def holds(self, key: bytes) -> bool:
        """Whether the key holds an idle slot here."""
        return any(owner == key and not busy for owner, busy in zip(self.owners, self.busy))

    def has_room(self, now: float, ttl: float) -> bool:
        """Whether an idle slot is held by no live conversation."""
        return any(self._free(slot, now, ttl) for slot in range(len(self)))

    def _free(self, slot: int, now: float, ttl: float) -> bool:
        return not self.busy[slot] and (self.owners[slot] is None or now - self.used[slot] > ttl)

    def choose(self, key: bytes, scope: str, now: float, ttl: float) -> int | None:
        busy = self.busy
        if all(busy):
            return None
        slot = 0
        try:  # the key's first idle slot; list.index searches in C (a table has up to 256 slots)
            while busy[slot := self.owners.index(key, slot)]:
                slot += 1
            return slot
        except ValueError:  # the key holds no idle slot
            pass
        for slot in rank(key, [str(slot) for slot in range(len(self))]):
            if self._free(slot, now, ttl):
                return slot
        idle = [slot for slot in range(len(self)) if not busy[slot]]
        own = [slot for slot in idle if self.scopes[slot] == scope]
        return min(own or idle, key=lambda slot: self.used[slot])

    def take(self, slot: int, key: bytes, scope: str, now: float) -> None:
        self.owners[slot], self.scopes[slot], self.used[slot] = key, scope, now
        self.busy[slot] += 1

    def release(self, slot: int, now: float) -> None:
        self.busy[slot] = max(0, self.busy[slot] - 1)
        self.used[slot] = now
