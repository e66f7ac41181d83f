"""Requests that make several answers (a prompt list, ``n``) through the real parts:
gunicorn with 2 gevent workers, a real llama-server (2 slots), validate, ratelimit and
quota on a redis-server of our own, the ledger in a PostgreSQL of our own.

Every answer of a request counts: against ``max_n`` before it is sent, in the quota's
reservation (each answer's ``max_tokens``), and in the usage that the ledger records,
the quota settles and the token rate limit charges (summed over the answers)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
import requests

import plugins.quota as quota_plugin

from .conftest import gateway_doc
from .test_postgres import add_key, ledger_rows, poll

MAX_N = 4


@pytest.fixture(scope="module")
def stack(start_gateway, chat_backend, embeddings_backend, postgres, redis_url):
    doc = gateway_doc(chat_backend, embeddings_backend, pipelines={"default": [
        {"auth": {"keys_db": postgres.url, "keys_db_poll_interval": 0.2, "env_keys": {}}},
        {"validate": {"max_n": MAX_N}},
        {"ratelimit": {"store": "redis", "redis_url": redis_url, "requests_per_minute": None,
                       "tokens_per_minute": None}},
        {"quota": {"redis_url": redis_url}},
        {"ledger": {"database": postgres.url, "flush_interval": 0.2}},
    ]})
    doc["routes"]["/completion"] = "default"
    return start_gateway(doc, workers=2)


def post(stack, key: str, route: str, body: dict[str, Any]) -> requests.Response:
    """The body as these exact bytes (the quota's prompt bound counts them)."""
    return requests.post(stack.url + route, data=json.dumps(body), timeout=120,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                  "Connection": "close"})


def ready(stack, postgres, client: str, *limits: str) -> str:
    """A new key of its own client, once both workers know it."""
    key = add_key(postgres, client, *limits)
    # a body validate refuses: past auth (400, not 401), before the rate limit and the quota
    invalid = {"model": "smollm2", "n": 0, "messages": [{"role": "user", "content": "Hi"}]}
    assert poll(lambda: all(post(stack, key, "/v1/chat/completions", invalid).status_code == 400 for _ in range(4)),
                timeout=10)
    # Four answers may all come from one worker (the kernel does not deal connections in
    # turn); the other polls the keys database every 0.2 s too, so five of its polls later
    # it knows the key as well. (A CI run saw a 401 from the other worker right after.)
    time.sleep(1.0)
    return key


def quota_used(redis_url: str, client: str) -> int:
    label, _ = quota_plugin.window_of("day", time.time())
    return int(redis.Redis.from_url(redis_url).get(f"llamagate:quota:{client}:tokens:{label}") or 0)


def test_a_prompt_list_counts_every_prompt_times_n_against_max_n(stack, postgres):
    key = ready(stack, postgres, "lena")
    prompts = [f"Prompt {i}:" for i in range(MAX_N + 1)]
    for body, param in (({"prompt": prompts}, "prompt"),                       # 5 prompts
                        ({"prompt": prompts[:2], "n_cmpl": 3}, "prompt"),     # 2 prompts x 3
                        ({"prompt": [[1, 2], "x", [3]], "n": 2}, "prompt"),   # token lists are prompts too
                        ({"prompt": "Hi", "n": MAX_N + 1}, "n")):
        answer = post(stack, key, "/completion", {"model": "smollm2", "n_predict": 4, **body})
        assert answer.status_code == 400, (body, answer.text[:300])
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert f"the most this gateway allows is {MAX_N}" in error["message"]
    # within max_n: answered, one answer per prompt and choice
    answer = post(stack, key, "/completion", {"model": "smollm2", "n_predict": 2, "prompt": prompts[:2], "n": 2})
    assert answer.status_code == 200 and len(answer.json()) == 4


def test_a_prompt_lists_usage_is_summed_for_the_ledger_the_quota_and_the_rate_limit(stack, postgres, redis_url):
    # 120 tokens a minute: the batch below makes more than that, so its charge shows
    key = ready(stack, postgres, "pia", "--tokens-per-day", "1000000", "--tpm", "120")
    before = quota_used(redis_url, "pia")
    body = {"model": "smollm2", "prompt": ["One,", "Two, three,", "Four, five, six,", "Seven"], "n_predict": 48,
            "ignore_eos": True}
    answer = post(stack, key, "/completion", body)
    assert answer.status_code == 200, answer.text[:300]
    answers = answer.json()
    assert isinstance(answers, list) and len(answers) == 4
    assert all(one["model"] == "smollm2" for one in answers)  # the public id, not the backend's file
    completion = sum(one["tokens_predicted"] for one in answers)
    prompt = sum(one["tokens_evaluated"] for one in answers)
    assert completion == 4 * 48
    # the ledger's row holds every answer's tokens
    rows = poll(lambda: [r for r in ledger_rows(postgres, "pia") if r["route"] == "/completion"], timeout=20)
    assert len(rows) == 1
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"], rows[0]["total_tokens"]) == \
        (prompt, completion, prompt + completion)
    # the quota settled the real total (not one answer's reservation)
    assert poll(lambda: quota_used(redis_url, "pia") - before == prompt + completion, timeout=10), \
        quota_used(redis_url, "pia") - before
    # the token rate limit was charged the total: the next request waits for it to refill
    refused = post(stack, key, "/v1/chat/completions", {"model": "smollm2", "max_tokens": 1,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert refused.status_code == 429, refused.text[:300]
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"


def test_a_streamed_prompt_lists_usage_is_summed_in_the_ledger(stack, postgres):
    key = ready(stack, postgres, "sol")
    body = {"model": "smollm2", "prompt": ["Alpha beta", "Gamma"], "n_predict": 12, "ignore_eos": True,
            "stream": True}
    evaluated: dict[int, int] = {}
    with requests.post(stack.url + "/completion", json=body, stream=True, timeout=120,
                       headers={"Authorization": f"Bearer {key}"}) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            event = json.loads(line[6:]) if line.startswith(b"data: {") else None
            if event and event.get("stop"):
                evaluated[event["index"]] = event["tokens_evaluated"]
    assert sorted(evaluated) == [0, 1]
    rows = poll(lambda: [r for r in ledger_rows(postgres, "sol") if r["route"] == "/completion"], timeout=20)
    assert len(rows) == 1
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (sum(evaluated.values()), 2 * 12)


def test_the_quota_reserves_max_tokens_for_every_answer(stack, postgres, redis_url):
    chat = {"model": "smollm2", "max_tokens": 100, "messages": [{"role": "user", "content": "Say hi."}]}
    batch = {"model": "smollm2", "n_predict": 100, "prompt": ["One", "Two", "Three"]}
    for client, route, many, one in (("nia", "/v1/chat/completions", dict(chat, n=2), dict(chat, n=1)),
                                     ("bao", "/completion", batch, dict(batch, prompt="One"))):
        # a quota that holds one answer's budget and prompt, not two answers'
        quota = len(json.dumps(one)) + 150
        key = ready(stack, postgres, client, "--tokens-per-day", str(quota))
        refused = post(stack, key, route, many)
        assert refused.status_code == 429, (route, refused.text[:300])
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded" and "answers" in error["message"]
        assert post(stack, key, route, one).status_code == 200  # nothing was reserved for the refused one


def test_a_completions_prompt_list_counts_each_prompts_tokens(stack, postgres):
    key = ready(stack, postgres, "oda")
    client = stack.client(api_key=key)
    prompts = ["Alpha beta gamma delta", "Epsilon"]
    alone = [client.completions.create(model="smollm2", prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts]
    assert alone[0] != alone[1]
    whole = client.completions.create(model="smollm2", prompt=prompts, max_tokens=4, extra_body={"ignore_eos": True})
    assert len(whole.choices) == 2
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (sum(alone), 8)
    streamed = client.completions.create(model="smollm2", prompt=prompts, n=2, max_tokens=3, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (sum(alone), 12)
    rows = poll(lambda: (lambda found: found if len(found) >= 4 else None)(
        [r for r in ledger_rows(postgres, "oda") if r["route"] == "/v1/completions"]), timeout=20)
    assert sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows) == \
        sorted([(alone[0], 1), (alone[1], 1), (sum(alone), 8), (sum(alone), 12)])
