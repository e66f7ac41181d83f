"""Unit tests of the pieces behind keys in PostgreSQL, the ledger and quotas (the real
parts run in tests/integration/test_postgres.py)."""

from __future__ import annotations

import time
from datetime import date, datetime, timezone

import pytest

import plugins.ledger as ledger_plugin
import plugins.quota as quota_plugin
from gateway import Principal, RequestContext
from gateway.storage import keydb, ledger, pg
from gateway.storage import keys as keys_storage
from gateway.testing import free_port


def test_urls_are_parsed_like_libpq():
    target = pg.parse_url("postgresql://bob:s%40cret@db.example:6543/bills?sslmode=require")
    assert (target.user, target.password, target.host, target.port, target.database, target.tls) == \
        ("bob", "s@cret", "db.example", 6543, "bills", True)
    socket = pg.parse_url("postgresql:///llamagate?host=/run/postgresql&port=5433")
    assert socket.unix_socket == "/run/postgresql/.s.PGSQL.5433" and socket.database == "llamagate"
    assert pg.parse_url("postgres://localhost").user == "postgres"
    for bad in ("mysql://x/y", "postgresql://h:notaport/db", "postgresql://h/db?sslmode=sometimes"):
        with pytest.raises(ValueError):
            pg.parse_url(bad)


def test_a_migration_script_splits_into_statements_at_line_ends():
    script = "CREATE TABLE a (x int);\nCREATE FUNCTION f() AS $$ BEGIN x; y; END $$;\n  \nSELECT 1"
    assert pg.split_sql(script) == ["CREATE TABLE a (x int)", "CREATE FUNCTION f() AS $$ BEGIN x; y; END $$",
                                    "SELECT 1"]
    for migrations in (keydb.MIGRATIONS, ledger.MIGRATIONS):
        assert all(pg.split_sql(script) for script in migrations)


def test_usage_day_ranges_are_checked():
    today = date(2026, 11, 23)
    assert ledger.day_range(None, None, today) == (date(2026, 10, 25), today)
    assert ledger.day_range("2026-11-01", "2026-11-02", today) == (date(2026, 11, 1), date(2026, 11, 2))
    for start, end in (("yesterday", None), ("2026-13-01", None), ("2026-11-02", "2026-11-01"),
                       ("2020-01-01", "2026-01-01"), ("2026-1-1", None)):
        with pytest.raises(ValueError):
            ledger.day_range(start, end, today)


def test_quota_windows_end_at_the_utc_day_and_month():
    now = datetime(2026, 2, 28, 23, 59, 30, tzinfo=timezone.utc).timestamp()
    assert quota_plugin.window_of("day", now) == ("2026-02-28", pytest.approx(30))
    assert quota_plugin.window_of("month", now) == ("2026-02", pytest.approx(30))
    assert quota_plugin.window_of("day", now + 60)[0] == "2026-03-01"
    assert quota_plugin.window_of("month", now + 60)[0] == "2026-03"


def test_a_keys_role_and_own_limits_make_its_quota():
    plugin = quota_plugin.Plugin({"tokens_per_day": 1000, "tokens_per_month": None, "requests_per_day": None,
                                  "roles": {"admin": {"tokens_per_day": None}}, "reserve_tokens": 10,
                                  "redis_url": "redis://127.0.0.1:1/0", "timeout": 0.1, "fail_open": True})
    assert plugin.limits(Principal("a")) == {"tokens_per_day": 1000}
    assert plugin.limits(Principal("a", role="admin")) == {}
    assert plugin.limits(Principal("a", limits={"requests_per_day": 3, "tokens_per_day": 0})) == \
        {"tokens_per_day": 1000, "requests_per_day": 3}  # a zero is ignored, never a lift


def test_an_expired_key_stops_at_its_time_without_a_poll():
    mirror = keydb.KeyMirror("postgresql://127.0.0.1:1/x")
    principal = Principal("eve", key_id="abc")
    mirror.snapshot = keydb.Snapshot(1, {"h": principal}, {"h": 1000.0})
    assert mirror.lookup("h", now=999.0) is principal
    assert mirror.lookup("h", now=1000.0) is None
    assert mirror.lookup("other", now=0) is None


def finished_context(**fields) -> RequestContext:
    ctx = RequestContext(request_id="r1", method="POST", route="/v1/chat/completions", pipeline="default", **fields)
    ctx.status = 200
    return ctx


def test_a_ledger_row_holds_what_the_request_did():
    ctx = finished_context(principal=Principal("alice", key_id="0123456789ab"), model="smollm2", backend="chat",
                           replica="http://r1", bytes_in=50, bytes_out=700, cache="MISS",
                           usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15.0})
    ctx.timings["queue.chat"] = 2.5
    row = ledger_plugin.row_of(ctx, "ok", time.time())
    assert {k: row[k] for k in ("client", "key_id", "model", "status", "outcome", "prompt_tokens", "total_tokens",
                                "queue_ms", "bytes_in", "bytes_out", "cache_hit", "backend")} == \
        {"client": "alice", "key_id": "0123456789ab", "model": "smollm2", "status": 200, "outcome": "ok",
         "prompt_tokens": 10, "total_tokens": 15, "queue_ms": 2.5, "bytes_in": 50, "bytes_out": 700,
         "cache_hit": False, "backend": "chat"}
    broken = ledger_plugin.row_of(finished_context(usage={"total_tokens": "many", "prompt_tokens": -1}), "error", 0)
    assert broken["total_tokens"] is None and broken["prompt_tokens"] is None and broken["client"] is None


def test_the_buffer_is_bounded_while_the_database_is_down_and_drops_are_counted():
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/x"  # nothing listens there
    writer = ledger_plugin.Writer(dead, buffer_rows=3, batch_rows=2, flush_interval=60, timeout=0.5)
    writer.thread = object()  # no background thread: this test flushes by hand
    assert [writer.add({"n": i}) for i in range(5)] == [True, True, True, False, False]
    assert writer.dropped == 2
    assert writer.flush() is False and writer.down
    assert len(writer.buffer) == 3  # kept for when the database is back
    writer.stop(time.monotonic())  # a stopping worker: tries, then says what is lost
    assert len(writer.buffer) == 3


def test_while_the_database_is_down_the_writer_retries_at_least_every_flush_interval():
    # Rows reach the usage API within about flush_interval, also once a database that was
    # down comes back: the retries back off, but never wait longer than flush_interval.
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/x"  # nothing listens there
    writer = ledger_plugin.Writer(dead, buffer_rows=10, batch_rows=5, flush_interval=1.0, timeout=0.5)
    writer.buffer.append({"n": 1})
    waits = []

    class Wake:  # the writer's event: records each wait, and stops the loop after ten
        def wait(self, timeout):
            waits.append(timeout)
            if len(waits) == 10:
                writer.stopped.set()

        def clear(self):
            pass

    writer.wake = Wake()
    writer._run()
    assert len(waits) == 10 and writer.down
    assert waits[0] == 1.0 and waits[1] < 1.0  # the first retry comes sooner than a flush
    assert max(waits) <= 1.0


def test_plugins_refuse_a_bad_database_url_when_the_config_is_checked():
    with pytest.raises(ValueError, match="database"):
        ledger_plugin.Plugin({"database": "mysql://x", "buffer_rows": 10, "batch_rows": 5, "flush_interval": 1,
                              "timeout": 1, "shutdown_flush_seconds": 1, "record_unauthenticated": False,
                              "usage_route": None, "admin_usage_route": None})


def test_a_usage_csv_cell_a_spreadsheet_would_run_as_a_formula_gets_a_quote():
    rows = [{"day": "2026-01-02", "client": client, "key_id": "0123456789ab", "model": None, "requests": 1,
             "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
            for client in ("=SUM(A1)", "+1", "-1", "@x", "\tx", "a=b", "<b>")]
    lines = ledger.usage_csv(rows).splitlines()
    assert lines[0] == "day,client,key_id,model,requests,prompt_tokens,completion_tokens,total_tokens"
    assert [line.split(",")[1] for line in lines[1:]] == ["'=SUM(A1)", "'+1", "'-1", "'@x", "'\tx", "a=b", "<b>"]
    assert lines[1] == "2026-01-02,'=SUM(A1),0123456789ab,,1,2,3,5"


@pytest.mark.parametrize("client, problem", [("", "non-empty"), ("  ", "non-empty"), ("x" * 65, "at most 64"),
                                             ("a\nb", "control"), ("a\u202eb", "control"), (None, "non-empty")])
def test_a_new_keys_client_id_is_checked(client, problem):
    with pytest.raises(ValueError, match=problem):
        keys_storage.check_client_id(client)
    assert keys_storage.check_client_id(" <script>x</script> ") == "<script>x</script>"  # shown escaped, not refused
