"""router: picks the replica of the model's backend.

Replicas whose last background health check failed (llama-server answers 503
while it loads a model) or whose circuit breaker is open are skipped; among the
rest, ``least_in_flight`` takes the one with the fewest requests in flight, ties in
the gateway's own round-robin order (``BackendView.candidates()``: one rotation for
the whole gateway), and ``round_robin`` the next in that order. ``prefix_affinity``
sends the turns of one conversation to the same replica and asks for the same
llama-server slot (``ctx.slot_hint``), whose KV cache still holds their common prefix,
unless that replica already has more than its share of requests in flight
(:mod:`plugins.router.affinity`). Whether the slot's cache may be reused is the core's
decision (``gateway.backends.slots``: only the tenant that used the slot last, by the backend's
``kv_sharing``); the conversation's key is scoped the same way.
The gateway fails over to the other replicas when the chosen one refuses the
connection, before any byte was sent.

``ctx.routing`` says how the replica was chosen (``affinity``, ``spill``, ``load``,
``turn``); ``router.<routing>`` is counted for the metrics plugin.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.plugin import conversation_key, hookimpl

from .affinity import SlotTable, within_bounds

# The routes whose prompts llama-server caches in the slot the gateway names (on
# /v1/messages it places the request itself, so keying it would gain nothing).
PROMPT_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/completion", "/infill")


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.strategy = config["strategy"]
        self.load_factor = config["load_factor"]
        self.prefix_chars = config["prefix_chars"]
        self.pin_slots = config["pin_slots"]
        self.slot_ttl = config["slot_ttl"]
        self.tables: dict[str, SlotTable] = {}  # replica URL -> this worker's slot hint

    @hookimpl
    def route(self, ctx, backends):
        backend = backends.get(ctx.backend)
        if backend is None:
            return None
        ready = backend.candidates()
        if not ready:
            return None  # let the gateway try them all: one may have come back
        if self.strategy == "round_robin":
            return self._routed(ctx, "turn", ready[0])
        scope = backend.kv_scope(ctx.principal)
        key = self._key(ctx, scope) if self.strategy == "prefix_affinity" else None
        if key is None:
            return self._routed(ctx, "load", min(ready, key=lambda replica: replica.in_flight))
        # Ranked over every configured replica, so that a replica going down moves only its
        # own conversations, and those count as spilled.
        replicas = backend.replicas
        slots = [replica.slots for replica in replicas]
        weights = slots if all(slots) else [1] * len(replicas)  # weigh by slots once every count is known
        fitting, first = within_bounds(key, [replica.url for replica in replicas],
                                       [replica.in_flight for replica in replicas], weights, self.load_factor,
                                       [replica in ready for replica in replicas])
        index = self._with_a_slot(key, [replicas[i] for i in fitting]) if self.pin_slots else 0
        chosen = replicas[fitting[index]]
        if self.pin_slots and chosen.slots:
            self._pin(ctx, key, scope, chosen)
        return self._routed(ctx, "affinity" if fitting[index] == first else "spill", chosen)

    @hookimpl
    def complete(self, ctx, outcome):
        pinned = ctx.state.get("router")
        if pinned is not None:
            url, slot = pinned
            table = self.tables.get(url)
            if table is not None and slot < len(table):
                table.release(slot, time.monotonic())

    def _key(self, ctx, scope: str) -> bytes | None:
        if ctx.route not in PROMPT_ROUTES:
            return None
        return conversation_key(ctx.body, ctx.route, ctx.model or "", scope, self.prefix_chars)

    def _with_a_slot(self, key: bytes, fitting: list) -> int:
        """Of the replicas within their bound, in the key's order: the first where the
        conversation holds a slot, else the first with a slot no live conversation holds,
        else the first (more live conversations than slots there). With no conflict
        known, that is the first: what every worker chooses."""
        if len(fitting) == 1:  # the first, whatever the tables say
            return 0
        now = time.monotonic()
        tables = [self.tables.get(replica.url) for replica in fitting]
        for i, table in enumerate(tables):
            if table is not None and table.holds(key):
                return i
        for i, table in enumerate(tables):
            if table is None or table.has_room(now, self.slot_ttl):
                return i
        return 0

    def _pin(self, ctx, key: bytes, scope: str, replica) -> None:
        """Choose the replica's slot for this conversation, as the core's hint."""
        table = self.tables.get(replica.url)
        if table is None or len(table) != replica.slots:
            table = self.tables[replica.url] = SlotTable(replica.slots)
        now = time.monotonic()
        slot = table.choose(key, scope, now, self.slot_ttl)
        if slot is not None:
            table.take(slot, key, scope, now)
            ctx.state["router"] = (replica.url, slot)
            ctx.slot_hint = slot

    @staticmethod
    def _routed(ctx, how: str, replica):
        ctx.routing = how
        ctx.incr(f"router.{how}")
        return replica
