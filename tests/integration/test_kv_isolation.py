"""The tenant boundary on llama-server's KV cache, through the real parts: the shipped
``pipelines.yaml`` (its pipeline, its router, its launch options) under gunicorn with two
gevent workers, whose fleet launches SmolLM2, and two user keys. Alice sends a long
prompt; Bob sends the same prompt on every model route that carries one: llama-server's
own count of the tokens it reused (each route's ``cached_tokens`` or ``cache_n``) must
show none of hers. Alice's own repeat reuses hers (so the measurement can see reuse).

Token counts are the evidence, not time: they come from llama-server itself.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml

from gateway.testing import free_ports

from .conftest import ROOT
from .test_fleet import wait_for

ALICE, BOB = "sk-kv-alice-" + "a" * 24, "sk-kv-bob-" + "b" * 24
# ~500 tokens, different for each test so that no test sees another's prompt
MEMO = ("Internal memo {n}: the merger of Contoso and Northwind closes on May {n}rd; the price is "
        "{n}4 dollars a share, and nobody outside the board may know it yet. ") * 14
_serial = itertools.count(1)


def secret() -> str:
    return MEMO.format(n=next(_serial))


@pytest.fixture(scope="module")
def shipped(start_gateway: Callable[..., Any], model_path: Path, logs: Path, redis_url: str) -> Any:
    """The shipped pipelines.yaml, as shipped but for its ports, folders, keys (from the
    environment, as its auth's env_keys reads them), its rate limits in Redis (two workers)
    and one more route: llama-server's native /completion. Its chat backend's launch
    options are the shipped ones."""
    doc = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    for backend in doc["backends"].values():
        backend["launch"]["model"] = str(model_path.resolve())
    ports = free_ports(2)
    doc["fleet"].update(ports={"first": ports[0], "last": ports[-1]}, log_dir=str(logs / "kv-fleet"))
    doc["routes"]["/completion"] = "default"
    gw = start_gateway(doc, workers=2, OPENAI_API_KEYS=f"{ALICE}:alice,{BOB}:bob",
                       LLAMAGATE_ACCESS_LOG=str(logs / "kv-access.log"), LLAMAGATE_KEYS_FILE=str(logs / "kv-none.yaml"),
                       RATELIMIT_STORE="redis", REDIS_URL=redis_url)
    # the chat model starts with the gateway (start: eager); wait until it answers
    wait_for(lambda: post(gw, "/v1/chat/completions", ALICE, chat_body("hi")).status_code == 200, timeout=180,
             message="the launched llama-server to answer")
    return gw


def post(gw: Any, route: str, key: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(gw.url + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def chat_body(text: str) -> dict[str, Any]:
    # temperature 1 without a seed: the cache plugin stores only deterministic answers
    return {"model": "smollm2", "max_tokens": 1, "temperature": 1,
            "messages": [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": text}]}


# route -> (the request body for a prompt, (prompt tokens, tokens reused from the KV cache) of the answer)
ROUTES: dict[str, tuple[Callable[[str], dict[str, Any]], Callable[[dict[str, Any]], tuple[int, int]]]] = {
    "/v1/chat/completions": (
        chat_body,
        lambda a: (a["usage"]["prompt_tokens"], a["usage"]["prompt_tokens_details"]["cached_tokens"])),
    "/v1/completions": (
        lambda text: {"model": "smollm2", "prompt": text, "max_tokens": 1, "temperature": 1},
        lambda a: (a["usage"]["prompt_tokens"], a["usage"]["prompt_tokens_details"]["cached_tokens"])),
    "/v1/responses": (
        lambda text: {"model": "smollm2", "input": text, "instructions": "You answer in one word.",
                      "max_output_tokens": 1, "temperature": 1},
        lambda a: (a["usage"]["input_tokens"], a["usage"]["input_tokens_details"]["cached_tokens"])),
    "/v1/messages": (
        lambda text: {"model": "smollm2", "system": "You answer in one word.", "max_tokens": 1, "temperature": 1,
                      "messages": [{"role": "user", "content": text}]},
        # Anthropic's shape: input_tokens are the ones processed, cache_read_input_tokens the reused
        lambda a: (a["usage"]["input_tokens"] + a["usage"].get("cache_read_input_tokens", 0),
                   a["usage"].get("cache_read_input_tokens", 0))),
    "/completion": (
        lambda text: {"model": "smollm2", "prompt": text, "n_predict": 1, "temperature": 1},
        lambda a: (a["timings"]["prompt_n"] + a["timings"]["cache_n"], a["timings"]["cache_n"])),
}
# Routes where llama-server places the request itself (it drops id_slot and cache_prompt on
# /v1/messages): the launch option --no-cache-prompt keeps them from reusing anything, their own
# prompts included.
NEVER_REUSED = {"/v1/messages"}
# What Bob may reuse on his own: the chat template and the system prompt or instructions his
# own earlier requests sent (about 17-20 tokens of SmolLM2's template with "You answer in one
# word." and the memos' common "Internal memo"), never Alice's memo: a leak reuses 400 and more.
OWN_PREFIX = 32


def tokens(gw: Any, route: str, key: str, text: str) -> tuple[int, int]:
    body, counts = ROUTES[route]
    resp = post(gw, route, key, body(text))
    assert resp.status_code == 200, resp.text
    return counts(resp.json())


@pytest.mark.parametrize("route", list(ROUTES))
def test_another_tenant_reuses_nothing_of_a_prompt_on_any_route(shipped, route):
    text = secret()
    prompt, _ = tokens(shipped, route, ALICE, text)
    assert prompt > 400  # long enough that a reuse would stand out
    if route not in NEVER_REUSED:
        # she reuses her own prompt (two tries: the router's slot hint is per worker, and
        # gunicorn may hand her first repeat to the worker that has not seen her prompt)
        assert max(tokens(shipped, route, ALICE, text)[1] for _ in range(2)) >= prompt - 8
    probe, reused = tokens(shipped, route, BOB, text)
    assert probe == prompt and reused <= OWN_PREFIX, f"Bob reused {reused} of Alice's {prompt} prompt tokens on {route}"


def test_a_prompt_pushed_out_of_its_slot_by_its_own_tenant_is_not_reused_by_another(shipped):
    """Alice's conversation leaves its slot to her other conversations (more than the
    backend's 4 slots); Bob then replays it: nothing of it may come back for him (the host
    memory prompt cache of llama-server would restore it from RAM)."""
    text = secret()
    prompt, _ = tokens(shipped, "/v1/chat/completions", ALICE, text)
    for n in range(6):
        tokens(shipped, "/v1/chat/completions", ALICE, f"Another question of mine, number {n}: what is {n}+{n}?")
    probe, reused = tokens(shipped, "/v1/chat/completions", BOB, text)
    assert probe == prompt and reused <= OWN_PREFIX, f"Bob reused {reused} of Alice's evicted {prompt} prompt tokens"


def test_an_embedded_text_is_not_reused_by_another_tenants_completion(shipped):
    """Embeddings run in a slot llama-server picks (it ignores id_slot there) and leave the
    text's tokens in it, where a completion on the same llama-server could reuse them: Alice
    embeds a text, Bob sends it as a prompt to the embeddings model."""
    text = secret()[:1400]  # within llama-server's batch of 512 tokens, which an embedding must fit
    embedded = post(shipped, "/v1/embeddings", ALICE, {"model": "smollm2-embeddings", "input": text})
    assert embedded.status_code == 200, embedded.text
    resp = post(shipped, "/v1/completions", BOB, {"model": "smollm2-embeddings", "prompt": text, "max_tokens": 1,
                                                  "temperature": 1})
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 250 and usage["prompt_tokens_details"]["cached_tokens"] <= OWN_PREFIX, usage
