"""Adversarial cases for the keys file, the auth plugin and the rate limiter."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import Principal, hookimpl
from gateway.storage import keys
from gateway.config import parse_config
from gateway.context import RequestContext
from gateway.pipeline import build_pipelines
from gateway.storage.stores import MemoryStore

from .conftest import config_doc

ROOT = Path(__file__).resolve().parent.parent
HASH = "ab" * 32


def plugin(name: str, **config):
    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{name: config}]})
    return build_pipelines(parse_config(doc))["default"].plugins[0]


def write_keys(path: Path, entries) -> Path:
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


# --- the keys file --------------------------------------------------------------------

@pytest.mark.parametrize("entries, fragment", [
    ([{"sha256": HASH, "client": "a", "limits": {"requests_per_minute": "10"}}], "limits.requests_per_minute"),
    ([{"sha256": HASH, "client": "a", "limits": {"requests_per_minute": -5}}], "limits.requests_per_minute"),
    ([{"sha256": HASH, "client": "a", "limits": {"tokens_per_minute": 0}}], "limits.tokens_per_minute"),
    ([{"sha256": HASH, "client": "a", "limits": {"requests_per_minute": None}}], "limits.requests_per_minute"),
    ([{"sha256": HASH, "client": "a", "limits": {"request_per_minute": 5}}], "unknown limit"),
    ([{"sha256": HASH, "client": "a", "limits": "fast"}], "limits must be a mapping"),
    ([{"sha256": HASH, "client": "a", "models": "smollm2"}], "models must be a list"),
    ([{"sha256": HASH, "client": "a", "models": {"smollm2": 1}}], "models must be a list"),
    ([{"sha256": HASH, "client": None}], "client must be a non-empty string"),
    ([{"sha256": HASH, "client": "  "}], "client must be a non-empty string"),
    ([{"sha256": HASH, "client": "a", "role": "Admin"}], "role must be user or admin"),
    ([{"sha256": "z" * 64, "client": "a"}], "64 hex digits"),
    ([{"sha256": HASH, "client": "alice"}, {"sha256": HASH.upper(), "client": "root", "role": "admin"}],
     "keys[1]: the same sha256 as keys[0]"),
    (["just a string"], "expected a mapping"),
])
def test_a_malformed_keys_file_is_refused_naming_the_entry(tmp_path, entries, fragment):
    path = write_keys(tmp_path / "keys.yaml", entries)
    with pytest.raises(ValueError) as err:
        keys.load_keys_file(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_a_keys_file_that_is_not_a_mapping_is_a_config_error_not_a_crash(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a mapping"):
        keys.load_keys_file(path)
    path.write_text("keys: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        keys.load_keys_file(path)


def test_a_keys_file_anyone_may_write_is_refused(tmp_path):
    path = write_keys(tmp_path / "keys.yaml", [{"sha256": HASH, "client": "a"}])
    path.chmod(0o666)
    with pytest.raises(ValueError, match="writable by every user"):
        keys.load_keys_file(path)
    path.chmod(0o640)
    assert keys.load_keys_file(path)[HASH].client_id == "a"


def test_env_keys_never_make_an_empty_key_and_ignore_blanks_around_keys():
    with pytest.raises(ValueError, match="without a key"):
        keys.parse_env_keys("sk-good:alice, :bob", "user")
    assert keys.parse_env_keys(" , ,,   ", "user") == {}
    principals = keys.parse_env_keys("sk-a :alice ,  sk-b", "user")
    assert principals[keys.key_hash("sk-a")].client_id == "alice"
    assert keys.key_hash("sk-a ") not in principals and keys.key_hash("") not in principals
    with pytest.raises(ValueError, match="same key"):
        keys.parse_env_keys("sk-a:alice,sk-a:mallory", "user")


def test_revoke_refuses_an_empty_or_ambiguous_prefix(tmp_path):
    path = tmp_path / "keys.yaml"
    keys.add_key(path, "alice")
    keys.add_key(path, "bob")
    for who in ("", "   "):
        with pytest.raises(ValueError):
            keys.revoke(path, who)
    first = keys.read_entries(path)[0]["sha256"]
    with pytest.raises(ValueError, match="at least 8"):
        keys.revoke(path, first[:3])
    assert len(keys.read_entries(path)) == 2
    # two hashes sharing a long prefix: a prefix matching both removes neither
    entries = keys.read_entries(path)
    twin = "0123456789" + "a" * 54
    write_keys(path, entries + [{"sha256": twin, "client": "c"}, {"sha256": twin[:-1] + "b", "client": "d"}])
    with pytest.raises(ValueError, match="2 keys"):
        keys.revoke(path, twin[:9])
    assert len(keys.read_entries(path)) == 4
    assert keys.revoke(path, twin) == 1 and keys.revoke(path, first[:8]) == 1
    assert keys.revoke(path, "bob") == 1
    assert [e["client"] for e in keys.read_entries(path)] == ["d"]


def test_the_keys_file_is_private_even_over_a_stale_temp_file_or_a_symlink(tmp_path):
    path = tmp_path / "keys.yaml"
    stale = tmp_path / "keys.yaml.tmp"
    stale.write_text("")
    os.chmod(stale, 0o644)
    keys.add_key(path, "alice")
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    stale.unlink()
    stale.symlink_to(elsewhere)
    path.chmod(0o644)  # made by hand, too wide
    keys.add_key(path, "bob")
    assert elsewhere.read_text() == "untouched"
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert [e["client"] for e in keys.read_entries(path)] == ["alice", "bob"]


@pytest.mark.parametrize("flag", [["--rpm", "0"], ["--tpm", "-5"]])
def test_keys_add_refuses_a_zero_or_negative_limit(tmp_path, flag):
    path = tmp_path / "keys.yaml"
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "add", "--client", "alice", *flag,
                             "--file", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "not an integer >= 1" in result.stderr
    assert keys.read_entries(path) == []


# --- auth -----------------------------------------------------------------------------

class Who:
    def __init__(self):
        self.seen = []

    @hookimpl
    def request(self, ctx):
        self.seen.append(ctx.principal.client_id)


@pytest.fixture
def authed(monkeypatch, make_client):
    monkeypatch.setenv("TEST_KEYS", "sk-alice:alice,sk-bob:bob")
    who = Who()
    client = make_client([plugin("auth", env_keys={"TEST_KEYS": "user"}), ("who", who)])
    client.who = who
    return client


@pytest.mark.parametrize("authorization", ["bearer sk-alice", "BEARER   sk-alice  ", "Bearer\tsk-alice",
                                           " Bearer sk-alice"])
def test_bearer_in_any_case_with_any_blanks(authed, authorization):
    assert authed.simulate_get("/v1/models", headers={"Authorization": authorization}).status_code == 200


def test_authorization_and_x_api_key_must_agree(authed):
    resp = authed.simulate_get("/v1/models", headers={"Authorization": "Bearer sk-alice", "x-api-key": "sk-bob"})
    assert resp.status_code == 401 and "Two different API keys" in resp.json["error"]["message"]
    resp = authed.simulate_get("/v1/models", headers={"Authorization": "Bearer sk-bob", "x-api-key": "sk-bob"})
    assert resp.status_code == 200
    # another scheme (a proxy's Basic auth) does not hide x-api-key
    resp = authed.simulate_get("/v1/models", headers={"Authorization": "Basic dXNlcjpwdw==", "x-api-key": "sk-bob"})
    assert resp.status_code == 200
    assert authed.who.seen == ["bob", "bob"]


def test_an_overlong_key_is_refused_without_being_hashed(authed, monkeypatch):
    import plugins.auth

    hashed = []
    real = plugins.auth.key_hash
    monkeypatch.setattr(plugins.auth, "key_hash", lambda key: hashed.append(len(key)) or real(key))
    resp = authed.simulate_get("/v1/models", headers={"x-api-key": "k" * 100_000})
    assert resp.status_code == 401 and hashed == []
    assert authed.simulate_get("/v1/models", headers={"x-api-key": "sk-alice"}).status_code == 200


def test_one_key_for_two_principals_refuses_the_config(monkeypatch, tmp_path):
    monkeypatch.setenv("USER_KEYS", "sk-same:alice")
    monkeypatch.setenv("ADMIN_KEYS", "sk-same:root")
    with pytest.raises(Exception, match="same key"):
        plugin("auth", env_keys={"USER_KEYS": "user", "ADMIN_KEYS": "admin"})
    path = write_keys(tmp_path / "keys.yaml", [{"sha256": keys.key_hash("sk-same"), "client": "root", "role": "admin"}])
    with pytest.raises(Exception, match="same key"):
        plugin("auth", env_keys={"USER_KEYS": "user"}, keys_file=str(path))
    # the same principal twice is fine
    monkeypatch.setenv("ADMIN_KEYS", "sk-same:alice")
    plugin("auth", env_keys={"USER_KEYS": "user", "ADMIN_KEYS": "user"})
    # also in the environment and the file (both give it the same key id)
    same = write_keys(tmp_path / "same.yaml", [{"sha256": keys.key_hash("sk-same"), "client": "alice"}])
    _, auth = plugin("auth", env_keys={"USER_KEYS": "user"}, keys_file=str(same))
    assert auth.principals[keys.key_hash("sk-same")].key_id == keys.key_hash("sk-same")[:12]


def test_an_empty_key_in_the_environment_refuses_the_config(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", ":alice")
    with pytest.raises(Exception, match="TEST_KEYS"):
        plugin("auth", env_keys={"TEST_KEYS": "user"})


# --- ratelimit ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 0, -1, "5", 2.5, True])
def test_a_keys_null_zero_or_bad_limit_never_lifts_or_breaks_the_role_limit(make_client, value):
    limiter = plugin("ratelimit", requests_per_minute=10, roles={"user": {"requests_per_minute": 2}})
    assert limiter[1].limits(Principal("a", limits={"requests_per_minute": value}))["requests_per_minute"] == 2

    class As:
        @hookimpl
        def request(self, ctx):
            ctx.principal = Principal("a", limits={"requests_per_minute": value})

    client = make_client([("as", As()), limiter])
    assert [client.simulate_get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]


def charge(limiter, usage, tokens_per_minute=100, outcome="ok", body=None):
    limiter.store._arrivals.clear()  # memory stores are per process: start each charge from nothing
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", body=body)
    ctx.state["ratelimit"] = ("c", tokens_per_minute)
    ctx.usage = usage
    ctx.sent = True  # admitted and sent to a backend
    limiter.complete(ctx=ctx, outcome=outcome)
    return limiter.store._arrivals.get("tokens:c")


@pytest.mark.parametrize("usage", [{"total_tokens": -50}, {"total_tokens": "lots"}, {"total_tokens": math.nan},
                                   {"total_tokens": None}, {"total_tokens": True}, {"prompt_tokens": 3}])
def test_nonsense_usage_from_the_backend_charges_nothing(usage):
    limiter = plugin("ratelimit")[1]
    assert charge(limiter, usage) is None


def test_an_absurd_usage_is_capped_at_a_hundred_minutes_of_debt():
    import time

    limiter = plugin("ratelimit")[1]
    tat = charge(limiter, {"total_tokens": 1e300})
    assert tat - time.monotonic() <= 100 * 60 + 1
    tat = charge(plugin("ratelimit")[1], {"total_tokens": 150.0})  # a float count is still a count
    assert 60 < tat - time.monotonic() <= 91


@pytest.mark.parametrize("outcome", ["client_gone", "cancelled"])
def test_leaving_before_the_usage_chunk_still_charges_the_token_budget(outcome):
    import time

    # tokens_per_minute 100: one token is 0.6 s of debt
    tat = charge(plugin("ratelimit")[1], None, outcome=outcome, body={"max_tokens": 50})
    assert tat is not None and 0.6 * 48 < tat - time.monotonic() <= 0.6 * 49 + 1
    tat = charge(plugin("ratelimit")[1], None, outcome=outcome, body={})  # no budget: a minute's worth
    assert tat is not None and 59 < tat - time.monotonic() <= 60.4
    assert charge(plugin("ratelimit")[1], None, outcome="error", body={"max_tokens": 50}) is None


def test_behind_a_trusted_proxy_clients_are_limited_by_their_forwarded_address(make_client):
    # falcon's test client connects from 127.0.0.1
    behind = make_client([plugin("ratelimit", requests_per_minute=1, trusted_proxies=["127.0.0.0/8"])])

    def status(client, forwarded):
        return client.simulate_get("/v1/models", headers={"X-Forwarded-For": forwarded}).status_code

    assert status(behind, "203.0.113.1") == 200
    assert status(behind, "203.0.113.2") == 200  # another client behind the same proxy
    assert status(behind, "198.51.100.9, 203.0.113.1") == 429  # the nearest untrusted hop counts, not the first
    assert status(behind, "203.0.113.2, 127.0.0.5") == 429  # trusted hops are skipped
    # without trusted proxies the header is anyone's to write: ignored
    direct = make_client([plugin("ratelimit", requests_per_minute=1)])
    assert status(direct, "203.0.113.3") == 200
    assert status(direct, "203.0.113.4") == 429


def test_a_bad_trusted_proxy_is_a_config_error():
    with pytest.raises(Exception, match="trusted_proxies"):
        plugin("ratelimit", trusted_proxies=["not-an-address"])


def test_the_memory_stores_rate_limit_state_stays_bounded_with_many_clients():
    store = MemoryStore()
    store.max_arrivals = 100
    for i in range(1000):
        store.throttle(f"requests:client-{i}", 10, 60.0)
    assert len(store._arrivals) <= 100
    # the most indebted client is remembered
    for _ in range(10):
        store.throttle("requests:heavy", 10, 60.0)
    for i in range(1000, 1300):
        store.throttle(f"requests:client-{i}", 10, 60.0)
    assert not store.throttle("requests:heavy", 10, 60.0).allowed


def test_each_pipeline_keeps_its_own_budget_for_a_client(monkeypatch, canned_url):
    """Memory stores are one per process, shared by pipelines; the keys did not name the
    pipeline, so a strict pipeline's debt refused the same client on a loose one."""
    import falcon.testing

    from gateway.web.app import build_app
    from gateway.web.state import Gateway

    monkeypatch.setenv("BUDGET_KEYS", "sk-alice:alice")
    doc = config_doc(canned_url, pipelines={
        "strict": [{"auth": {"env_keys": {"BUDGET_KEYS": "user"}}}, {"ratelimit": {"requests_per_minute": 2}}],
        "loose": [{"auth": {"env_keys": {"BUDGET_KEYS": "user"}}}, {"ratelimit": {"requests_per_minute": 1000}}]})
    doc["routes"] = {"/v1/chat/completions": "strict", "/v1/completions": "loose", "/v1/models": "loose"}
    client = falcon.testing.TestClient(build_app(Gateway(parse_config(doc))))
    headers = {"Authorization": "Bearer sk-alice"}
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
    assert [client.simulate_post("/v1/chat/completions", json=chat, headers=headers).status_code
            for _ in range(3)] == [200, 200, 429]
    assert [client.simulate_get("/v1/models", headers=headers).status_code for _ in range(5)] == [200] * 5


def test_a_key_may_carry_a_queue_priority():
    digest = "a" * 64
    _, principal = keys.principal_of({"sha256": digest, "client": "alice", "priority": 40}, "k")
    assert principal.priority == 40
    assert keys.principal_of({"sha256": digest, "client": "bob"}, "k")[1].priority == 0
    for bad in (-1, 101, "high", True, 1.5):
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 100"):
            keys.principal_of({"sha256": digest, "client": "alice", "priority": bad}, "k")


def test_the_console_keys_api_without_a_keys_database_lists_file_and_env_keys_read_only(monkeypatch, make_client,
                                                                                        tmp_path):
    monkeypatch.setenv("TEST_KEYS", "sk-alice:alice")
    monkeypatch.setenv("ADMIN_KEYS", "sk-root:root")
    path = write_keys(tmp_path / "keys.yaml", [{"sha256": keys.key_hash("sk-file"), "client": "<b>filed</b>",
                                                "limits": {"tokens_per_day": 5}, "priority": 2}])
    path.chmod(0o600)
    auth = plugin("auth", env_keys={"TEST_KEYS": "user", "ADMIN_KEYS": "admin"}, keys_file=str(path))
    routes = {"/v1/chat/completions": "default", **{f"/admin/api/keys{suffix}": {"pipeline": "default"}
                                                    for suffix in ("", "/revoke", "/rotate", "/limits")}}
    client = make_client([auth], routes=routes)
    root = {"Authorization": "Bearer sk-root"}
    listed = client.simulate_get("/admin/api/keys", headers=root)
    assert listed.status_code == 200 and listed.headers["Cache-Control"] == "no-store"
    assert listed.json["keys_db"] is False
    by_client = {row["client"]: row for row in listed.json["data"]}
    assert set(by_client) == {"alice", "root", "<b>filed</b>"}
    filed = by_client["<b>filed</b>"]
    assert (filed["source"], filed["origin"], filed["read_only"], filed["limits"], filed["priority"]) == \
        ("file", str(path), True, {"tokens_per_day": 5}, 2)
    assert by_client["alice"]["source"] == "env" and by_client["alice"]["origin"] == "TEST_KEYS"
    assert "sk-" not in listed.text and keys.key_hash("sk-file") not in listed.text
    # nothing to write to: adding is refused, and so is changing a file or env key
    added = client.simulate_post("/admin/api/keys", json={"client": "carol"}, headers=root)
    assert added.status_code == 400 and added.json["error"]["code"] == "read_only"
    revoked = client.simulate_post("/admin/api/keys/revoke", json={"key_id": filed["key_id"]}, headers=root)
    assert revoked.status_code == 400 and revoked.json["error"]["code"] == "read_only"
    assert client.simulate_put("/admin/api/keys", json={}, headers=root).status_code == 405
    assert client.simulate_get("/admin/api/keys/revoke", headers=root).status_code == 405
    for path_, method in (("/admin/api/keys", "GET"), ("/admin/api/keys", "POST"), ("/admin/api/keys/limits", "POST")):
        answer = client.simulate_request(method, path_, json={"client": "x"},
                                         headers={"Authorization": "Bearer sk-alice"})
        assert answer.status_code == 403 and answer.json["error"]["code"] == "admin_required"
