"""ratelimit: requests and tokens per minute per client.

Requests are charged when they arrive. Tokens are charged from the answer's real
``usage`` when the request completes (the gateway asks llama-server for usage on
streams too); a client over its token budget is refused until the budget refills.
Limits come from the config, then the caller's role (``roles``), then the key's own
``limits``. The OpenAI ``x-ratelimit-*`` headers go on every answer; a refusal is a
429 ``rate_limit_exceeded`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from gateway import RateLimitError, ServiceUnavailableError, hookimpl
from gateway.stores import Decision, StoreUnavailable, make_store

log = logging.getLogger("llamagate")
PERIOD = 60.0
KINDS = (("requests", "requests_per_minute"), ("tokens", "tokens_per_minute"))


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{text}s" if minutes else f"{text}s"


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        workers = int(os.environ.get("GATEWAY_WORKERS", "1"))
        if config["store"] == "memory" and workers > 1 and not config["per_worker"]:
            raise ValueError(f"store: memory keeps limits per worker process, and GATEWAY_WORKERS={workers}: "
                             "use store: redis, or set per_worker: true to accept per-worker limits")
        self.defaults = {name: config[name] for _, name in KINDS}
        self.roles = config["roles"]
        self.fail_open = config["fail_open"]
        self.store = make_store(config, "ratelimit")

    def limits(self, principal) -> dict[str, int | None]:
        limits = dict(self.defaults)
        if principal is not None:
            limits.update(self.roles.get(principal.role, {}))
            limits.update({k: v for k, v in principal.limits.items() if k in limits})
        return limits

    def _throttle(self, ctx, key: str, limit: int, cost: int, force: bool = False) -> Decision | None:
        try:
            return self.store.throttle(key, limit, PERIOD, cost, force)
        except StoreUnavailable as exc:
            ctx.incr("ratelimit.store_unavailable")
            if not self.fail_open:
                raise ServiceUnavailableError("The rate limiter's store is unreachable; try again shortly.",
                                              headers={"Retry-After": "1"}) from None
            ctx.log(logging.WARNING, "ratelimit store unreachable, letting the request through: %s", exc)
            return None

    @hookimpl
    def request(self, ctx):
        client = ctx.principal.client_id if ctx.principal else f"addr:{ctx.remote_addr}"
        limits = self.limits(ctx.principal)
        ctx.state["ratelimit"] = (client, limits["tokens_per_minute"])
        refused = None
        for kind, name in KINDS:
            limit = limits[name]
            if limit is None:
                continue
            # Tokens: reserve one now to see whether any budget is left; the rest
            # is charged from the answer's usage.
            decision = self._throttle(ctx, f"{kind}:{client}", limit, 1)
            if decision is None:
                continue
            ctx.response_headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            ctx.response_headers[f"x-ratelimit-remaining-{kind}"] = str(decision.remaining)
            ctx.response_headers[f"x-ratelimit-reset-{kind}"] = duration(decision.reset_after)
            if not decision.allowed and refused is None:
                refused = (kind, limit, decision)
        if refused is not None:
            kind, limit, decision = refused
            ctx.state["ratelimit"] = None  # nothing to charge for a refused request
            raise RateLimitError(
                f"Rate limit reached for {kind} per minute (limit {limit}); try again in {duration(decision.retry_after)}.",
                headers={"Retry-After": str(max(1, math.ceil(decision.retry_after)))})

    @hookimpl
    def complete(self, ctx, outcome):
        charge = ctx.state.get("ratelimit")
        if not charge or charge[1] is None or not ctx.usage:
            return
        client, tokens_per_minute = charge
        total = int(ctx.usage.get("total_tokens") or 0)
        if total > 1:
            self._throttle(ctx, f"tokens:{client}", tokens_per_minute, total - 1, force=True)
