"""Shared state for plugins: a memory store (one process) and a Redis store (every
worker and every gateway instance), with one interface.

Both offer a byte cache (``get``/``set`` with a TTL) and a GCRA rate limiter
(``throttle``): the generic cell rate algorithm keeps one timestamp per key, the
"theoretical arrival time", which makes a fair sliding limit without buckets.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ..errors import LlamagateError

log = logging.getLogger("llamagate")


class StoreUnavailable(LlamagateError):
    """The store could not be reached; the plugin decides to fail open or closed."""


@dataclass(frozen=True)
class Decision:
    """The result of :meth:`Store.throttle`.

    Attributes:
        allowed: Whether the cost was admitted (and charged).
        remaining: Units left that could be spent right now.
        reset_after: Seconds until the limit is fully replenished.
        retry_after: Seconds until the cost would be admitted (0 when allowed).
    """

    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float


def gcra(tat: float | None, now: float, limit: int, period: float, cost: int, force: bool) -> tuple[Decision, float | None]:
    """One GCRA step: the decision and the new arrival time to store (None: keep the old).

    ``limit`` units per ``period`` seconds, bursts up to ``limit``. With ``force``
    the cost is charged even over the limit (tokens known only after the answer).
    """
    interval = period / limit
    # Decide on the debt relative to now: (now + period) - period can round above now,
    # which refused a first request at random clock readings.
    debt = max(0.0, tat - now) if tat is not None else 0.0
    new_debt = debt + cost * interval
    wait = new_debt - period
    if wait > 1e-9 and not force:
        return Decision(False, _remaining(debt, period, interval), debt, wait), None
    return Decision(True, _remaining(new_debt, period, interval), new_debt, 0.0), now + new_debt


def _remaining(debt: float, period: float, interval: float) -> int:
    return max(0, math.floor((period - debt) / interval + 1e-9))


class Store(Protocol):
    """What rate limit and cache plugins need from a store."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl: float) -> None: ...

    def throttle(self, key: str, limit: int, period: float, cost: int = 1, force: bool = False) -> Decision: ...


class MemoryStore:
    """In-process store: an LRU byte cache bounded by total size, and GCRA state.

    State is per gunicorn worker process.

    Args:
        max_bytes: Largest total size of cached values; least recently used go first.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._size = 0
        self._arrivals: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._values.get(key)
            if item is None:
                return None
            if item[1] <= time.monotonic():
                self._drop(key)
                return None
            self._values.move_to_end(key)
            return item[0]

    def set(self, key: str, value: bytes, ttl: float) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            if key in self._values:
                self._drop(key)
            self._values[key] = (value, time.monotonic() + ttl)
            self._size += len(value)
            while self._size > self.max_bytes:
                self._drop(next(iter(self._values)))

    def _drop(self, key: str) -> None:
        value, _ = self._values.pop(key)
        self._size -= len(value)

    max_arrivals = 100_000  # rate limit keys kept; past it the least indebted are forgotten

    def _prune_arrivals(self, now: float) -> None:
        """Forget fully replenished keys; if still over 90% of ``max_arrivals`` (that many
        clients active at once), also the ones closest to replenished (they start afresh,
        the least harm). Shrinking to 90% makes the next pruning 10% of the keys away, so
        its cost is spread thin, and memory stays bounded whatever the number of clients."""
        keep = int(self.max_arrivals * 0.9)
        live = {k: t for k, t in self._arrivals.items() if t > now}
        if len(live) > keep:
            live = dict(heapq.nlargest(keep, live.items(), key=lambda item: item[1]))
        self._arrivals = live

    def throttle(self, key: str, limit: int, period: float, cost: int = 1, force: bool = False) -> Decision:
        now = time.monotonic()
        with self._lock:
            if len(self._arrivals) >= self.max_arrivals and key not in self._arrivals:
                self._prune_arrivals(now)
            decision, new_tat = gcra(self._arrivals.get(key), now, limit, period, cost, force)
            if new_tat is not None:
                self._arrivals[key] = new_tat
        return decision


# The same step as gcra(), atomically in Redis, on Redis's clock so that every
# gateway instance agrees. Times in microseconds; decided on the debt relative to now
# (within 1 µs), as gcra() is, so that rounding never refuses a request that fits.
_GCRA_LUA = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local debt = math.max(0, tat - now)
local new_debt = debt + cost * interval
local wait = new_debt - period
if wait > 1 and not force then
  return {0, tostring(debt), tostring(wait)}
end
redis.call('SET', KEYS[1], tostring(now + new_debt), 'PX', math.max(1, math.ceil(new_debt / 1000)))
return {1, tostring(new_debt), '0'}
"""


class RedisStore:
    """Redis store: shared by every worker and gateway instance.

    Args:
        url: ``redis://host:port/db``.
        prefix: Prepended to every key.
        timeout: Seconds for connect and each command; a slow Redis must not
            stall requests for long.
    """

    def __init__(self, url: str, prefix: str = "llamagate:", timeout: float = 0.5) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.prefix = prefix
        self._gcra = self.client.register_script(_GCRA_LUA)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    def get(self, key: str) -> bytes | None:
        return self._call(self.client.get, self.prefix + key)

    def set(self, key: str, value: bytes, ttl: float) -> None:
        self._call(self.client.set, self.prefix + key, value, px=max(1, int(ttl * 1000)))

    def throttle(self, key: str, limit: int, period: float, cost: int = 1, force: bool = False) -> Decision:
        period_us = period * 1_000_000
        allowed, debt, wait = self._call(self._gcra, keys=[self.prefix + key],
                                         args=[limit, period_us, cost, "1" if force else "0"])
        debt_s, wait_s = float(debt) / 1_000_000, float(wait) / 1_000_000
        return Decision(bool(allowed), _remaining(debt_s, period, period / limit), debt_s, wait_s)


_memory_stores: dict[tuple[str, int], MemoryStore] = {}
_registry_lock = threading.Lock()


def reset_memory_stores() -> None:
    """Forget every memory store, as a new process would (tests start from nothing)."""
    with _registry_lock:
        _memory_stores.clear()


def make_store(config: Mapping[str, Any], key_prefix: str) -> Store:
    """The store a plugin's config asks for (``store``, ``redis_url``, ``max_bytes``).

    A memory store is one per process for each ``key_prefix`` (and size): the plugin
    instances a reload makes get the same one, so rate limits and cached answers
    survive a reload exactly as they do in Redis. Like Redis, it is shared by every
    pipeline that uses the plugin: keep pipelines apart in the keys if they must be.
    """
    if config["store"] == "redis":
        return RedisStore(config["redis_url"], prefix=f"llamagate:{key_prefix}:")
    max_bytes = config.get("max_bytes", 64 * 1024 * 1024)
    with _registry_lock:
        store = _memory_stores.get((key_prefix, max_bytes))
        if store is None:
            store = _memory_stores[(key_prefix, max_bytes)] = MemoryStore(max_bytes)
    return store
