"""The host-wide slot table (gateway.backends.slots): who may reuse a slot's KV cache, across
workers and processes, and what the core sends llama-server."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import pytest

from gateway.backends import slots
from gateway.config import ConfigError, parse_config
from gateway.context import Principal
from gateway.backends.slots import SlotTable, kv_scope
from gateway.testing import Harness

from .test_plugins import plugin as labelled

URL = "http://127.0.0.1:8081"
A, B = "client:alice", "client:bob"


@pytest.fixture
def table(tmp_path):
    return SlotTable(str(tmp_path / "slots"))


def take(table, scope, slot, count=4):
    return table.take(URL, count, scope, slot)


def test_reuse_only_for_the_scope_that_used_the_idle_slot_last(table):
    first = take(table, A, 0)
    assert (first.slot, first.reuse) == (0, False)  # nobody's yet
    first.release(clean=True)
    again = take(table, A, 0)
    assert again.reuse and again.fields() == {"id_slot": 0, "cache_prompt": True}
    again.release(clean=True)
    other = take(table, B, 0)
    assert not other.reuse and other.fields() == {"id_slot": 0, "cache_prompt": False}
    other.release(clean=True)
    assert not take(table, A, 0).reuse  # Bob's prompt is in it now


def test_a_take_of_a_busy_slot_leaves_it_nobodys(table):
    alice = take(table, A, 1)
    bob = take(table, B, 1)  # queued behind hers in llama-server, which may run them in either order
    assert not bob.reuse
    bob.release(clean=True)
    alice.release(clean=True)
    assert not take(table, A, 1).reuse
    mine = take(table, A, 2)
    again = take(table, A, 2)  # even one's own second request: which runs first is unknown
    assert not again.reuse
    for hold in (mine, again):
        hold.release(clean=True)
    assert not take(table, A, 2).reuse


def test_an_unclean_end_forgets_the_owner_and_a_release_counts_once(table):
    hold = take(table, A, 0)
    hold.release(clean=True)
    hold = take(table, A, 0)
    hold.release(clean=False)  # an error, a cut stream: the slot may hold anything
    hold.release(clean=True)  # idempotent
    assert not take(table, A, 0).reuse


def test_a_request_llama_server_places_itself_holds_every_slot(table):
    for slot in range(4):
        take(table, A, slot).release(clean=True)
    whole = table.take_all(URL, 4)
    assert whole.fields() == {"cache_prompt": False}
    during = take(table, A, 3)
    assert not during.reuse  # every slot is busy meanwhile
    during.release(clean=True)
    whole.release(clean=True)
    assert not any(take(table, A, slot).reuse for slot in range(4))


def test_without_a_hint_the_table_prefers_the_scopes_idle_slot_then_a_free_one(table):
    take(table, A, 2).release(clean=True)
    take(table, B, 0).release(clean=True)
    mine = table.take(URL, 4, A, None)
    assert (mine.slot, mine.reuse) == (2, True)
    fresh = table.take(URL, 4, "client:carol", None)
    assert fresh.slot in (1, 3) and not fresh.reuse  # nobody's, before anyone else's
    unknown = table.take(URL, None, A, 1)  # the replica's slot count is not known yet
    assert unknown.slot is None and unknown.fields() == {"cache_prompt": False}


def test_stale_records_only_make_takes_fresh(table, tmp_path, monkeypatch):
    take(table, A, 0).release(clean=True)
    leaked = take(table, A, 1)  # a worker that died holding it never releases
    now = time.time()
    monkeypatch.setattr(slots.time, "time", lambda: now + slots.OWNER_TTL + 1)
    assert not take(table, A, 0).reuse  # an owner idle that long is not trusted
    recovered = take(table, A, 1)
    assert not recovered.reuse and not leaked.released
    recovered.release(clean=True)
    assert take(table, A, 1).reuse  # the dead worker's count no longer keeps the slot busy
    monkeypatch.undo()
    # a file of another format, or written before this boot: every slot unknown
    path = next((tmp_path / "slots").iterdir())
    take(table, A, 2).release(clean=True)
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # another boot id
    path.write_bytes(bytes(data))
    assert not take(SlotTable(str(tmp_path / "slots")), A, 2).reuse


def test_an_unusable_folder_is_logged_once_and_never_reuses(tmp_path, caplog):
    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with caplog.at_level(logging.ERROR, logger="llamagate"):
        table = SlotTable(str(shared))
        for _ in range(3):
            hold = take(table, A, 2)
            assert (hold.slot, hold.reuse) == (2, False)
            hold.release(clean=True)
    assert table.broken and len([r for r in caplog.records if "slot table unusable" in r.message]) == 1


def _in_another_process(directory, scope, slot, clean, queue):
    hold = SlotTable(directory).take(URL, 4, scope, slot)
    queue.put(hold.reuse)
    hold.release(clean=clean)


def _holding(directory, ready, done):
    hold = SlotTable(directory).take(URL, 4, A, 3)
    ready.set()
    done.wait(30)
    hold.release(clean=True)


def test_processes_share_one_table(tmp_path):
    directory = str(tmp_path / "slots")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def run(scope, slot, clean=True):
        process = context.Process(target=_in_another_process, args=(directory, scope, slot, clean, queue))
        process.start()
        process.join(30)
        return queue.get(timeout=5)

    assert run(A, 0) is False
    assert run(A, 0) is True  # what one process recorded, another reads
    assert run(B, 0) is False
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_holding, args=(directory, ready, done))
    holder.start()
    assert ready.wait(30)
    here = SlotTable(directory).take(URL, 4, A, 3)
    assert not here.reuse  # busy in the other process
    done.set()
    holder.join(30)
    here.release(clean=True)
    assert run(A, 3) is False  # two takes overlapped: nobody's


def test_scopes_from_kv_sharing():
    groups = {"alice": "research", "bob": "research"}
    assert kv_scope("none", {}, Principal("alice")) == "client:alice"
    assert kv_scope("groups", groups, Principal("bob")) == kv_scope("groups", groups, Principal("alice"))
    assert kv_scope("groups", groups, Principal("carol")) == "client:carol"
    assert kv_scope("global", {}, Principal("carol")) == kv_scope("global", {}, None) == "global"
    assert kv_scope("none", {}, None) == "anonymous"


BASE = {"models": {"m": {"backend": "chat"}}, "pipelines": {"p": []}, "routes": {"/v1/chat/completions": "p"}}


def test_kv_sharing_and_the_cross_slot_cache_are_checked(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    config = parse_config({**BASE, "backends": {"chat": {"urls": ["http://a"],
                                                         "kv_sharing": {"research": ["alice", "bob"]}}}})
    assert dict(config.backends["chat"].kv_groups) == {"alice": "research", "bob": "research"}
    with pytest.raises(ConfigError, match="already in group 'research'"):
        parse_config({**BASE, "backends": {"chat": {"urls": ["http://a"],
                                                    "kv_sharing": {"research": ["alice"], "ops": ["alice"]}}}})
    launch = {"model": str(model), "cache_ram": 512}
    with pytest.raises(ConfigError, match="cache_ram: .* needs kv_sharing: global"):
        parse_config({**BASE, "backends": {"chat": {"launch": launch}}})
    shared = parse_config({**BASE, "backends": {"chat": {"launch": launch, "kv_sharing": "global"}}})
    assert shared.backends["chat"].launch.cache_ram == 512
    assert parse_config({**BASE, "backends": {"chat": {"launch": {"model": str(model)}}}}).backends[
        "chat"].launch.cache_ram == 0


def test_the_core_sends_the_slot_and_reuse_per_tenant(monkeypatch):
    monkeypatch.setenv("KV_TEST_KEYS", "sk-kv-a-000000000000000000000000:alice,sk-kv-b-000000000000000000000000:bob")
    with Harness([labelled("auth", env_keys={"KV_TEST_KEYS": "user"})]) as harness:
        harness.gateway.upstreams.backends["test"].replicas[0].slots = 1

        def sent(key, **body):
            assert harness.chat("hi", headers={"Authorization": f"Bearer {key}"}, **body).status == 200
            return {name: harness.backend.requests[-1][2].get(name) for name in ("id_slot", "cache_prompt")}

        alice, bob = "sk-kv-a-000000000000000000000000", "sk-kv-b-000000000000000000000000"
        assert sent(alice, cache_prompt=True) == {"id_slot": 0, "cache_prompt": False}  # a client cannot ask for reuse
        assert sent(alice, id_slot=5) == {"id_slot": 0, "cache_prompt": True}  # nor pick a slot that is not there
        assert sent(alice, cache_prompt=False) == {"id_slot": 0, "cache_prompt": False}  # but may decline it
        assert sent(bob) == {"id_slot": 0, "cache_prompt": False}
        assert sent(alice) == {"id_slot": 0, "cache_prompt": False}
