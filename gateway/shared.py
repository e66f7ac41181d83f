"""What every worker and host of one gateway shares through Redis (``shared:`` in the
config): cancels, the status, and admission to backends with ``admission: redis``.

Nothing here is on a request's path unless the request asks for it (a cancel, a status,
a shared admission): each worker runs two background greenlets,

* a listener subscribed to the gateway's cancel channel and to its own wake channel:
  a cancel another worker broadcasts is tried on this worker's requests (with the
  caller's identity, so the same ownership rules hold) and answered on the asker's
  reply list; a wake tells a queued request that Redis granted it a slot;
* a heartbeat that, every ``status_interval`` seconds, stores this worker's status
  snapshot (living three intervals: a dead worker drops out of the status) and
  refreshes the leases of the slots it holds and the places of its queued requests
  (a worker killed -9 gives them back within ``lease`` seconds).

Redis unreachable: cancels and the status keep to this worker, shared admission falls
back to the worker's own (:class:`SharedAdmission`); it is logged once per outage and
counted on the requests it touches (``shared.unavailable``), and Redis is tried again
after :data:`RETRY_AFTER` seconds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable

import redis

from . import settings
from .config import SharedConfig
from .context import Principal
from .errors import LlamagateError, queue_full, queue_timeout
from .turns import QueuePlace, client_places
if TYPE_CHECKING:
    from .state import Gateway
    from .upstream import Admission, Backend, InFlight

log = logging.getLogger("llamagate")

RETRY_AFTER = 1.0  # seconds before a Redis found unreachable is tried again
REPLY_WAIT = 2.0  # seconds a cancel waits for the other workers' answers
POLL = 1.0  # seconds between a queued request's looks at Redis, should its wake be lost
RANK_SPAN = 1e12  # queue scores: rank * RANK_SPAN + turn (exact in a double up to rank ~9000)


class SharedUnavailable(LlamagateError):
    """Redis could not be reached; the caller falls back to this worker alone."""


class Shared:
    """One worker's link to the gateway's shared Redis. One per process and config
    (:func:`connect`), so that it outlives reloads.

    Args:
        config: The ``shared:`` config.
    """

    def __init__(self, config: SharedConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.worker = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        timeout = 0.5  # a slow Redis must not hold requests for long
        self.client = redis.Redis.from_url(config.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        # BLPOP waits longer than a command may take on the main client
        self.blocking = redis.Redis.from_url(config.redis_url, socket_timeout=REPLY_WAIT + 1,
                                             socket_connect_timeout=timeout)
        self.listener_client = redis.Redis.from_url(config.redis_url, socket_timeout=None,
                                                    socket_connect_timeout=timeout)
        self.cancel_channel = self.prefix + "cancel"
        self.wake_channel = self.prefix + "wake:" + self.worker
        self.waiting: dict[str, threading.Event] = {}  # queued ids of this worker -> their wake
        self.admissions: weakref.WeakSet[SharedAdmission] = weakref.WeakSet()
        self._ids = itertools.count()
        self._down_until = 0.0
        self._down = False
        self._gateway: Callable[[], Gateway | None] = lambda: None
        self._stop = threading.Event()
        self._started = False
        self._scripts = {name: self.client.register_script(text) for name, text in _SCRIPTS.items()}

    # --- Redis calls, with the fallback ---------------------------------------------------------

    @property
    def up(self) -> bool:
        """Worth asking Redis: not found unreachable in the last :data:`RETRY_AFTER` seconds."""
        return time.monotonic() >= self._down_until

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` against Redis; SharedUnavailable when it cannot be reached."""
        if not self.up:
            raise SharedUnavailable("redis: down")
        try:
            result = fn(*args, **kwargs)
        except redis.ResponseError:
            raise  # Redis answered: a bug here, not an outage
        except (redis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + RETRY_AFTER
            if not self._down:
                self._down = True
                log.warning("shared redis unreachable (%s): cancels and status keep to this worker, "
                            "shared admission falls back to this worker's own", type(exc).__name__)
            raise SharedUnavailable(f"redis: {type(exc).__name__}") from None
        if self._down:
            self._down = False
            log.warning("shared redis reachable again: shared admission, cancels and status resume")
        return result

    def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self.call(self._scripts[name], keys=keys, args=args)

    def new_id(self) -> str:
        """A queue or slot id unique to this worker; the part before the last / names it."""
        return f"{self.worker}/{next(self._ids)}"

    # --- cancel ---------------------------------------------------------------------------------

    def cancel(self, caller: Principal | None, request_id: str | None = None, backend: str | None = None,
               done_here: bool = False) -> int:
        """Broadcast a cancel to every worker and wait for their answers: how many requests
        they cancelled. With ``done_here`` this worker already did its part.

        Raises:
            SharedUnavailable: Redis could not be reached.
        """
        reply = f"{self.prefix}reply:{uuid.uuid4().hex}"
        message = json.dumps({"request_id": request_id, "backend": backend, "reply": reply,
                              "skip": self.worker if done_here else None,
                              "caller": None if caller is None else {"client_id": caller.client_id,
                                                                     "role": caller.role}})
        receivers = self.call(self.client.publish, self.cancel_channel, message)
        cancelled = 0
        deadline = time.monotonic() + REPLY_WAIT
        for answered in range(receivers):
            left = deadline - time.monotonic()
            answer = self.call(self.blocking.blpop, [reply], timeout=left) if left > 0 else None
            if answer is None:
                log.warning("a cancel got %d of %d workers' answers in %g s", answered, receivers, REPLY_WAIT)
                break
            cancelled += int(answer[1])
        return cancelled

    def _on_cancel(self, data: bytes) -> None:
        """Another worker's (or this one's) broadcast cancel: try it here, answer."""
        message = json.loads(data)
        count = 0
        gateway = self._gateway()
        if gateway is not None and message["skip"] != self.worker:
            if message["backend"] is not None:
                count = gateway.cancel_backend(message["backend"])
            else:
                caller = message["caller"]
                principal = None if caller is None else Principal(client_id=caller["client_id"], role=caller["role"])
                count = gateway.cancel(message["request_id"], principal)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(message["reply"], count)
        pipe.pexpire(message["reply"], int(REPLY_WAIT * 2000))
        pipe.execute()

    # --- status ---------------------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Every live worker's last snapshot, in worker order.

        Raises:
            SharedUnavailable: Redis could not be reached.
        """
        index = self.prefix + "workers"
        now_ms = int(time.time() * 1000)
        ids = self.call(self.client.zrangebyscore, index, now_ms, "+inf")
        if not ids:
            return []
        snapshots = self.call(self.client.mget, [self.prefix + "worker:" + i.decode() for i in ids])
        return sorted((json.loads(s) for s in snapshots if s is not None), key=lambda s: s["worker"])

    def _publish_status(self, snapshot: dict[str, Any]) -> None:
        ttl_ms = int(self.config.status_interval * 3000)
        now_ms = int(time.time() * 1000)
        index = self.prefix + "workers"
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.prefix + "worker:" + self.worker, json.dumps(snapshot), px=ttl_ms)
        pipe.zadd(index, {self.worker: now_ms + ttl_ms})
        pipe.zremrangebyscore(index, "-inf", now_ms - 60_000)  # host clocks differ: the snapshot's TTL decides
        self.call(pipe.execute)

    # --- the background greenlets ---------------------------------------------------------------

    def start(self, gateway: Callable[[], Gateway | None]) -> None:
        """Start listening and the heartbeat; ``gateway`` gives the configuration in force."""
        self._gateway = gateway
        if self._started:
            return
        self._started = True
        threading.Thread(target=self._listen, name="llamagate-shared-listen", daemon=True).start()
        threading.Thread(target=self._beat, name="llamagate-shared-beat", daemon=True).start()

    def stop(self) -> None:
        """Stop the greenlets for good (a reload named another Redis): a later
        :func:`connect` with this config makes a new one."""
        self._stop.set()
        with _lock:
            if _connections.get(self.config) is self:
                del _connections[self.config]

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self.listener_client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.cancel_channel, self.wake_channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"].decode() == self.cancel_channel:
                        self._on_cancel(message["data"])
                    else:
                        event = self.waiting.get(message["data"].decode())
                        if event is not None:
                            event.set()
            except (redis.RedisError, OSError):
                self._stop.wait(RETRY_AFTER)  # the heartbeat logs the outage
            except Exception:  # a malformed message must not end the listening
                log.exception("shared listener")
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def _beat(self) -> None:
        while not self._stop.wait(self.config.status_interval):
            gateway = self._gateway()
            try:
                for admission in list(self.admissions):
                    admission.refresh()
                if gateway is not None:
                    self._publish_status(gateway.snapshot(self.worker))
            except SharedUnavailable:
                pass
            except Exception:
                log.exception("shared heartbeat")


_connections: dict[SharedConfig, Shared] = {}
_lock = threading.Lock()


def connect(config: SharedConfig) -> Shared:
    """This process's :class:`Shared` for ``config``: the same one across reloads."""
    with _lock:
        shared = _connections.get(config)
        if shared is None:
            shared = _connections[config] = Shared(config)
        return shared


# --- shared admission ----------------------------------------------------------------------------
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

_SCRIPTS = {
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
    """:class:`gateway.upstream.Admission`'s surface over the slots and queue in Redis:
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

    def __init__(self, backend: Backend, shared: Shared, fallback: Admission) -> None:
        self.backend = backend
        self.shared = shared
        self.fallback = fallback
        self.held: dict[InFlight, tuple[str, str, int]] = {}  # this worker's slots: (id, client, replica + 1)
        self.places: dict[str, str] = {}  # this worker's queued ids -> client
        shared.admissions.add(self)

    @property
    def max_queue(self) -> int:
        return self.fallback.max_queue

    @property
    def timeout(self) -> float:
        return self.fallback.timeout

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
        return self.shared.script(name, [self._key()],
                                  [self.shared.prefix + "wake:", ",".join(map(str, slots)), settle_ms, *args])

    def _granted(self, in_flight: InFlight, ident: str, client: str, replica: int) -> None:
        """A slot on the backend's replica number ``replica`` (from 1): the request goes there."""
        self.held[in_flight] = (ident, client, replica)
        in_flight.replica = self.backend.replicas[replica - 1] if replica <= len(self.backend.replicas) else None

    def acquire(self, place: QueuePlace, in_flight: InFlight | None = None) -> float:
        """Take a slot, waiting in the shared queue if need be; see ``Admission.acquire``."""
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

    def release(self, in_flight: InFlight | None = None) -> None:
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
