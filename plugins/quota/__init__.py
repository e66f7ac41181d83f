"""quota: tokens per day and per month, and requests per day, per client, in Redis.

The limits come from the config (every key), then the caller's role (``roles``),
then the key's own ``limits`` (``tokens_per_day``, ``tokens_per_month``,
``requests_per_day``: a keys file or the keys database). Every key of a client
shares the client's counters (rotating a key does not reset them). Days and months
are UTC.

Before a request runs it reserves, in one atomic Redis script over all of its
counters, one request and its token budget (:func:`gateway.answers.token_bound`):
``max_tokens`` (or ``n_predict``, ``max_completion_tokens``; ``reserve_tokens`` when
it names none) for each of its answers (``n`` times the prompts of a prompt list;
none on routes that generate nothing, such as embeddings) plus a bound on its
prompts (a token per byte of body). When any counter would pass its limit, the
request is refused with 429 ``quota_exceeded``, ``Retry-After`` the seconds to the
reset, and nothing is reserved. Concurrent requests of one client, on any worker or
host, reserve in turn, so they cannot race past the limit together. When the request
completes, the reservation is replaced by the answer's real ``total_tokens``; a
request that failed before the backend started is charged no tokens, and one left
early while the backend generated keeps its reservation. ``x-quota-*`` headers
(limit, remaining, reset of each counter) go on every answer of a client with a quota.
Only requests for a model count (not ``/v1/models`` or the usage API: a client over
its quota can still read its usage).

A request without a token budget reserves ``reserve_tokens`` and may use more: its
real use is charged, and the client's next request is refused; set ``max_tokens``
(or the validate plugin's ``default_max_tokens``) for a strict bound. The counters
live in Redis (exact across workers and hosts); the ledger plugin keeps the record.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

from gateway.plugin import RateLimitError, ServiceUnavailableError, choices_asked, hookimpl, token_bound, total_tokens

log = logging.getLogger("llamagate")
WINDOWS = (  # (limit name, counted, window)
    ("tokens_per_day", "tokens", "day"),
    ("tokens_per_month", "tokens", "month"),
    ("requests_per_day", "requests", "day"),
)
# Check every counter, then charge them all, atomically: KEYS the counters, ARGV per
# counter its limit, cost and time to live (seconds). Returns {1, used...} or
# {0, index of the refusing counter, its use}.
_RESERVE_LUA = """
local n = #KEYS
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
    return {0, i, used}
  end
end
local result = {1}
for i = 1, n do
  result[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[3 * i], 'NX')
end
return result
"""
# Replace a reservation by the real cost: KEYS the counters, ARGV per counter the
# difference and time to live.
_SETTLE_LUA = """
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * i], 'NX')
end
return 1
"""


def clock() -> float:
    """Seconds since the epoch: the quota's days and months. (Tests shift it.)"""
    return time.time()


def window_of(window: str, now: float) -> tuple[str, float]:
    """The UTC day or month ``now`` falls in, and the seconds until it ends."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    if window == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        length = 86400.0
        label = start.strftime("%Y-%m-%d")
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        length = calendar.monthrange(start.year, start.month)[1] * 86400.0
        label = start.strftime("%Y-%m")
    return label, start.timestamp() + length - now


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        import redis

        self.defaults = {name: config[name] for name, _, _ in WINDOWS}
        self.roles = config["roles"]
        self.reserve_tokens = config["reserve_tokens"]
        self.fail_open = config["fail_open"]
        self.prefix = "llamagate:quota:"
        self.redis_errors = (redis.RedisError, OSError)
        client = redis.Redis.from_url(config["redis_url"], socket_timeout=config["timeout"],
                                      socket_connect_timeout=config["timeout"])
        self.reserve_script = client.register_script(_RESERVE_LUA)
        self.settle_script = client.register_script(_SETTLE_LUA)

    def limits(self, principal: Any) -> dict[str, int]:
        limits = dict(self.defaults)
        limits.update(self.roles.get(principal.role, {}))
        limits.update({k: v for k, v in principal.limits.items()
                       if k in limits and type(v) is int and v >= 1})
        return {name: value for name, value in limits.items() if value is not None}

    def counters(self, client: str, limits: dict[str, int], now: float) -> list[tuple[str, str, int, float]]:
        """(limit name, Redis key, limit, seconds to reset) of each counter in force."""
        found = []
        for name, counted, window in WINDOWS:
            if name in limits:
                label, reset = window_of(window, now)
                found.append((name, f"{self.prefix}{client}:{counted}:{label}", limits[name], reset))
        return found

    def store_down(self, ctx: Any, exc: BaseException) -> None:
        ctx.incr("quota.store_unavailable")
        if not self.fail_open:
            raise ServiceUnavailableError("The quota store is unreachable; try again shortly.",
                                          headers={"Retry-After": "1"}) from None
        ctx.log(logging.WARNING, "quota store unreachable, letting the request through: %s", exc)

    @hookimpl
    def request(self, ctx):
        principal = ctx.principal
        if principal is None or ctx.model is None:
            return  # only requests for a model count: a client over its quota still reads its usage
        limits = self.limits(principal)
        if not limits:
            return  # a key without a quota costs no Redis round trip
        counters = self.counters(principal.client_id, limits, clock())
        reserved = token_bound(ctx.route, ctx.body, ctx.bytes_in, self.reserve_tokens)
        costs = [reserved if name.startswith("tokens") else 1 for name, _, _, _ in counters]
        args: list[Any] = []
        for (_, _, limit, reset), cost in zip(counters, costs):
            args += [limit, cost, math.ceil(reset) + 3600]
        try:
            result = self.reserve_script(keys=[key for _, key, _, _ in counters], args=args)
        except self.redis_errors as exc:
            self.store_down(ctx, exc)
            return
        if result[0] == 1:
            used = [int(u) for u in result[1:]]
            ctx.state["quota"] = (counters, reserved)
        else:
            used = [None] * len(counters)
            used[int(result[1]) - 1] = int(result[2])
        for (name, _, limit, reset), spent in zip(counters, used):
            label = name.replace("_per_", "-")
            ctx.response_headers[f"x-quota-limit-{label}"] = str(limit)
            if spent is not None:
                ctx.response_headers[f"x-quota-remaining-{label}"] = str(max(0, limit - spent))
            ctx.response_headers[f"x-quota-reset-{label}"] = str(math.ceil(reset))
        if result[0] != 1:
            name, _, limit, reset = counters[int(result[1]) - 1]
            spent, cost = int(result[2]), costs[int(result[1]) - 1]
            what = name.replace("_", " ")
            answers = choices_asked(ctx.body)[0]
            budget = "its max_tokens" if answers == 1 else f"its max_tokens for each of its {answers} answers"
            detail = (f"this request may use up to {cost} tokens ({budget} and its prompt), and {spent} of "
                      f"{limit} are used" if name.startswith("tokens") else f"{spent} of {limit} are used")
            raise RateLimitError(f"Quota exceeded: {what} ({detail}); it resets in {math.ceil(reset)} s.",
                                 code="quota_exceeded", headers={"Retry-After": str(max(1, math.ceil(reset)))})

    @hookimpl
    def complete(self, ctx, outcome):
        charge = ctx.state.get("quota")
        if not charge:
            return
        counters, reserved = charge
        total = total_tokens(ctx.usage) if ctx.usage else None
        if total is None:
            # No usage: left early while the backend generated keeps the reservation
            # (else leaving just before the end would be free); never started: free.
            total = reserved if ctx.sent else 0
        delta = total - reserved
        if delta == 0:
            return
        keys, args = [], []
        for name, key, _, reset in counters:
            if name.startswith("tokens"):
                keys.append(key)
                args += [delta, math.ceil(reset) + 3600]
        try:
            self.settle_script(keys=keys, args=args)
        except self.redis_errors as exc:
            ctx.incr("quota.store_unavailable")
            ctx.log(logging.ERROR, "quota store unreachable, %d tokens not settled: %s", delta, exc)
