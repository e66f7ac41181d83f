"""The shared admission's Lua scripts against a real Redis, step by step: who a freed slot
goes to (admins, then key priority, then clients in turn, first come first served within a
client), places and leases that lapse, a full queue; and the fallback to a worker's own
admission when Redis cannot be reached."""

from __future__ import annotations

import time
import uuid

import pytest

from gateway.config import BackendConfig, SharedConfig
from gateway.context import Principal, RequestContext
from gateway.errors import ServiceUnavailableError
from gateway.backends.admission import SCRIPTS, SharedAdmission
from gateway.storage.shared import Shared
from gateway.testing import free_port
from gateway.backends.turns import QueuePlace
from gateway.backends.upstream import Backend, InFlight

RANK_USER, RANK_ADMIN = 101, 0


@pytest.fixture
def shared(redis_url) -> Shared:
    return Shared(SharedConfig(redis_url=redis_url, prefix=f"q-{uuid.uuid4().hex[:8]}:"))


def ask(shared: Shared, name: str, slots: str, *args, settle: int = 0) -> int:
    return shared.script(SCRIPTS[name], [shared.prefix + "admission:chat:"], [shared.prefix + "wake:", slots, settle, *args])


def acquire(shared, ident, client, rank, slots="1", lease=60_000, max_queue=100, mine=100, place=60_000,
            settle=0) -> int:
    """The replica's number (from 1) of the slot taken, 0 queued, -1 refused, -2 refused
    to this client."""
    return ask(shared, "acquire", slots, ident, f"{rank}:{client}", rank, lease, max_queue, mine, place,
               settle=settle)


def release(shared, ident, client, rank, slots="1") -> None:
    ask(shared, "release", slots, ident, f"{rank}:{client}", 60_000)


def slots(shared, replica: int = 0) -> set[str]:
    return {m.decode() for m in shared.client.zrange(shared.prefix + f"admission:chat:slots:{replica}", 0, -1)}


def test_freed_slots_go_to_admins_then_priority_then_clients_in_turn(shared):
    assert acquire(shared, "w/0", "alice", RANK_USER) == 1
    queued = [("w/b1", "bob", RANK_USER), ("w/b2", "bob", RANK_USER), ("w/b3", "bob", RANK_USER),
              ("w/c1", "carol", RANK_USER), ("w/d1", "dave", 51), ("w/a1", "ops", RANK_ADMIN)]
    for ident, client, rank in queued:
        assert acquire(shared, ident, client, rank) == 0
    order = []
    holder = ("w/0", "alice", RANK_USER)
    for _ in queued:
        release(shared, *holder)
        (granted,) = slots(shared)
        order.append(granted)
        holder = next(q for q in queued if q[0] == granted)
    # bob queued his three before carol's one: she waits behind one of his, not three
    assert order == ["w/a1", "w/d1", "w/b1", "w/c1", "w/b2", "w/b3"]


def test_a_lapsed_place_is_skipped_and_a_lapsed_lease_comes_back(shared):
    assert acquire(shared, "w/0", "alice", RANK_USER, lease=200) == 1
    assert acquire(shared, "dead/1", "bob", RANK_USER, place=100) == 0  # its worker stops refreshing
    assert acquire(shared, "w/2", "carol", RANK_USER) == 0
    time.sleep(0.3)  # both the place and the lease lapse; no one released anything
    assert acquire(shared, "w/2", "carol", RANK_USER) == 1
    assert slots(shared) == {"w/2"}


def test_a_full_queue_refuses(shared):
    assert acquire(shared, "w/0", "alice", RANK_USER) == 1
    assert acquire(shared, "w/1", "bob", RANK_USER, max_queue=1) == 0
    assert acquire(shared, "w/2", "bob", RANK_USER, max_queue=1) == -1


def test_a_client_holding_its_places_is_refused_and_the_others_still_queue(shared):
    assert acquire(shared, "w/0", "alice", RANK_USER) == 1
    assert [acquire(shared, f"w/b{i}", "bob", RANK_USER, max_queue=8, mine=2) for i in range(3)] == [0, 0, -2]
    assert acquire(shared, "w/c1", "carol", RANK_USER, max_queue=8, mine=2) == 0


def test_keys_redis_lost_come_back_before_any_slot_is_handed_out(shared):
    """Redis loses every key while w/0 holds the one slot: nothing is handed out for the
    settling time, in which w/0's heartbeat writes its lease back; then w/1 waits for it."""
    assert acquire(shared, "w/0", "alice", RANK_USER) == 1
    shared.client.flushdb()
    assert acquire(shared, "w/1", "bob", RANK_USER, settle=300) == 0  # queued, though Redis saw no slot taken
    ask(shared, "refresh", "1", 60_000, 60_000, "w/0", 1, "", "w/1", settle=300)  # w/0's heartbeat
    assert slots(shared) == {"w/0"}
    time.sleep(0.4)  # settled
    assert acquire(shared, "w/1", "bob", RANK_USER, settle=300) == 0  # still w/0's
    release(shared, "w/0", "alice", RANK_USER)
    assert slots(shared) == {"w/1"}
    # settled: a heartbeat that listed w/0 before it was released does not take it again
    ask(shared, "refresh", "1", 60_000, 60_000, "w/0", 1, "w/1", 1, "", settle=300)
    assert slots(shared) == {"w/1"}


def test_unreachable_redis_falls_back_to_the_workers_own_admission():
    down = Shared(SharedConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    backend = Backend(BackendConfig(name="chat", urls=("http://127.0.0.1:1",), max_in_flight=2, admission="redis"),
                      shared=down)
    admission = backend.admission
    assert isinstance(admission, SharedAdmission)
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", pipeline="default")
    ctx.principal = Principal(client_id="alice")
    entry = InFlight(ctx)
    assert admission.acquire(QueuePlace.of(ctx.principal), entry) == 0.0
    assert ctx.counters["shared.unavailable"] == 1
    assert admission.fallback.in_flight == 1 and admission.in_flight == 1
    admission.release(entry)
    assert admission.in_flight == 0


def test_each_replica_keeps_to_its_own_slots(shared):
    """Two replicas of 1 and 2 slots: three requests take all three, each told its replica;
    a fourth waits, and a slot freed on replica 1 goes to it on replica 1."""
    taken = [acquire(shared, f"w/{i}", "alice", RANK_USER, slots="1,2") for i in range(3)]
    assert sorted(taken) == [1, 2, 2]
    assert acquire(shared, "w/3", "bob", RANK_USER, slots="1,2") == 0
    first = taken.index(1)
    release(shared, f"w/{first}", "alice", RANK_USER, slots="1,2")
    assert acquire(shared, "w/3", "bob", RANK_USER, slots="1,2") == 1
    assert slots(shared, 0) == {"w/3"} and len(slots(shared, 1)) == 2


def test_no_slot_on_a_replica_known_to_be_down(shared):
    """Of two replicas, the first failed its health check: every slot handed out is on the
    second; once it is full, requests queue rather than go to the one that is down."""
    backend = Backend(BackendConfig(name="chat", urls=("http://127.0.0.1:1", "http://127.0.0.1:2"), max_in_flight=4,
                                    admission="redis", queue_timeout=0.3), shared=shared)
    backend.replicas[0].ready = False
    shared.client.set(shared.prefix + "admission:chat:since", 0)  # long settled: no wait for lost leases
    admission = backend.admission
    entries = []
    for i in range(2):
        ctx = RequestContext(request_id=f"r{i}", method="POST", route="/v1/chat/completions", pipeline="default")
        ctx.principal = Principal(client_id="alice")
        entries.append(InFlight(ctx))
        assert admission.acquire(QueuePlace.of(ctx.principal), entries[-1]) == 0.0
        assert entries[-1].replica is backend.replicas[1]
    ctx = RequestContext(request_id="r2", method="POST", route="/v1/chat/completions", pipeline="default")
    ctx.principal = Principal(client_id="bob")
    with pytest.raises(ServiceUnavailableError) as err:
        admission.acquire(QueuePlace.of(ctx.principal), InFlight(ctx))
    assert err.value.code == "queue_timeout"
    for entry in entries:
        admission.release(entry)
