"""The whole gateway's admission, in the Redis every worker and host shares
(``admission: redis``): slots as leases, one queue in turns, its Lua; this worker's own
:class:`~gateway.backends.admission.local.LocalAdmission` admits while Redis cannot be reached."""

from __future__ import annotations

import threading
import time
from typing import Any

from ...errors import queue_full, queue_timeout
from ...storage.shared import Shared, SharedUnavailable
from ..turns import QueuePlace, client_places
from .local import LocalAdmission
from .protocol import Admitted, AdmittedBackend

POLL = 1.0  # seconds between a queued request's looks at Redis, should its wake be lost
RANK_SPAN = 1e12  # queue scores: rank * RANK_SPAN + turn (exact in a double up to rank ~9000)


# The shared admission's Lua.
#
# Per backend, in Redis: `slots:<i>`, a sorted set per replica (its index in the backend's
# urls) of the slot ids taken on it, scored by when their lease ends; `waiters`, the queued
# ids scored by when their place lapses unless refreshed; `clients`, the clients with queued
# requests, scored rank * RANK_SPAN + turn (lowest first; the rank and the client are
# turns.QueuePlace's, and this keeps turns.TurnQueue's order: a client served goes to
# the back of its rank, which makes clients of one rank take turns); `queue:<client>`, each
# client's queued ids, first come first served; `turn`, the counter of turns; `since`, when
# these keys were first written. Times are Redis's own (TIME), so every host agrees. `pump`
# hands free slots (on the replica with the most free) to the queue's heads and tells their
# workers on their wake channels. A granted request learns its replica: acquire answers its
# index + 1.
#
# Redis that lost its keys (a restart without persistence, a FLUSHDB) lost the leases of
# requests still in flight: no slot is handed out until every live worker's heartbeat has
# put its leases back, i.e. for `settle` ms after `since` is written again.
# ARGV[1] is always the wake prefix, ARGV[2] the replicas' slot counts ("4,4"; 0 for a
# replica known to be down), ARGV[3] the settling time in ms.
_PUMP_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local limits = {}
for n in string.gmatch(ARGV[2], '%%d+') do limits[#limits + 1] = tonumber(n) end
local function settled(base, now)
  local since = redis.call('GET', base .. 'since')
  if not since then
    redis.call('SET', base .. 'since', now)
    since = now
  end
  return now >= tonumber(since) + tonumber(ARGV[3])
end
local function taken(base, id)
  for i = 1, #limits do
    if redis.call('ZSCORE', base .. 'slots:' .. (i - 1), id) then return i end
  end
  return 0
end
local function freest(base)
  local best, most = 0, 0
  for i = 1, #limits do
    local free = limits[i] - redis.call('ZCARD', base .. 'slots:' .. (i - 1))
    if free > most then best, most = i, free end
  end
  return best
end
local function pump(base, lease, now)
  local waiters, clients = base .. 'waiters', base .. 'clients'
  for i = 1, #limits do redis.call('ZREMRANGEBYSCORE', base .. 'slots:' .. (i - 1), '-inf', now) end
  redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
  if not settled(base, now) then return end
  local replica = freest(base)
  while replica > 0 do
    local head = redis.call('ZRANGE', clients, 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    local client, score = head[1], tonumber(head[2])
    local queue = base .. 'queue:' .. client
    local id = redis.call('LPOP', queue)
    local granted = false
    if id and redis.call('ZREM', waiters, id) == 1 then
      redis.call('ZADD', base .. 'slots:' .. (replica - 1), now + lease, id)
      redis.call('PUBLISH', ARGV[1] .. string.match(id, '^(.*)/[^/]*$'), id)
      granted = true
      replica = freest(base)
    end
    if redis.call('LLEN', queue) == 0 then
      redis.call('ZREM', clients, client)
    elseif granted then
      local rank = math.floor(score / %(span)d)
      redis.call('ZADD', clients, rank * %(span)d + redis.call('INCR', base .. 'turn'), client)
    end
  end
end
""" % {"span": int(RANK_SPAN)}

SCRIPTS = {
    # ARGV (after the three above): id, client, rank, lease ms, max queue, the client's
    # places, place ms. The replica's index + 1: a slot on it (now or granted since), 0:
    # queued (or still), -1: the queue is full, -2: the client holds its share of it.
    "acquire": _PUMP_LUA + """
local base, id, client = KEYS[1], ARGV[4], ARGV[5]
local rank, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_queue, mine, place = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now = now_ms()
pump(base, lease, now)
local held = taken(base, id)
if held > 0 then return held end
if redis.call('ZSCORE', base .. 'waiters', id) then
  redis.call('ZADD', base .. 'waiters', now + place, id)
  return 0
end
local replica = 0
if settled(base, now) then replica = freest(base) end
if replica > 0 then
  redis.call('ZADD', base .. 'slots:' .. (replica - 1), now + lease, id)
  return replica
end
if redis.call('ZCARD', base .. 'waiters') >= max_queue then return -1 end
if redis.call('LLEN', base .. 'queue:' .. client) >= mine then return -2 end
redis.call('ZADD', base .. 'waiters', now + place, id)
redis.call('RPUSH', base .. 'queue:' .. client, id)
if not redis.call('ZSCORE', base .. 'clients', client) then
  redis.call('ZADD', base .. 'clients', rank * %(span)d + redis.call('INCR', base .. 'turn'), client)
end
return 0
""" % {"span": int(RANK_SPAN)},
    # ARGV: id, client, lease ms. Gives up a place or a slot.
    "release": _PUMP_LUA + """
local base, id, client = KEYS[1], ARGV[4], ARGV[5]
if redis.call('ZREM', base .. 'waiters', id) == 1 then
  redis.call('LREM', base .. 'queue:' .. client, 0, id)
  if redis.call('LLEN', base .. 'queue:' .. client) == 0 then redis.call('ZREM', base .. 'clients', client) end
end
for i = 1, #limits do redis.call('ZREM', base .. 'slots:' .. (i - 1), id) end
pump(base, tonumber(ARGV[6]), now_ms())
return 1
""",
    # ARGV: lease ms, place ms, then for each slot held its id and replica index + 1, '',
    # then the queued ids. While the keys settle after a loss, a lease Redis lost is written
    # back (the request is in flight on that replica: the count must say so); otherwise
    # leases are only renewed (XX), so that one released since the worker listed it stays so.
    "refresh": _PUMP_LUA + """
local base = KEYS[1]
local lease, place = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local restoring = not settled(base, now)
local i = 6
while i <= #ARGV and ARGV[i] ~= '' do
  local replica = tonumber(ARGV[i + 1])
  local slots = base .. 'slots:' .. (replica - 1)
  if restoring and replica <= #limits then redis.call('ZADD', slots, now + lease, ARGV[i])
  else redis.call('ZADD', slots, 'XX', now + lease, ARGV[i]) end
  i = i + 2
end
for q = i + 1, #ARGV do redis.call('ZADD', base .. 'waiters', 'XX', now + place, ARGV[q]) end
pump(base, lease, now)
return 1
""",
}


class SharedAdmission:
    """:class:`Admission` over the slots and queue in Redis:
    at most each replica's slots in flight on it across every worker and host
    (``backend.replica_slots()``; none on a replica this worker knows is down while
    another is up); a request admitted so is sent to the replica its slot is on
    (``InFlight.replica``).

    Each slot is a lease this worker refreshes every heartbeat (and writes back should
    Redis have lost it); a queued request keeps its place the same way. While Redis
    cannot be reached, ``fallback`` (this worker's own :class:`Admission` with its share
    of the slots) admits instead.

    Args:
        backend: The backend.
        shared: This worker's :class:`Shared`.
        fallback: This worker's own admission.
    """

    def __init__(self, backend: AdmittedBackend, shared: Shared, fallback: LocalAdmission) -> None:
        self.backend = backend
        self.shared = shared
        self.fallback = fallback
        self.held: dict[Admitted, tuple[str, str, int]] = {}  # this worker's slots: (id, client, replica + 1)
        self.places: dict[str, str] = {}  # this worker's queued ids -> client
        shared.refreshing.add(self)

    @property
    def max_queue(self) -> int:
        return self.fallback.max_queue

    @property
    def timeout(self) -> float:
        return self.fallback.timeout

    def adopt(self, backend: AdmittedBackend, max_queue: int, timeout: float) -> None:
        self.backend = backend
        self.fallback.adopt(backend, max_queue, timeout)

    @property
    def in_flight(self) -> int:
        """Requests this worker has admitted (shared or, while Redis is down, its own)."""
        return len(self.held) + self.fallback.in_flight

    @property
    def queued(self) -> int:
        return len(self.places) + self.fallback.queued

    def _key(self) -> str:
        return f"{self.shared.prefix}admission:{self.backend.name}:"

    def _ask(self, name: str, args: list[Any]) -> Any:
        slots = self.backend.replica_slots()
        up = [r.available for r in self.backend.replicas]
        if any(up):  # with none up, the request fails fast on the way out, not in the queue
            slots = [n if ok else 0 for n, ok in zip(slots, up)]
        # every live worker's heartbeat comes within three intervals (as its status does)
        settle_ms = int(self.shared.config.status_interval * 3000)
        return self.shared.script(SCRIPTS[name], [self._key()],
                                  [self.shared.prefix + "wake:", ",".join(map(str, slots)), settle_ms, *args])

    def _granted(self, in_flight: Admitted, ident: str, client: str, replica: int) -> None:
        """A slot on the backend's replica number ``replica`` (from 1): the request goes there."""
        self.held[in_flight] = (ident, client, replica)
        in_flight.replica = self.backend.replicas[replica - 1] if replica <= len(self.backend.replicas) else None

    def acquire(self, place: QueuePlace, in_flight: Admitted | None = None) -> float:
        """Take a slot, waiting in the shared queue if need be; see :meth:`Admission.acquire`."""
        assert in_flight is not None, "shared admission releases by the request's InFlight"
        client = place.client
        ident = self.shared.new_id()
        lease_ms, place_ms = int(self.shared.config.lease * 1000), int(self.shared.config.lease * 1000)
        args = [ident, client, place.rank, lease_ms, self.max_queue, client_places(self.max_queue), place_ms]
        start = time.monotonic()
        try:
            answer = self._ask("acquire", args)
        except SharedUnavailable:
            in_flight.ctx.incr("shared.unavailable")
            return self.fallback.acquire(place, in_flight)
        if answer > 0:
            self._granted(in_flight, ident, client, answer)
            return 0.0
        if answer < 0:
            raise queue_full(self.backend.name, mine=answer == -2)
        wake = threading.Event()
        self.places[ident] = client
        self.shared.waiting[ident] = wake
        in_flight.wake = wake.set
        deadline = start + self.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or in_flight.stopped is not None:
                    break
                wake.wait(min(left, POLL))
                wake.clear()
                if in_flight.stopped is not None:
                    break
                answer = self._ask("acquire", args)
                if answer > 0:
                    self._granted(in_flight, ident, client, answer)
                    return time.monotonic() - start
        except SharedUnavailable:
            # Our place lapses by itself; wait the rest of the time in this worker's own queue.
            in_flight.ctx.incr("shared.unavailable")
            in_flight.wake = None
            self.places.pop(ident, None)
            self.shared.waiting.pop(ident, None)
            waited = time.monotonic() - start
            return waited + self.fallback.acquire(place, in_flight)
        except BaseException:
            self._give_back(ident, client)
            raise
        finally:
            in_flight.wake = None
            self.places.pop(ident, None)
            self.shared.waiting.pop(ident, None)
        self._give_back(ident, client)  # a slot may have reached it meanwhile: it passes on
        stopped = in_flight.stopped
        if stopped is not None:
            raise stopped
        raise queue_timeout(self.backend.name, self.timeout)

    def _give_back(self, ident: str, client: str) -> None:
        try:
            self._ask("release", [ident, client, int(self.shared.config.lease * 1000)])
        except SharedUnavailable:
            pass  # the lease or the place lapses by itself

    def release(self, in_flight: Admitted | None = None) -> None:
        held = self.held.pop(in_flight, None) if in_flight is not None else None
        if held is None:
            self.fallback.release()
            return
        ident, client, _ = held
        self._give_back(ident, client)

    def refresh(self) -> None:
        """Renew this worker's leases (writing back any Redis lost) and places (the
        heartbeat); hands out slots that lapsed meanwhile."""
        lease_ms = int(self.shared.config.lease * 1000)
        slots = [part for ident, _, replica in list(self.held.values()) for part in (ident, replica)]
        self._ask("refresh", [lease_ms, lease_ms, *slots, "", *self.places])
