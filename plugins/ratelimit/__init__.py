"""ratelimit: requests and tokens per minute per client.

Requests are charged when they arrive. Tokens are charged from the answer's real
``usage`` when the request completes (the gateway asks llama-server for usage on
streams too); a client over its token budget is refused until the budget refills.
Budgets are per pipeline: a client on two pipelines has each one's (the store is
shared, so its keys name the pipeline). Limits come from the config, then the
caller's role (``roles``), then the key's own
``limits`` (only integers >= 1 count there: a key's null, zero or malformed limit
leaves the role's in force, never lifts it). The OpenAI ``x-ratelimit-*`` headers go
on every answer; a refusal is a 429 ``rate_limit_exceeded`` with ``Retry-After``.

Requests without a principal are limited per address: the peer's, or, when the peer is
one of ``trusted_proxies``, the nearest untrusted address of ``X-Forwarded-For``
(never the header of an untrusted peer, which anyone can write). The usage charged is
the answer's ``total_tokens`` when it is a number >= 0, at most 100 minutes' worth; a
request that the client left (or cancelled) while the backend generated, so that no
usage came, is charged its token budget (``max_tokens`` and the like, times its
answers: ``n`` times the prompts of a prompt list; a minute's tokens when it has none).
A prompt list's usage is summed over its answers.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from typing import Any

from gateway.plugin import (
    Decision,
    RateLimitError,
    ServiceUnavailableError,
    StoreUnavailable,
    completion_bound,
    current_settings,
    hookimpl,
    make_store,
    total_tokens,
)

log = logging.getLogger("llamagate")
PERIOD = 60.0
KINDS = (("requests", "requests_per_minute"), ("tokens", "tokens_per_minute"))
MAX_CHARGE_MINUTES = 100  # the most debt one answer's usage can put on a client


def valid_limit(value: Any) -> bool:
    return type(value) is int and value >= 1


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
        workers = current_settings().workers
        if config["store"] == "memory" and workers > 1 and not config["per_worker"]:
            raise ValueError(f"store: memory keeps limits per worker process, and GATEWAY_WORKERS={workers}: "
                             "use store: redis, or set per_worker: true to accept per-worker limits")
        self.defaults = {name: config[name] for _, name in KINDS}
        self.roles = config["roles"]
        self.fail_open = config["fail_open"]
        try:
            self.trusted_proxies = [ipaddress.ip_network(net, strict=False) for net in config["trusted_proxies"]]
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        self.store = make_store(config, "ratelimit")

    def limits(self, principal) -> dict[str, int | None]:
        limits = dict(self.defaults)
        if principal is not None:
            limits.update(self.roles.get(principal.role, {}))
            # A key's own limits only tighten or loosen within numbers: a null, zero or
            # malformed one (a typo in a keys file, another auth plugin) is ignored.
            limits.update({k: v for k, v in principal.limits.items() if k in limits and valid_limit(v)})
        return limits

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def client_address(self, ctx) -> str:
        """The address an unauthenticated request is limited by."""
        address = ctx.remote_addr
        if not self.trusted_proxies or not self._trusted(address):
            return address
        forwarded = ctx.headers.get("X-FORWARDED-FOR") or ""
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return address  # a garbled chain: limit the proxy itself
            if not self._trusted(hop):
                return hop
        return address

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
        # Limits are a pipeline's: the same client on two pipelines has each one's budget
        # (memory and Redis stores are shared by every pipeline, so the key says which).
        client = (f"{ctx.pipeline}:" + (ctx.principal.client_id if ctx.principal
                                        else f"addr:{self.client_address(ctx)}"))
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
        if not charge or charge[1] is None:
            return
        client, tokens_per_minute = charge
        if ctx.usage:
            total = total_tokens(ctx.usage)
            if total is None:
                ctx.log(logging.WARNING, "ratelimit: the backend's usage has no sane total_tokens; nothing charged")
                return
        elif outcome in ("client_gone", "cancelled") and ctx.sent:
            # The backend was generating when the client left (or cancelled): the usage
            # never came (a plain answer in another shape than OpenAI's is not streamed
            # from llama-server, which generates it to its end for nobody). Charge the
            # request's token budget, else leaving just before the end would make every
            # generation free of the token limit.
            total = completion_bound(ctx.route, ctx.body) or tokens_per_minute
        else:
            return
        total = min(total, MAX_CHARGE_MINUTES * tokens_per_minute)
        if total > 1:
            self._throttle(ctx, f"tokens:{client}", tokens_per_minute, total - 1, force=True)
