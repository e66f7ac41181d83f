"""Keys, the usage ledger and quotas through the real parts: gunicorn with 2 gevent
workers, a real llama-server, a PostgreSQL cluster of our own and a redis-server of
our own (see conftest.py's ``postgres`` and ``redis_url``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import ROOT, gateway_doc

CHAT = [{"role": "user", "content": "Say hi."}]


def cli(postgres, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def add_key(postgres, client: str, *extra: str) -> str:
    result = cli(postgres, "keys", "add", "--db", postgres.url, "--client", client, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def chat(url: str, key: str, **body: Any) -> requests.Response:
    payload = {"model": "smollm2", "messages": CHAT, "max_tokens": 8, **body}
    # a new connection each time: gunicorn's two workers both get some
    with requests.Session() as session:
        return session.post(url + "/v1/chat/completions", json=payload, timeout=60,
                            headers={"Authorization": f"Bearer {key}", "Connection": "close"})


def poll(what, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def stack(start_gateway, chat_backend, embeddings_backend, postgres, redis_url, logs):
    clock_file = logs / "quota-clock-offset"
    clock_file.write_text("0")
    admin = None
    doc = gateway_doc(chat_backend, embeddings_backend, pipelines={"default": [
        {"auth": {"keys_db": postgres.url, "keys_db_poll_interval": 0.2, "env_keys": {}}},
        {"shifted_clock": {"offset_file": str(clock_file)}},
        {"cache": {"ttl": 300, "store": "redis", "redis_url": redis_url}},
        {"quota": {"redis_url": redis_url, "reserve_tokens": 64}},
        # a hung database must show: a write stuck on it would hold a request 30 s
        {"ledger": {"database": postgres.url, "flush_interval": 0.2, "timeout": 30}},
    ]}, admin_pipeline="default")
    doc["routes"].update({"/v1/usage": {"pipeline": "default"}, "/admin/usage": {"pipeline": "default"}})
    admin = add_key(postgres, "ops", "--role", "admin")
    gateway = start_gateway(doc, workers=2)
    gateway.admin = admin
    gateway.clock_file = clock_file
    return gateway


def ledger_rows(postgres, client: str) -> list[dict[str, Any]]:
    names = ["request_id", "outcome", "status", "error", "prompt_tokens", "completion_tokens", "total_tokens",
             "cache_hit", "model", "route", "key_id", "latency_ms", "ttfb_ms", "queue_ms", "bytes_in", "bytes_out",
             "backend", "replica"]
    try:
        rows = postgres.query(f"SELECT {', '.join(names)} FROM llamagate_requests WHERE client = :c", c=client)
    except Exception:  # noqa: BLE001 - the table is made by the first write
        return []
    return [dict(zip(names, row)) for row in rows]


def test_keys_added_with_the_cli_work_at_once_and_a_revoke_reaches_both_workers_within_a_second(stack, postgres):
    key = add_key(postgres, "kim", "--models", "smollm2")
    # "at once": within the mirrors' poll interval (0.2 s here), on both workers
    assert poll(lambda: all(chat(stack.url, key).status_code == 200 for _ in range(4)), timeout=5)
    for _ in range(6):
        assert chat(stack.url, key).status_code == 200
    assert chat(stack.url, key, model="smollm2-embeddings").status_code == 403  # its models only

    # the URL from the environment: a password in it stays out of the process list
    result = cli(postgres, "keys", "revoke", "kim", LLAMAGATE_DATABASE_URL=postgres.url)
    revoked_at = time.monotonic()
    assert result.returncode == 0 and "revoked 1" in result.stdout, result.stderr
    # a second later, every worker refuses it
    time.sleep(max(0.0, 1.0 - (time.monotonic() - revoked_at)))
    statuses = [chat(stack.url, key).status_code for _ in range(12)]
    assert statuses == [401] * 12
    listed = cli(postgres, "keys", "list", "--db", postgres.url, "--all")
    assert "kim" in listed.stdout and "revoked" in listed.stdout
    assert key not in listed.stdout and key not in json.dumps(postgres.query("SELECT * FROM llamagate_keys"),
                                                              default=str)


def test_rotate_gives_a_new_key_and_retires_the_old(stack, postgres):
    old = add_key(postgres, "rita")
    assert poll(lambda: chat(stack.url, old).status_code == 200, timeout=5)
    result = cli(postgres, "keys", "rotate", "--db", postgres.url, "rita")
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip().splitlines()[-1]
    assert poll(lambda: chat(stack.url, new).status_code == 200 and chat(stack.url, old).status_code == 401, timeout=5)
    # with a grace period both work until the old one expires; an expired key is refused
    result = cli(postgres, "keys", "rotate", "--db", postgres.url, "rita", "--grace", "600")
    newer = result.stdout.strip().splitlines()[-1]
    assert poll(lambda: chat(stack.url, newer).status_code == 200, timeout=5)
    assert chat(stack.url, new).status_code == 200
    expired = add_key(postgres, "old-timer", "--expires", "2020-01-01T00:00")
    later = add_key(postgres, "old-timer-2")
    assert poll(lambda: chat(stack.url, later).status_code == 200, timeout=5)  # the mirrors have both rows
    assert chat(stack.url, expired).status_code == 401


def test_known_keys_keep_working_while_the_database_is_down(stack, postgres):
    key = add_key(postgres, "dana")
    assert poll(lambda: chat(stack.url, key).status_code == 200, timeout=5)
    postgres.stop()
    try:
        for _ in range(8):  # both workers, from their last known keys
            assert chat(stack.url, key).status_code == 200
        assert chat(stack.url, "sk-lg-not-a-key").status_code == 401
    finally:
        postgres.start()
    # and the mirrors follow the database again once it is back
    later = add_key(postgres, "dana-2")
    assert poll(lambda: chat(stack.url, later).status_code == 200, timeout=10)
    assert "unreachable" in stack.proc.output() or "unreachable" in stack.proc.log.read_text()


def stream(url: str, key: str, leave_after: int | None = None, **body: Any) -> dict[str, Any] | None:
    """A streamed answer: its usage chunk, or None when left after ``leave_after`` events."""
    payload = {"model": "smollm2", "messages": CHAT, "max_tokens": 8, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    with requests.post(url + "/v1/chat/completions", json=payload, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        usage, events = None, 0
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            events += 1
            if leave_after is not None and events >= leave_after:
                return None  # the connection closes here: the client left
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
        return usage


def test_fifty_mixed_requests_make_exactly_fifty_rows_with_llama_servers_usage(stack, postgres):
    key = add_key(postgres, "mia")
    assert poll(lambda: chat(stack.url, key).status_code == 200, timeout=5)  # row 1
    expected = {"ok": 1, "error": 0, "client_gone": 0}
    usages: list[dict[str, Any]] = []
    # ignore_eos: the answer cannot end on its own before the client leaves (SmolLM2 sometimes
    # answered in a few tokens, and a stream that ended is "ok", not "client_gone")
    long_ask = dict(max_tokens=200, ignore_eos=True, messages=[{"role": "user", "content": "Count from 1 to 100."}])
    for i in range(49):
        kind = i % 5
        if kind == 0:  # plain
            answer = chat(stack.url, key, messages=[{"role": "user", "content": f"Say {i}."}])
            assert answer.status_code == 200
            usages.append(answer.json()["usage"])
            expected["ok"] += 1
        elif kind == 1:  # streamed
            usages.append(stream(stack.url, key, messages=[{"role": "user", "content": f"Say {i}."}]))
            expected["ok"] += 1
        elif kind == 2:  # a stream left early
            assert stream(stack.url, key, leave_after=3, **long_ask) is None
            expected["client_gone"] += 1
        elif kind == 3:  # an error
            assert chat(stack.url, key, model="no-such-model").status_code == 404
            expected["error"] += 1
        else:  # deterministic: the second and later are cache hits
            answer = chat(stack.url, key, temperature=0, seed=1, messages=[{"role": "user", "content": "Cached?"}])
            assert answer.status_code == 200
            expected["ok"] += 1
    rows = poll(lambda: (lambda found: found if len(found) >= 50 else None)(ledger_rows(postgres, "mia")), timeout=20)
    assert rows is not None and len(rows) == 50
    time.sleep(0.5)  # two more flush intervals: no 51st row comes
    rows = ledger_rows(postgres, "mia")
    assert len(rows) == 50
    outcomes = {name: sum(r["outcome"] == name for r in rows) for name in expected}
    assert outcomes == expected
    assert len({r["request_id"] for r in rows}) == 50
    assert all(r["key_id"] and len(r["key_id"]) == 12 for r in rows)
    # tokens: each answered request's row holds llama-server's own usage
    answered = sorted((r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) for r in rows
                      if r["outcome"] == "ok" and not r["cache_hit"] and r["prompt_tokens"] is not None)
    for usage in usages:
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) in answered
    # streams left early: llama-server's count of what it generated before the client left
    gone = [r for r in rows if r["outcome"] == "client_gone"]
    assert all(r["prompt_tokens"] and 0 < r["completion_tokens"] < 200 for r in gone), gone
    hits = [r for r in rows if r["cache_hit"]]
    assert len(hits) >= 8 and all(r["status"] == 200 for r in hits)
    errors = [r for r in rows if r["outcome"] == "error"]
    assert all(r["status"] == 404 and r["error"] == "model_not_found" and r["total_tokens"] is None for r in errors)
    served = [r for r in rows if r["outcome"] == "ok" and not r["cache_hit"]]
    assert all(r["backend"] == "chat" and r["replica"] and r["ttfb_ms"] and r["queue_ms"] is not None
               and r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in served)

    # the usage API: the caller's own, by day and model; admins see everyone's
    own = requests.get(stack.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert own.status_code == 200
    data = own.json()["data"]
    assert {d["client"] for d in data} == {"mia"}
    assert sum(d["requests"] for d in data) == 50
    assert sum(d["total_tokens"] for d in data) == sum(r["total_tokens"] or 0 for r in rows)
    assert requests.get(stack.url + "/admin/usage", headers={"Authorization": f"Bearer {key}"},
                        timeout=10).status_code == 403
    everyone = requests.get(stack.url + "/admin/usage?client=mia", timeout=10,
                            headers={"Authorization": f"Bearer {stack.admin}"}).json()["data"]
    # (the usage queries are requests too, with no model: their rows may have come since)
    model_rows = lambda entries: [e for e in entries if e["model"] is not None]  # noqa: E731
    assert model_rows(everyone) == model_rows(data)
    top = requests.get(stack.url + "/admin/usage?top=5", headers={"Authorization": f"Bearer {stack.admin}"},
                       timeout=10).json()["data"]
    assert "mia" in [t["client"] for t in top]
    bad = requests.get(stack.url + "/v1/usage?from=yesterday", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"
    printed = cli(postgres, "usage", "--db", postgres.url, "--client", "mia", "--json")
    assert printed.returncode == 0 and model_rows(json.loads(printed.stdout)) == model_rows(data)


def test_a_daily_token_quota_refuses_the_request_that_would_exceed_it_on_both_workers_until_the_next_day(
        stack, postgres):
    key = add_key(postgres, "quinn", "--tokens-per-day", "400")
    assert poll(lambda: chat(stack.url, key).status_code == 200, timeout=5)
    refused = None
    for _ in range(40):
        answer = chat(stack.url, key)
        if answer.status_code != 200:
            refused = answer
            break
        assert int(answer.headers["x-quota-remaining-tokens-day"]) >= 0
    assert refused is not None and refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["x-quota-limit-tokens-day"] == "400"
    rows = poll(lambda: ledger_rows(postgres, "quinn"))
    used = sum(r["total_tokens"] or 0 for r in rows)
    assert used <= 400
    # refused on every worker, whichever serves it
    assert [chat(stack.url, key).status_code for _ in range(8)] == [429] * 8
    # and it can still read its usage
    assert requests.get(stack.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"},
                        timeout=10).status_code == 200
    # the next day (every worker's clock moved: the offset file), the quota is fresh
    stack.clock_file.write_text(str(86400))
    try:
        assert [chat(stack.url, key).status_code for _ in range(4)] == [200] * 4
    finally:
        stack.clock_file.write_text("0")


def test_concurrent_requests_cannot_race_past_a_quota_and_a_key_without_one_is_not_limited(stack, postgres):
    key = add_key(postgres, "rex", "--requests-per-day", "5")
    assert poll(lambda: chat(stack.url, key).status_code == 200, timeout=5)  # 1 of 5
    statuses: list[int] = []

    def one() -> None:
        statuses.append(chat(stack.url, key).status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 4 + [429] * 12
    free = add_key(postgres, "free")
    assert poll(lambda: chat(stack.url, free).status_code == 200, timeout=5)
    answer = chat(stack.url, free)
    assert answer.status_code == 200 and not any(h.startswith("x-quota") for h in answer.headers)
    # another tenant's use is not this one's
    other = add_key(postgres, "rex-neighbour", "--requests-per-day", "5")
    assert poll(lambda: chat(stack.url, other).status_code == 200, timeout=5)


def test_a_paused_database_slows_no_request_and_loses_no_row(stack, postgres):
    key = add_key(postgres, "pat")
    assert poll(lambda: chat(stack.url, key).status_code == 200, timeout=5)
    before = [chat(stack.url, key) for _ in range(4)]
    baseline = max(r.elapsed.total_seconds() for r in before)
    postgres.pause()  # every server process stopped: writes hang (timeout 30 s)
    try:
        during = [chat(stack.url, key) for _ in range(12)]
    finally:
        postgres.resume()
    assert all(r.status_code == 200 for r in during)
    # no request waited on the hung database (a write on the request path would take 30 s)
    slowest = max(r.elapsed.total_seconds() for r in during)
    assert slowest < baseline + 3.0, (baseline, slowest)
    rows = poll(lambda: (lambda found: found if len(found) >= 17 else None)(ledger_rows(postgres, "pat")), timeout=60)
    assert rows is not None and len(rows) == 17
    ids = {r["request_id"] for r in rows}
    assert all(r.headers["x-request-id"] in ids for r in during)


def test_the_driver_does_not_block_the_gevent_hub(postgres, tmp_path):
    """A slow query (pg_sleep) in one greenlet; the other greenlets of the process run on."""
    script = tmp_path / "green.py"
    script.write_text(textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import gevent, time
        from gateway.storage import pg
        ticks = []
        def tick():
            while True:
                ticks.append(time.monotonic()); gevent.sleep(0.01)
        def slow():
            conn = pg.connect({postgres.url!r})
            started = time.monotonic(); conn.run("SELECT pg_sleep(1)")
            return started, time.monotonic()
        ticker = gevent.spawn(tick)
        started, ended = gevent.spawn(slow).get()
        during = [t for t in ticks if started < t < ended]
        print(len(during))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 20  # ~100 ticks of 10 ms fit in the 1 s query; a blocked hub: 0


def test_the_usage_route_cannot_be_read_without_a_key(stack):
    assert requests.get(stack.url + "/v1/usage", timeout=10).status_code == 401
    assert requests.get(stack.url + "/admin/usage", timeout=10).status_code == 401


def test_a_reloading_and_a_stopping_worker_write_their_buffered_rows(start_gateway, chat_backend, embeddings_backend,
                                                                    postgres):
    admin = add_key(postgres, "flusher")
    doc = gateway_doc(chat_backend, embeddings_backend, pipelines={"default": [
        {"auth": {"keys_db": postgres.url, "env_keys": {}}},
        # rows would wait a minute: only the flush of a retiring plugin can write them sooner
        {"ledger": {"database": postgres.url, "flush_interval": 60}},
    ]})
    gateway = start_gateway(doc, workers=1)
    assert poll(lambda: chat(gateway.url, admin).status_code == 200, timeout=5)
    chat(gateway.url, admin)
    assert ledger_rows(postgres, "flusher") == []  # still buffered
    # a reload (the file changed) retires the plugin instance: its buffer is written
    doc["health_interval"] = 2
    gateway.config.write_text(json.dumps(doc))
    assert poll(lambda: len(ledger_rows(postgres, "flusher")) == 2, timeout=30)
    for _ in range(3):
        assert chat(gateway.url, admin).status_code == 200
    assert len(ledger_rows(postgres, "flusher")) == 2
    gateway.proc.stop()  # SIGTERM: the worker exits, its plugins flush
    assert len(ledger_rows(postgres, "flusher")) == 5


def test_migrations_run_once_whoever_starts_at_the_same_time_and_a_newer_schema_is_refused(postgres):
    from gateway.storage import pg

    migrations = ("CREATE TABLE mig_test (n int);\nINSERT INTO mig_test VALUES (1);",
                  "INSERT INTO mig_test VALUES (2);")
    versions: list[int] = []

    def start() -> None:
        conn = pg.connect(postgres.url)
        try:
            versions.append(pg.migrate(conn, "mig_test", migrations))
        finally:
            conn.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert versions == [2] * 6
    assert postgres.query("SELECT n FROM mig_test ORDER BY n") == [[1], [2]]  # each script ran once
    start()  # and again, later: nothing to do
    assert postgres.query("SELECT count(*) FROM mig_test") == [[2]]
    conn = pg.connect(postgres.url)
    try:
        with pytest.raises(RuntimeError, match="newer"):
            pg.migrate(conn, "mig_test", migrations[:1])  # an older gateway against a newer schema
    finally:
        conn.close()
