"""Saved KV states through the real parts: gunicorn with two gevent workers, its fleet
supervisor launching SmolLM2 llama-servers (xllamacpp) with the host's states folder as
their slot save path, and two user keys. The evidence is llama-server's own count of the
prompt tokens it took from the slot's cache (``cached_tokens``), never time.

The fleet: ``chat`` (two replicas of 2 slots each) and ``other`` (one replica, 1 slot,
``idle_ttl``), at most one resident at a time (``max_resident: 1``: a request for one
swaps the other out); and ``external``, a llama-server of 1 slot the gateway does not
launch, declared ``kv_states: true`` (started with the host's states folder as its save path). Each conversation opens with a long text of its own under a short
system prompt, so a cold follow-up reuses almost nothing and a warm one nearly all.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from gateway.backends import kvstates, slots
from gateway.storage import keys
from gateway.testing import free_ports, launched_backend, pipelines_doc

from .conftest import HERE
from .test_fleet import model, wait_for

CHAT = {"ctx": 2048, "parallel": 2, "threads": 1, "replicas": 2}
OTHER = {"ctx": 1024, "parallel": 1, "threads": 1, "idle_ttl": 3}
WARM = 0.9  # a warm follow-up takes at least this much of its previous turn's prompt from the cache
COLD = 32  # what a follow-up may reuse without its state: the chat template and the system prompt
WORDS = ("river stone lantern copper meadow violet harbor quiet engine marble orchard signal "
         "thunder velvet canyon silver window paper garden falcon winter cotton bridge candle").split()
_serial = itertools.count(1)


@pytest.fixture(scope="module")
def fleet(start_gateway: Callable[..., Any], backends: Any, model_path: Path, logs: Path) -> Any:
    keys_file = logs / "kv-states-keys.yaml"
    admin, alice, bob = (keys.add_key(keys_file, "ops", "admin"), keys.add_key(keys_file, "alice"),
                         keys.add_key(keys_file, "bob"))
    ports = free_ports(3)
    access_log = logs / "kv-states-access.log"
    slots.check_private_directory(str(logs / "slots"))  # the session's slot table: 0700, as a gateway makes it
    states = kvstates.states_directory(str(logs / "slots"))
    slots.check_private_directory(states)
    external = backends.start("--parallel", "1", "--ctx", "1024", "--threads", "1", "--slot-save-path", states)
    doc = pipelines_doc(
        {"chat": launched_backend(model_path, **CHAT), "other": launched_backend(model_path, **OTHER),
         "external": {"urls": [external], "kv_states": True}},
        {"chat": "chat", "other": "other", "external": "external"},
        pipeline=[{"accesslog": {"path": str(access_log)}},
                  {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
                  "pick_replica", {"router": {"strategy": "prefix_affinity"}}],
        health_interval=0.5, admin_pipeline="default", plugin_dirs=[str(HERE / "dropin")],
        fleet={"ports": {"first": ports[0], "last": ports[-1]}, "log_dir": str(logs / "kv-states-fleet"),
               "max_resident": 1})
    gw = start_gateway(doc, workers=2)
    gw.admin, gw.alice, gw.bob, gw.access_log = admin, alice, bob, access_log
    gw.states = Path(states)
    return gw


def opening(n: int) -> str:
    """~150 tokens of a conversation's own."""
    rng = random.Random(n)
    return f"Notes {n}: " + " ".join(rng.choice(WORDS) for _ in range(130)) + ". What is the first word?"


def conversation() -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": opening(next(_serial))}]


def turn(gw: Any, name: str, messages: list[dict[str, str]], key: str | None = None,
         replica: int | None = None) -> tuple[int, int, dict[str, Any]]:
    """One turn of the conversation (its answer appended to ``messages``): (prompt tokens,
    cached tokens, the access log's kv field)."""
    headers = {"Authorization": f"Bearer {key or gw.alice}", "X-Request-Id": f"kv-{random.getrandbits(64):x}"}
    if replica is not None:
        headers["X-Test-Replica"] = str(replica)
    resp = requests.post(gw.url + "/v1/chat/completions", headers=headers, timeout=300,
                         json={"model": name, "messages": messages, "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    usage = answer["usage"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], \
        wait_for(lambda: logged(gw, headers["X-Request-Id"]), 10, "the access log line")


def logged(gw: Any, request_id: str) -> dict[str, Any] | None:
    for line in gw.access_log.read_text().splitlines():
        record = json.loads(line)
        if record["request_id"] == request_id:
            return {"kv": record["kv"] or {}, "replica": record["replica"]}
    return None


def follow_up(messages: list[dict[str, str]]) -> None:
    messages.append({"role": "user", "content": "And the second word?"})


def unload(gw: Any, name: str) -> None:
    resp = requests.post(f"{gw.url}/admin/models/{name}/unload", headers={"Authorization": f"Bearer {gw.admin}"},
                         timeout=120)
    assert resp.status_code == 200 and resp.json()["state"] == "stopped", resp.text


def state_file(gw: Any, client: str, name: str, messages: list[dict[str, str]], launch: dict[str, Any],
               model_path: Path) -> Path:
    """Where the gateway keeps the client's conversation (names are hashes: computed as the core does)."""
    scope = f"client:{client}"
    key = kvstates.conversation_key({"messages": messages}, "/v1/chat/completions", name, scope)
    tag = kvstates.model_tag(str(model_path), launch["ctx"], launch["parallel"])
    return gw.states / kvstates.file_name(slots.scope_id(scope), kvstates.state_id(tag, key))


def test_more_conversations_than_slots_keep_their_follow_ups_warm(fleet):
    talks = [conversation() for _ in range(5)]  # 4 slots
    firsts = [turn(fleet, "chat", talk)[0] for talk in talks]
    restores = 0
    for talk, first in zip(talks, firsts):
        follow_up(talk)
        prompt, cached, log = turn(fleet, "chat", talk)
        assert prompt > first and cached >= WARM * first, f"{cached} of {prompt} cached (first turn: {first})"
        restores += log["kv"].get("restores", 0)
    assert restores >= 1  # 5 conversations on 4 slots: at least one lost its slot and came back


def test_another_tenant_sending_the_same_prefix_never_gets_a_restored_state(fleet, model_path):
    talk = conversation()
    first, _, _ = turn(fleet, "chat", talk)
    unload(fleet, "chat")  # saved on the way out
    follow_up(talk)
    assert state_file(fleet, "alice", "chat", talk, CHAT, model_path).is_file()
    prompt, cached, log = turn(fleet, "chat", list(talk), key=fleet.bob)
    assert cached <= COLD and "restores" not in log["kv"], (cached, prompt, log)
    # hers is still there, and hers alone: she gets it back
    prompt, cached, log = turn(fleet, "chat", talk)
    assert cached >= WARM * first and log["kv"].get("restores") == 1, (cached, prompt, log)


def test_a_conversation_survives_a_swap_to_another_model_and_back(fleet):
    talk = conversation()
    first, _, _ = turn(fleet, "chat", talk)
    turn(fleet, "other", [{"role": "user", "content": "Hello."}])  # max_resident 1: chat is swapped out
    assert model(fleet, "chat")["state"] == "stopped"
    follow_up(talk)
    prompt, cached, log = turn(fleet, "chat", talk)
    assert cached >= WARM * first and log["kv"].get("restores") == 1, (cached, prompt, log)


def test_a_conversation_survives_an_idle_ttl_stop(fleet):
    talk = conversation()
    first, _, _ = turn(fleet, "other", talk)
    wait_for(lambda: model(fleet, "other")["state"] == "stopped", 60, "other to stop after its idle_ttl")
    follow_up(talk)
    prompt, cached, log = turn(fleet, "other", talk)
    assert cached >= WARM * first and log["kv"].get("restores") == 1, (cached, prompt, log)


def test_an_external_backend_declared_to_save_into_the_hosts_folder_keeps_conversations_warm(fleet):
    talk, other = conversation(), conversation()
    first, _, _ = turn(fleet, "external", talk)
    turn(fleet, "external", other)  # its one slot goes to another conversation: talk is saved
    follow_up(talk)
    prompt, cached, log = turn(fleet, "external", talk)
    assert cached >= WARM * first and log["kv"].get("restores") == 1, (cached, prompt, log)


def test_a_conversation_follows_to_the_other_replica(fleet):
    talk = conversation()
    first, _, before = turn(fleet, "chat", talk, replica=0)
    follow_up(talk)
    prompt, cached, after = turn(fleet, "chat", talk, replica=1)
    assert before["replica"] != after["replica"]
    assert cached >= WARM * first and after["kv"].get("moves") == 1, (cached, prompt, after)


def test_a_corrupt_or_missing_state_falls_back_to_a_cold_turn_that_succeeds(fleet, model_path):
    talks = [conversation(), conversation()]
    for talk in talks:
        turn(fleet, "chat", talk)
    unload(fleet, "chat")
    saved = []
    for talk in talks:
        follow_up(talk)
        saved.append(state_file(fleet, "alice", "chat", talk, CHAT, model_path))
        assert saved[-1].is_file()
    corrupt, missing = saved
    corrupt.write_bytes(b"\x00garbage" * 1000)
    missing.unlink()
    prompt, cached, log = turn(fleet, "chat", talks[0])
    assert cached <= COLD and "restores" not in log["kv"] and log["kv"].get("restore_failures") == 1, \
        (cached, prompt, log)
    assert not corrupt.exists()  # not tried again
    prompt, cached, log = turn(fleet, "chat", talks[1])
    assert cached <= COLD and "restores" not in log["kv"], (cached, prompt, log)
