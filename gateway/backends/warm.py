"""An attempt's slot on a replica (:mod:`gateway.backends.send`'s last layer): which slot
it takes in the host's slot table (:mod:`gateway.backends.slots`), and, before it replaces
what that slot holds, the conversations kept warm: the one the slot held is saved, the
request's own restored from its saved state (:mod:`gateway.backends.kvstates`)."""

from __future__ import annotations

import logging

from . import kvstates, slots
from ..context import RequestContext
from .upstream import Backend, Replica


def take_slot(ctx: RequestContext, backend: Backend, replica: Replica, hinted: bool,
               unpinned: bool) -> slots.SlotHold:
    """The attempt's hold on the replica's slots: all of them for a route llama-server
    places itself; else one, the route hook's ``ctx.slot_hint`` when it chose this
    replica, else a client's own ``id_slot`` (when validate lets it through)."""
    table = slots.table()
    if unpinned:
        return table.take_all(replica.url, replica.slots)
    preferred = ctx.slot_hint if hinted else None
    asked = ctx.body.get("id_slot") if isinstance(ctx.body, dict) else None
    if preferred is None and isinstance(asked, int) and not isinstance(asked, bool):
        preferred = asked
    scope = backend.kv_scope(ctx.principal)
    hold = table.take(replica.url, replica.slots, scope, preferred, _state(ctx, backend, scope))
    if hold.reuse and _no_reuse(ctx):
        hold.reuse = False
    return hold


def _no_reuse(ctx: RequestContext) -> bool:
    """The client's own wish not to reuse its cache."""
    return isinstance(ctx.body, dict) and ctx.body.get("cache_prompt") is False


def _state(ctx: RequestContext, backend: Backend, scope: str) -> bytes:
    """The conversation state the request leaves in its slot (UNKNOWN: a request
    without a prompt to key by)."""
    key = kvstates.conversation_key(ctx.body if isinstance(ctx.body, dict) else None, ctx.route, ctx.model or "",
                                    scope)
    if key is None:
        return slots.UNKNOWN
    launch = backend.config.launch
    tag = kvstates.model_tag(launch.model, launch.ctx, launch.parallel) if launch is not None else \
        kvstates.backend_tag(backend.name, backend.config.urls)
    return kvstates.state_id(tag, key)


def _saves(backend: Backend) -> bool:
    """Whether the backend's conversations are saved: its llama-servers save into the
    host's states folder (the fleet's do; ``kv_states``), and the states are on."""
    return backend.config.kv_states and kvstates.states().enabled


_unsaved_logged: set[str] = set()  # backends whose unsaved evictions were logged (once a process)


def keep_warm(ctx: RequestContext, backend: Backend, replica: Replica, hold: slots.SlotHold) -> None:
    """Before the attempt replaces what its slot holds: save the conversation the slot
    held (another one, its turn answered in full), then restore the request's own
    conversation from its saved state (or, live in an idle slot of another replica of
    the backend, saved from there first). Whatever fails, the turn goes on cold.

    Counts ``kv.saves``, ``kv.save_bytes``, ``kv.restores``, ``kv.restore_bytes``,
    ``kv.restored_tokens``, ``kv.moves``, ``kv.evicted``, ``kv.save_failures``,
    ``kv.restore_failures``, ``kv.not_saved`` (a conversation lost its slot on a backend
    whose states are not saved: it will come back cold), and times ``kv.save`` and
    ``kv.restore``."""
    assert hold.slot is not None
    replaced = hold.held_state != slots.UNKNOWN and hold.held_state != hold.state
    if not _saves(backend):
        if replaced:
            ctx.incr("kv.not_saved")
            if backend.name not in _unsaved_logged:
                _unsaved_logged.add(backend.name)
                ctx.log(logging.INFO, "kv states: conversations of backend %s that lose their slot are not saved "
                        "(%s); they come back cold (counted kv.not_saved)", backend.name,
                        "saved states are off" if backend.config.kv_states else
                        "kv_states: its llama-servers do not save into the host's states folder")
        return
    states = kvstates.states()
    outcome = kvstates.Outcome()
    api_key = backend.config.api_key
    if replaced:
        states.save(replica.url, hold.slot, hold.held_owner, hold.held_state, api_key, outcome)
    if hold.state != slots.UNKNOWN and hold.held_state != hold.state and not _no_reuse(ctx):
        owner = slots.scope_id(backend.kv_scope(ctx.principal))
        name = kvstates.file_name(owner, hold.state)
        if not states.has(name):
            _fetch_live(states, backend, replica, hold.state, outcome)
        if states.has(name) and states.restore(replica.url, hold.slot, owner, hold.state, api_key, outcome):
            hold.restored = outcome.restored_tokens
            hold.reuse = True
    _count(ctx, outcome)


def _fetch_live(states: kvstates.States, backend: Backend, replica: Replica, state: bytes,
                outcome: kvstates.Outcome) -> None:
    """The conversation moved from another replica of the backend (a spill, a replica
    down or draining): save it from the idle slot there that still holds it."""
    table = slots.table()
    for other in backend.replicas:
        if other is replica:
            continue
        held = table.take_holding(other.url, other.slots, state)
        if held is None:
            continue
        assert held.slot is not None
        try:
            outcome.moved = states.save(other.url, held.slot, held.held_owner, state, backend.config.api_key, outcome)
        finally:
            held.release(clean=True)
        return


def _count(ctx: RequestContext, outcome: kvstates.Outcome) -> None:
    if outcome.saves:
        ctx.incr("kv.saves", outcome.saves)
        ctx.incr("kv.save_bytes", outcome.saved_bytes)
        ctx.timings["kv.save"] = outcome.save_ms
    if outcome.restored():
        ctx.incr("kv.restores")
        ctx.incr("kv.restore_bytes", outcome.restored_bytes)
        ctx.incr("kv.restored_tokens", outcome.restored_tokens)
        ctx.timings["kv.restore"] = outcome.restore_ms
    if outcome.moved:
        ctx.incr("kv.moves")
    if outcome.evicted:
        ctx.incr("kv.evicted", outcome.evicted)
    if outcome.save_failed:
        ctx.incr("kv.save_failures")
    if outcome.restore_failed:
        ctx.incr("kv.restore_failures")
