"""Prefix-affinity routing through the real parts: two llama-servers (xllamacpp +
SmolLM2, four slots each), the gateway under gunicorn, the official openai client.
Which replica served a request and what llama-server reused of its prompt are read
from the access log (``replica``, ``routing``, ``cached_tokens``)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from gateway.plugin import conversation_key
from plugins.router.affinity import rank

from .conftest import ROUTES, Backends, RunningGateway

SYSTEM = ("You are a patient assistant for a hardware shop. Answer in one short sentence, "
          "name the aisle when you can, and never invent prices. ") * 6
SLOTS = 4
ALICE, BOB = "sk-alice-" + "a" * 24, "sk-bob-" + "b" * 24


@pytest.fixture(scope="module")
def pair(backends: Backends) -> list[str]:
    """Two replicas of their own: one of them is killed by the last test."""
    return [backends.start("--parallel", str(SLOTS), "--ctx", str(SLOTS * 1024), "--threads", "1") for _ in range(2)]


@pytest.fixture(scope="module")
def access_log(logs: Path) -> Path:
    return logs / "affinity-access.log"


def affinity_gateway(start_gateway: Callable[..., RunningGateway], pair: list[str], access_log: Path) -> RunningGateway:
    gw = start_gateway({
        "health_interval": 1,
        "health_detail": True,
        "backends": {"chat": {"urls": pair, "connect_timeout": 2}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"accesslog": {"path": str(access_log)}},
                                  {"auth": {"env_keys": {"AFFINITY_TEST_KEYS": "user"}}},
                                  {"router": {"strategy": "prefix_affinity"}}]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }, AFFINITY_TEST_KEYS=f"{ALICE}:alice,{BOB}:bob")
    gw.access_log = access_log  # type: ignore[attr-defined]
    wait_for(lambda: slots_known(gw))  # the router weighs and pins by them
    return gw


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., RunningGateway], pair: list[str], access_log: Path) -> RunningGateway:
    return affinity_gateway(start_gateway, pair, access_log)


def slots_known(gw: RunningGateway) -> bool:
    try:
        replicas = requests.get(gw.url + "/health", timeout=5).json()["backends"]["chat"]["replicas"]
    except requests.RequestException:  # a loaded machine: ask again
        return False
    return [r["slots"] for r in replicas] == [SLOTS, SLOTS]


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def opening(n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Customer {n}: where are the {n}mm screws?"}]


def home(messages: list[dict[str, str]], pair: list[str], client: str = "alice") -> str:
    """The replica the router must prefer for a client's conversation."""
    key = conversation_key({"messages": messages}, "/v1/chat/completions", "smollm2", f"client:{client}", 2048)
    return pair[rank(key, pair)[0]]


def openings_covering(pair: list[str], per_replica: int) -> list[list[dict[str, str]]]:
    """Conversation openings, ``per_replica`` preferring each replica (found by the same hash)."""
    chosen: dict[str, list[Any]] = {url: [] for url in pair}
    for n in itertools.count(1):
        messages = opening(n)
        homes = chosen[home(messages, pair)]
        if len(homes) < per_replica:
            homes.append(messages)
        if all(len(v) == per_replica for v in chosen.values()):
            return [m for pair_ in zip(*chosen.values()) for m in pair_]  # interleaved
    raise AssertionError("unreachable")


_ids = itertools.count()


def turn(gw: RunningGateway, messages: list[dict[str, str]], tag: str, key: str = ALICE) -> dict[str, Any]:
    """One chat turn through the openai client; appends the answer and the next question,
    and returns the access log's line for it."""
    request_id = f"{tag}-{next(_ids)}"
    answer = gw.client(api_key=key).chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                                  extra_headers={"x-request-id": request_id})
    messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
    messages.append({"role": "user", "content": f"And after that ({len(messages)})?"})
    return log_line(gw, request_id)


def log_line(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    path: Path = gw.access_log  # type: ignore[attr-defined]
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [line for line in map(json.loads, path.read_text().splitlines()) if line["request_id"] == request_id]
        return bool(found)

    wait_for(logged)
    return found[0]


def test_turns_of_a_conversation_stay_on_one_replica_and_reuse_its_prompt(gateway, pair):
    conversations = openings_covering(pair, 2)  # four conversations, two preferring each replica
    lines: list[list[dict[str, Any]]] = [[] for _ in conversations]
    for _ in range(3):  # three turns each, interleaved between the conversations
        for i, messages in enumerate(conversations):
            lines[i].append(turn(gateway, messages, "stay"))
    for messages, seen in zip(conversations, lines):
        assert {line["replica"] for line in seen} == {home(messages[:2], pair)}
        assert {line["routing"] for line in seen} == {"affinity"}
        for before, after in zip(seen, seen[1:]):
            # the whole previous prompt came from the slot's cache, not only the system prompt
            assert after["cached_tokens"] >= before["prompt_tokens"] - 1, (before, after)


def test_a_conversation_spills_to_the_other_replica_when_its_own_is_over_its_share(gateway, pair):
    messages = opening(1000)
    own = home(messages, pair)
    client = gateway.client(api_key=ALICE)
    long = dict(model="smollm2", messages=messages, max_tokens=400, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    # A stream held open on its replica: with the default load_factor 1, ceil(1 * 2 / 2) = 1,
    # so a second request at the same time is over the bound.
    stream = client.chat.completions.create(**long, extra_headers={"x-request-id": "hold"})
    next(iter(stream))  # its first chunk arrived: it is in flight until we close it
    try:
        line = turn(gateway, list(messages), "spill")
        assert line["replica"] != own and line["routing"] == "spill"
    finally:
        stream.close()
    held = log_line(gateway, "hold")
    assert held["replica"] == own and held["routing"] == "affinity"
    # once its replica has room again, the conversation is back home
    wait_for(lambda: turn(gateway, list(messages), "back")["replica"] == own)


def test_another_tenant_cannot_time_whether_a_prompt_is_cached(gateway):
    """Bob sends the prompt Alice sent: were it served from her slot's cache, his first
    token would come sooner, and he would learn what she asked. The gateway lets only the
    tenant that used a slot last reuse it (gateway.backends.slots). Straight to llama-server, without
    the gateway (it picks the slot most like the prompt), the same request reuses her
    cache: the attack is real."""
    secret = [{"role": "system", "content": "Internal memo: the merger with Northwind closes on May 3rd. " * 12},
              {"role": "user", "content": "Summarise the memo."}]
    hers = turn(gateway, list(secret), "alice")
    assert turn(gateway, list(secret), "alice")["cached_tokens"] >= hers["prompt_tokens"] - 1  # she gains
    his = turn(gateway, list(secret), "bob", key=BOB)
    assert his["cached_tokens"] < his["prompt_tokens"] // 10, his
    leaked = requests.post(hers["replica"] + "/v1/chat/completions", timeout=120, json={
        "messages": secret, "max_tokens": 1, "cache_prompt": True}).json()["usage"]
    assert leaked["prompt_tokens_details"]["cached_tokens"] >= leaked["prompt_tokens"] - 1, leaked


def test_a_killed_replica_moves_its_conversations_and_they_succeed(start_gateway, pair, backends, logs):
    # A gateway of its own: the conversations of the tests above are still live in the
    # module's (they hold slots for slot_ttl), and four more on one replica of four slots
    # would evict each other, which is not what this test is about.
    gateway = affinity_gateway(start_gateway, pair, logs / "affinity-kill.log")
    conversations = openings_covering(pair, 2)
    for messages in conversations:
        assert turn(gateway, messages, "before")["replica"] == home(messages[:2], pair)
    # the replica the spill test's conversation does not prefer: the survivor is the one
    # whose slots that conversation holds, so the moved conversations take those
    survivor = home(opening(1000), pair)
    victim = next(url for url in pair if url != survivor)
    backends.kill(victim)
    moved = [turn(gateway, messages, "moved") for messages in conversations]
    assert all(line["status"] == 200 and line["replica"] == survivor for line in moved)
    # once the health check has seen it go, the router itself sends them on (spilled)
    displaced = next(messages for messages in conversations if home(messages[:2], pair) == victim)
    wait_for(lambda: turn(gateway, list(displaced), "probe")["routing"] == "spill")
    # A turn that failed over ran in the slot number chosen on the dead replica; routed by the
    # router itself, each conversation takes a slot of its own on the survivor and keeps it.
    settled = [turn(gateway, messages, "settle") for messages in conversations]
    again = [turn(gateway, messages, "again") for messages in conversations]
    assert all(line["status"] == 200 and line["replica"] == survivor for line in settled + again)
    for before, after in zip(settled, again):
        assert after["cached_tokens"] >= before["prompt_tokens"] - 1, (before, after)
