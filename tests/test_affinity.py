"""Prefix-affinity routing in one piece at a time: the conversation key, rendezvous
ranking (distribution, minimal movement, the same in every process), bounded loads,
the slot table, and the router's strategy over real replica views.
tests/integration/test_affinity_real.py drives it through two real llama-servers."""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import BackendConfig
from gateway.context import Principal, RequestContext
from gateway.testing import Harness
from gateway.backends.upstream import Backend
from gateway.plugin import conversation_key
from plugins.router.affinity import SlotTable, pick, rank

from .test_plugins import plugin as labelled


def plugin(name, **config):
    return labelled(name, **config)[1]

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are terse. " * 20}
URLS = [f"http://10.0.0.{i}:8080" for i in range(1, 6)]


def keys(count: int) -> list[bytes]:
    return [conversation_key({"messages": [SYSTEM, {"role": "user", "content": f"question {i}"}]}, CHAT, "m", "", 64)
            for i in range(count)]


def owner(key: bytes, names: list[str]) -> str:
    return names[rank(key, names)[0]]


# --- the key ----------------------------------------------------------------------------

def test_every_turn_of_a_conversation_has_its_first_turns_key():
    first = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    turns = [first, first + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
             first + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                      {"role": "assistant", "content": "6"}, {"role": "user", "content": "Thanks"}]]
    assert len({conversation_key({"messages": m}, CHAT, "m", "alice", 64) for m in turns}) == 1
    other = [SYSTEM, {"role": "user", "content": "What is 5+5?"}]
    assert conversation_key({"messages": other}, CHAT, "m", "alice", 64) != conversation_key({"messages": first}, CHAT, "m", "alice", 64)


def test_the_key_is_per_client_and_model_unless_global():
    body = {"messages": [SYSTEM, {"role": "user", "content": "hi"}]}
    assert conversation_key(body, CHAT, "m", "alice", 64) != conversation_key(body, CHAT, "m", "bob", 64)
    assert conversation_key(body, CHAT, "m", "", 64) == conversation_key(dict(body), CHAT, "m", "", 64)
    assert conversation_key(body, CHAT, "m", "", 64) != conversation_key(body, CHAT, "other", "", 64)
    # a client id cannot be forged into another's by shifting characters into the model
    assert conversation_key(body, CHAT, "bm", "a", 64) != conversation_key(body, CHAT, "m", "ab", 64)


def test_content_parts_and_text_key_alike_only_when_equal():
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]}
    assert conversation_key(text, CHAT, "m", "", 64) != conversation_key(image, CHAT, "m", "", 64)


def test_completions_key_by_the_head_of_the_prompt_and_other_routes_have_none():
    head = "Once upon a time " * 10
    one = conversation_key({"prompt": head + "there was a fox"}, "/v1/completions", "m", "", len(head))
    two = conversation_key({"prompt": head + "there was a bear"}, "/v1/completions", "m", "", len(head))
    assert one == two
    assert conversation_key({"prompt": [1, 2, 3, 4]}, "/v1/completions", "m", "", 3) == \
        conversation_key({"prompt": [1, 2, 3, 9]}, "/v1/completions", "m", "", 3)
    assert conversation_key({"input": "x"}, "/v1/embeddings", "m", "", 64) is None
    for bad in ({"messages": []}, {"messages": "hi"}, {"messages": ["hi"]}, {"prompt": 3}, None):
        assert conversation_key(bad, CHAT, "m", "", 64) is None
        assert conversation_key(bad, "/v1/completions", "m", "", 64) is None


# --- rendezvous ranking -------------------------------------------------------------------

def test_keys_spread_evenly_over_replicas_and_by_weight():
    sample = keys(8000)
    counts = collections.Counter(owner(key, URLS[:4]) for key in sample)
    assert set(counts) == set(URLS[:4])
    assert all(abs(count - 2000) < 200 for count in counts.values()), counts
    weighted = collections.Counter(URLS[rank(key, URLS[:2], [1, 3])[0]] for key in sample)
    assert abs(weighted[URLS[1]] / len(sample) - 0.75) < 0.03, weighted


def test_a_replica_joining_or_leaving_moves_only_its_share():
    sample = keys(5000)
    before = {key: owner(key, URLS[:4]) for key in sample}
    joined = {key: owner(key, URLS[:5]) for key in sample}
    moved = [key for key in sample if before[key] != joined[key]]
    assert all(joined[key] == URLS[4] for key in moved)  # only to the newcomer
    assert abs(len(moved) / len(sample) - 1 / 5) < 0.03
    left = {key: owner(key, URLS[1:4]) for key in sample}  # URLS[0] leaves
    assert all(left[key] == before[key] for key in sample if before[key] != URLS[0])


def test_the_ranking_is_the_same_in_every_process():
    script = ("import json, sys; from gateway.plugin import conversation_key; from plugins.router.affinity import rank\n"
              "k = conversation_key({'messages': [{'role': 'user', 'content': 'hi'}]}, '/v1/chat/completions', 'm', 'a', 9)\n"
              f"print(json.dumps([k.hex(), rank(k, {URLS!r}), rank(k, [str(s) for s in range(8)])]))")
    outputs = set()
    for seed in ("1", "2"):  # Python's own hash() differs between these two
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        outputs.add(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert len(outputs) == 1
    key_hex, replicas, slots = json.loads(outputs.pop())
    key = bytes.fromhex(key_hex)
    assert rank(key, URLS) == replicas and rank(key, [str(s) for s in range(8)]) == slots


# --- bounded loads ------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_bounded_loads_keep_every_replica_within_its_share(factor):
    """One hot key (a tenant repeating one prompt) and many cold ones arriving while
    nothing finishes: no replica ever goes above ceil(c * total / n)."""
    names, loads = URLS[:4], [0, 0, 0, 0]
    hot = keys(1)[0]
    for step, key in enumerate(keys(200)):
        index, _ = pick(hot if step % 2 else key, names, loads, [1] * 4, factor)
        loads[index] += 1
        assert max(loads) <= math.ceil(factor * sum(loads) / 4)
    assert min(loads) > 0


def test_a_key_stays_on_its_replica_until_that_is_over_its_share():
    names, key = URLS[:2], keys(1)[0]
    home = rank(key, names)[0]
    loads = [0, 0]
    index, first = pick(key, names, loads, [1, 1], 1.25)
    assert (index, first) == (home, True)
    loads[home] = 1  # one in flight there: ceil(1.25 * 2 / 2) = 2 still fits
    assert pick(key, names, loads, [1, 1], 1.25) == (home, True)
    loads[home] = 2  # ceil(1.25 * 3 / 2) = 2: full, the key spills
    assert pick(key, names, loads, [1, 1], 1.25) == (1 - home, False)
    assert pick(key, names, loads, [1, 1], 2.0) == (home, True)  # a looser bound keeps it


# --- slots -------------------------------------------------------------------------------

def test_conversations_get_slots_of_their_own_while_there_are_enough():
    table, now = SlotTable(4), 100.0
    conversations = keys(4)
    chosen = {}
    for key in conversations:
        chosen[key] = table.choose(key, "alice", now, 300)
        table.take(chosen[key], key, "alice", now)
        table.release(chosen[key], now)
    assert sorted(chosen.values()) == [0, 1, 2, 3]
    for key in conversations:  # later turns come back to the same slot
        assert table.choose(key, "alice", now + 10, 300) == chosen[key]


def test_a_key_without_conflicts_takes_its_first_slot_in_every_worker():
    for key in keys(20):
        assert SlotTable(4).choose(key, "", 0.0, 300) == rank(key, ["0", "1", "2", "3"])[0]


def test_busy_slots_are_avoided_and_more_conversations_than_slots_evict_the_oldest():
    table = SlotTable(2)
    one, two, three = keys(3)
    a = table.choose(one, "", 0.0, 300)
    table.take(a, one, "", 0.0)
    assert table.choose(one, "", 1.0, 300) == 1 - a  # its own slot is busy (a second request at once)
    b = table.choose(two, "", 1.0, 300)
    assert b == 1 - a
    table.take(b, two, "", 1.0)
    assert table.choose(three, "", 2.0, 300) is None  # all busy here: llama-server chooses
    table.release(a, 5.0)
    table.release(b, 3.0)
    assert table.choose(three, "", 6.0, 300) == b  # the least recently used idle slot
    assert table.choose(three, "", 400.0, 300) == rank(three, ["0", "1"])[0]  # both stale: its own first choice


def test_a_key_holding_several_slots_gets_its_first_idle_one():
    table, (key, other) = SlotTable(6), keys(2)
    for slot in (1, 3, 4):
        table.take(slot, key, "", 0.0)  # three requests of one conversation at once
    table.take(0, other, "", 0.0)
    table.release(4, 1.0)
    assert table.choose(key, "", 2.0, 300) == 4
    table.release(3, 2.0)
    assert table.choose(key, "", 3.0, 300) == 3
    table.take(3, key, "", 3.0)
    table.take(4, key, "", 3.0)
    assert table.choose(key, "", 4.0, 300) not in (0, 1, 3, 4)  # all its slots busy: a free one


def test_a_client_with_more_conversations_than_slots_evicts_its_own_first():
    table = SlotTable(3)
    mine, theirs = keys(4)[:3], keys(4)[3]
    t = table.choose(theirs, "victim", 0.0, 300)
    table.take(t, theirs, "victim", 0.0)
    table.release(t, 0.0)  # the victim's conversation is the least recently used of all
    for n, key in enumerate(mine, start=1):
        slot = table.choose(key, "flooder", float(n), 300)
        table.take(slot, key, "flooder", float(n))
        table.release(slot, float(n))
        assert table.owners[t] == theirs  # the flooder's third conversation took the flooder's own oldest slot


# --- the router's strategy ---------------------------------------------------------------

def request(body, client="alice", route=CHAT):
    return RequestContext(request_id="r", method="POST", route=route, backend="chat", model="m",
                          body=body, principal=Principal(client))


def two_replicas(slots=4):
    backend = Backend(BackendConfig("chat", ("http://a", "http://b"), 1, 1, 1))
    for replica in backend.replicas:
        replica.ready, replica.slots = True, slots
    return backend


def conversation(turn: int, name: str = "c"):
    messages = [SYSTEM, {"role": "user", "content": f"{name} opening"}]
    for n in range(turn):
        messages += [{"role": "assistant", "content": f"answer {n}"}, {"role": "user", "content": f"more {n}"}]
    return {"model": "m", "messages": messages}


def test_prefix_affinity_keeps_a_conversation_and_spills_when_its_replica_is_full():
    router = plugin("router", strategy="prefix_affinity")
    backend = two_replicas()
    views = {"chat": backend.view}
    ctxs = [request(conversation(turn)) for turn in range(3)]
    chosen = {router.route(ctx=ctx, backends=views).url for ctx in ctxs}
    assert len(chosen) == 1 and {ctx.routing for ctx in ctxs} == {"affinity"}
    assert all(ctx.counters == {"router.affinity": 1} for ctx in ctxs)
    home = next(r for r in backend.replicas if r.url in chosen)
    home.in_flight = 4  # the default load_factor 1: ceil(1 * 5 / 2) = 3 < 5: full
    ctx = request(conversation(3))
    assert router.route(ctx=ctx, backends=views).url != home.url and ctx.routing == "spill"
    home.ready = False  # down: its conversations move, and still count as spilled
    home.in_flight = 0
    ctx = request(conversation(4))
    assert router.route(ctx=ctx, backends=views).url != home.url and ctx.routing == "spill"


def test_prefix_affinity_pins_the_slot_and_frees_it_when_the_request_completes():
    router = plugin("router", strategy="prefix_affinity")
    views = {"chat": two_replicas().view}
    first = request(conversation(0))
    router.route(ctx=first, backends=views)
    slot = first.slot_hint
    assert 0 <= slot < 4
    again = request(conversation(1))  # same conversation while the first is in its slot
    router.route(ctx=again, backends=views)
    assert again.slot_hint != slot
    router.complete(ctx=first, outcome="ok")
    router.complete(ctx=again, outcome="ok")
    later = request(conversation(2))
    router.route(ctx=later, backends=views)
    assert later.slot_hint in (slot, again.slot_hint)  # one it holds


def test_slots_unknown_or_pinning_off_leave_the_slot_to_the_gateway():
    for router, slots in ((plugin("router", strategy="prefix_affinity"), None),
                          (plugin("router", strategy="prefix_affinity", pin_slots=False), 4)):
        ctx = request(conversation(0))
        router.route(ctx=ctx, backends={"chat": two_replicas(slots).view})
        assert ctx.slot_hint is None and ctx.routing == "affinity"


def test_other_clients_and_embeddings_are_not_keyed_together():
    router = plugin("router", strategy="prefix_affinity")
    views = {"chat": two_replicas().view}
    homes = {}
    for client in ("alice", "bob", "carol", "dave", "erin", "frank"):
        ctx = request(conversation(0), client=client)
        homes[client] = router.route(ctx=ctx, backends=views).url
    assert len(set(homes.values())) == 2  # six clients, one prompt: not all on one replica
    embed = request({"model": "m", "input": "x"}, route="/v1/embeddings")
    router.route(ctx=embed, backends=views)
    assert embed.routing == "load" and "router" not in embed.state


def test_the_pinned_slot_reaches_llama_server_and_the_logs_and_metrics_say_how(tmp_path):
    log = tmp_path / "access.log"
    metrics = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    metrics.bind(("127.0.0.1", 0))
    metrics.settimeout(10)
    pipeline = [labelled("statsd", port=metrics.getsockname()[1], prefix="lg"),
                labelled("accesslog", path=str(log)), labelled("router", strategy="prefix_affinity")]
    with Harness(pipeline) as harness:
        harness.gateway.upstreams.backends["test"].replicas[0].slots = 2
        harness.backend.script({"events": [
            {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31,
                                      "prompt_tokens_details": {"cached_tokens": 24}}}]})
        result = harness.request("POST", CHAT, json=conversation(0, "x") | {"model": harness.model})
        assert result.status == 200
        sent = harness.backend.requests[-1][2]
        assert sent["id_slot"] in (0, 1)
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["routing"] == "affinity" and line["cached_tokens"] == 24 and line["replica"] == harness.backend.url
    sent_lines: list[str] = []
    while not any(name.startswith("lg.requests.") for name in sent_lines):  # the request's own packet, when it completes
        sent_lines += metrics.recv(65536).decode().splitlines()
    assert "lg.router.affinity:1|c" in sent_lines and "lg.tokens.cached.test-model:24|c" in sent_lines


def test_a_new_conversation_whose_replica_has_no_free_slot_takes_the_next_and_stays():
    router = plugin("router", strategy="prefix_affinity")
    views = {"chat": two_replicas(slots=1).view}
    homes = {}
    for n in range(50):  # two conversations that prefer the same replica
        key = conversation_key(conversation(0, f"c{n}"), CHAT, "m", "client:alice", 2048)
        homes.setdefault(rank(key, ["http://a", "http://b"])[0], []).append(f"c{n}")
    first, second = homes[0][:2]
    ctx = request(conversation(0, first))
    assert router.route(ctx=ctx, backends=views).url == "http://a" and ctx.routing == "affinity"
    router.complete(ctx=ctx, outcome="ok")  # idle now, but its one slot is held by a live conversation
    for turn in range(3):
        ctx = request(conversation(turn, second))
        assert router.route(ctx=ctx, backends=views).url == "http://b" and ctx.routing == "spill"
        router.complete(ctx=ctx, outcome="ok")
    ctx = request(conversation(1, first))  # and the first keeps its own
    assert router.route(ctx=ctx, backends=views).url == "http://a" and ctx.routing == "affinity"


def test_responses_completion_and_infill_are_keyed_like_chat_and_completions():
    opening = {"instructions": "You are terse. " * 20, "input": "What is 2+2?"}
    later = {"instructions": opening["instructions"],
             "input": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                       {"role": "user", "content": "And 3+3?"}]}
    key = conversation_key(opening, "/v1/responses", "m", "client:alice", 64)
    assert key is not None and key == conversation_key(later, "/v1/responses", "m", "client:alice", 64)
    assert key != conversation_key(opening, "/v1/responses", "m", "client:bob", 64)
    head = "def fibonacci(n):\n" * 10
    assert conversation_key({"prompt": head + "a"}, "/completion", "m", "", len(head)) == \
        conversation_key({"prompt": head + "b"}, "/completion", "m", "", len(head))
    assert conversation_key({"input_prefix": head, "input_suffix": "x"}, "/infill", "m", "", 64) is not None
    assert conversation_key({"messages": [{"role": "user", "content": "hi"}]}, "/v1/messages", "m", "", 64) is None
