from datetime import datetime, timezone

from gateway.plugin import Principal, hookimpl
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


def test_nonsense_usage_from_the_backend_counts_zero(tmp_path):
    with harness(tmp_path) as h:
        h.backend.script({"json": {"choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "x"}}],
                                   "usage": {"prompt_tokens": -1000, "completion_tokens": "many", "total_tokens": 0}}})
        h.chat("one", headers={"Authorization": USER})
        usage = h.request("GET", "/v1/usage", headers={"Authorization": ADMIN}).json["data"]
    assert [(u["requests"], u["prompt_tokens"], u["completion_tokens"]) for u in usage] == [(1, 0, 0)]


def test_a_repeated_query_parameter_is_a_400_not_a_500(tmp_path):
    with harness(tmp_path) as h:
        result = h.request("GET", "/v1/usage?client=alice&client=bob", headers={"Authorization": ADMIN})
        assert result.status == 400 and result.json["error"]["param"] == "client"


def test_the_database_is_private(tmp_path):
    import stat

    with harness(tmp_path):
        assert stat.S_IMODE((tmp_path / "usage.sqlite3").stat().st_mode) & 0o077 == 0


# Holds an exclusive lock on the database until the marker file exists (at most 60 s).
HOLDER = """
import os, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.01)
db.execute("COMMIT")
"""

# Under gevent, as in gunicorn's worker: a flush waits on a locked database while another
# greenlet (another request) must still run; that greenlet is what releases the lock.
WORKER = """
from gevent import monkey; monkey.patch_all()
import sqlite3, subprocess, sys
import gevent
from llamagate_usage_meter import Plugin
db, marker, holder_code = sys.argv[1], sys.argv[2], sys.argv[3]
meter = Plugin({"database": db, "route": "/v1/usage", "flush_seconds": 60})
meter.pending[("alice", "2030-01-01")] = [1, 2, 3]
holder = subprocess.Popen([sys.executable, "-c", holder_code, db, marker], stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "locked"
flushing = gevent.spawn(meter.flush)
def another_request():
    open(marker, "w").close()
gevent.spawn(another_request).join()
flushing.get()
holder.wait()
print(sqlite3.connect(db).execute("SELECT client, requests, prompt_tokens FROM usage").fetchall())
"""


def test_a_locked_database_does_not_stall_the_gevent_worker(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gateway.plugin
    import llamagate_usage_meter

    path = os.pathsep.join(str(Path(m.__file__).parent.parent) for m in (gateway.plugin, llamagate_usage_meter))
    result = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "usage.sqlite3"), str(tmp_path / "go"),
                             HOLDER], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[('alice', 1, 2)]"
