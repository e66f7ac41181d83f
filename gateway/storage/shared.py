"""What every worker and host of one gateway shares through Redis (``shared:`` in the
config): cancels, the status, and admission to backends with ``admission: redis``.

Nothing here is on a request's path unless the request asks for it (a cancel, a status,
a shared admission): each worker runs two background greenlets,

* a listener subscribed to the gateway's cancel channel and to its own wake channel:
  a cancel another worker broadcasts is tried on this worker's requests (with the
  caller's identity, so the same ownership rules hold) and answered on the asker's
  reply list; a wake tells a queued request that Redis granted it a slot;
* a heartbeat that, every ``status_interval`` seconds, stores this worker's status
  snapshot (living three intervals: a dead worker drops out of the status; it lists
  the worker's requests in flight for the console), adds what the worker counted since
  the last beat to the gateway's per-minute traffic and its list of latest errors (in
  the same round trip), and refreshes the leases of the slots it holds and the places
  of its queued requests (a worker killed -9 gives them back within ``lease`` seconds).

Redis unreachable: cancels and the status keep to this worker, shared admission falls
back to the worker's own (:class:`gateway.backends.admission.SharedAdmission`); it is logged once per outage and
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
from typing import Any, Callable, Protocol

import redis

from ..config import SharedConfig
from ..context import Principal
from ..errors import LlamagateError

log = logging.getLogger("llamagate")

RETRY_AFTER = 1.0  # seconds before a Redis found unreachable is tried again
REPLY_WAIT = 2.0  # seconds a cancel waits for the other workers' answers
TRAFFIC_TTL = 2 * 3600  # seconds a minute's traffic totals are kept
ERRORS_KEPT = 50  # the latest errors kept, of every worker


class SharedUnavailable(LlamagateError):
    """Redis could not be reached; the caller falls back to this worker alone."""


class Counted(Protocol):
    """What counts a worker's traffic (:class:`gateway.web.stats.Traffic`): handed over
    each beat, given back when Redis could not take it."""

    def take(self) -> tuple[dict[int, dict[str, int]], list[dict[str, Any]]]: ...

    def restore(self, minutes: dict[int, dict[str, int]], errors: list[dict[str, Any]]) -> None: ...


class Served(Protocol):
    """What the link asks of the configuration in force (:class:`gateway.web.state.Gateway`):
    the cancels other workers broadcast, this worker's status snapshot and its traffic."""

    traffic: Counted

    def cancel(self, request_id: str, caller: Principal | None) -> int: ...

    def cancel_backend(self, backend: str) -> int: ...

    def snapshot(self, worker: str) -> dict[str, Any]: ...


class Refreshing(Protocol):
    """What holds leases in Redis (:class:`gateway.backends.admission.SharedAdmission`): renewed
    every heartbeat."""

    def refresh(self) -> None: ...


class Shared:
    """One worker's link to the gateway's shared Redis. One per process, so that it
    outlives reloads (:class:`gateway.web.state.Carried`).

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
        self.refreshing: weakref.WeakSet[Refreshing] = weakref.WeakSet()
        self._ids = itertools.count()
        self._down_until = 0.0
        self._down = False
        self._served: Callable[[], Served | None] = lambda: None
        self._stop = threading.Event()
        self._started = False
        self._scripts: dict[str, Any] = {}  # Lua text -> the script registered (run by its SHA)

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

    def script(self, text: str, keys: list[str], args: list[Any]) -> Any:
        """Run the Lua ``text``; SharedUnavailable when Redis cannot be reached."""
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self.client.register_script(text)
        return self.call(script, keys=keys, args=args)

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
        served = self._served()
        if served is not None and message["skip"] != self.worker:
            if message["backend"] is not None:
                count = served.cancel_backend(message["backend"])
            else:
                caller = message["caller"]
                principal = None if caller is None else Principal(client_id=caller["client_id"], role=caller["role"])
                count = served.cancel(message["request_id"], principal)
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

    def traffic(self, first: int, last: int) -> dict[int, dict[str, int]]:
        """The gateway's traffic totals (every worker's) of the epoch minutes ``first`` to
        ``last``, the minutes with any.

        Raises:
            SharedUnavailable: Redis could not be reached.
        """
        pipe = self.client.pipeline(transaction=False)
        for minute in range(first, last + 1):
            pipe.hgetall(f"{self.prefix}minute:{minute}")
        found = self.call(pipe.execute)
        return {minute: {k.decode(): int(v) for k, v in counts.items()}
                for minute, counts in zip(range(first, last + 1), found) if counts}

    def recent_errors(self) -> list[dict[str, Any]]:
        """The gateway's latest errors (every worker's), newest first.

        Raises:
            SharedUnavailable: Redis could not be reached.
        """
        return [json.loads(e) for e in self.call(self.client.lrange, self.prefix + "errors", 0, ERRORS_KEPT - 1)]

    def _publish_status(self, snapshot: dict[str, Any], traffic: Counted) -> None:
        ttl_ms = int(self.config.status_interval * 3000)
        now_ms = int(time.time() * 1000)
        index = self.prefix + "workers"
        pipe = self.client.pipeline(transaction=True)  # the traffic is added once or not at all
        pipe.set(self.prefix + "worker:" + self.worker, json.dumps(snapshot), px=ttl_ms)
        pipe.zadd(index, {self.worker: now_ms + ttl_ms})
        pipe.zremrangebyscore(index, "-inf", now_ms - 60_000)  # host clocks differ: the snapshot's TTL decides
        minutes, errors = traffic.take()
        for minute, counts in minutes.items():
            key = f"{self.prefix}minute:{minute}"
            for field, count in counts.items():
                if count:
                    pipe.hincrby(key, field, count)
            pipe.expire(key, TRAFFIC_TTL)
        if errors:
            pipe.lpush(self.prefix + "errors", *(json.dumps(dict(e, worker=self.worker)) for e in errors))
            pipe.ltrim(self.prefix + "errors", 0, ERRORS_KEPT - 1)
        try:
            self.call(pipe.execute)
        except SharedUnavailable:
            traffic.restore(minutes, errors)
            raise

    # --- the background greenlets ---------------------------------------------------------------

    def start(self, served: Callable[[], Served | None]) -> None:
        """Start listening and the heartbeat; ``served`` gives the configuration in force."""
        self._served = served
        if self._started:
            return
        self._started = True
        threading.Thread(target=self._listen, name="llamagate-shared-listen", daemon=True).start()
        threading.Thread(target=self._beat, name="llamagate-shared-beat", daemon=True).start()

    def stop(self) -> None:
        """Stop the greenlets for good (a reload named another Redis)."""
        self._stop.set()

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
            served = self._served()
            try:
                for holder in list(self.refreshing):
                    holder.refresh()
                if served is not None:
                    self._publish_status(served.snapshot(self.worker), served.traffic)
            except SharedUnavailable:
                pass
            except Exception:
                log.exception("shared heartbeat")
