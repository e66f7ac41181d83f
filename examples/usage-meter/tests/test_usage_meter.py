from datetime import datetime, timezone

from gateway import Principal, hookimpl
from gateway.testing import Harness

from llamagate_usage_meter import Plugin

ADMIN, USER = "Bearer admin", "Bearer alice"


class FakeAuth:
    @hookimpl
    def request(self, ctx):
        ctx.principal = {ADMIN: Principal("root", "admin"), USER: Principal("alice")}.get(
            ctx.headers.get("AUTHORIZATION"))


def harness(tmp_path, **config):
    meter = Plugin({"database": str(tmp_path / "usage.sqlite3"), "route": "/v1/usage", "flush_seconds": 60, **config})
    return Harness([FakeAuth(), meter], config={"routes": {"/v1/usage": {"pipeline": "test"}}})


def test_tokens_are_added_up_per_client_and_day(tmp_path):
    with harness(tmp_path) as h:
        h.chat("one", headers={"Authorization": USER})
        h.chat("two", stream=True, headers={"Authorization": USER})  # streams count too
        usage = h.request("GET", "/v1/usage", headers={"Authorization": ADMIN})
    assert usage.status == 200
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert usage.json["data"] == [{"client": "alice", "day": today, "requests": 2, "prompt_tokens": 10,
                                   "completion_tokens": 10, "total_tokens": 20}]


def test_usage_is_for_admins_only(tmp_path):
    with harness(tmp_path) as h:
        result = h.request("GET", "/v1/usage", headers={"Authorization": USER})
        assert result.status == 403 and result.json["error"]["code"] == "admin_required"


def test_queries_filter_by_client_and_day(tmp_path):
    with harness(tmp_path) as h:
        h.chat("one", headers={"Authorization": USER})
        assert h.request("GET", "/v1/usage?client=bob", headers={"Authorization": ADMIN}).json["data"] == []
        assert len(h.request("GET", "/v1/usage?client=alice", headers={"Authorization": ADMIN}).json["data"]) == 1


def test_writes_are_batched_not_per_request(tmp_path):
    import sqlite3

    with harness(tmp_path) as h:
        h.chat("one", headers={"Authorization": USER})
        with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
            assert db.execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)  # still in the batch
