"""The operator console's server side, in-process: its page and assets with a strict CSP,
its JSON for admin keys only (403 for a user key, 401 without one, never a key from the
query string), no CORS on it, and the per-minute traffic the shared heartbeat adds up."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.pipeline import build_pipelines
from gateway.storage import keys
from gateway.testing import free_port
from gateway.web import console
from gateway.web.stats import Traffic

from .conftest import config_doc

# Every JSON call the console's core pages make (method, path).
CONSOLE_CALLS = [
    ("GET", "/admin/api/overview"), ("GET", "/admin/api/live"), ("GET", "/admin/api/errors"),
    ("POST", "/admin/api/requests/some-id/cancel"), ("GET", "/admin/status"), ("GET", "/admin/models"),
    ("POST", "/admin/models/smollm2/load"), ("POST", "/admin/models/smollm2/unload"),
    ("POST", "/admin/backends/chat/cancel"),
]


@pytest.fixture
def console_client(make_client, tmp_path: Path):
    keys_file = tmp_path / "keys.yaml"
    admin, user = keys.add_key(keys_file, "ops", "admin"), keys.add_key(keys_file, "alice")
    pipeline = [{"cors": {"allow_origins": ["*"]}}, {"auth": {"keys_file": str(keys_file), "env_keys": {}}}]
    plugins = build_pipelines(parse_config(config_doc("http://x:1", pipelines={"default": pipeline})))["default"].plugins
    client = make_client(plugins, admin_pipeline="default", pipelines={"default": pipeline})
    client.admin, client.user = admin, user
    return client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_page_and_its_assets_come_with_a_strict_csp_and_no_data(console_client):
    page = console_client.simulate_get("/admin/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
    assert not re.search(r"\son\w+\s*=", html), "an inline event handler"
    for src in re.findall(r'(?:src|href)="(/admin/assets/[^"]+)"', html):
        asset = console_client.simulate_get(src)
        assert asset.status_code == 200, src
        assert asset.headers["content-security-policy"] == csp
    assert console_client.simulate_get("/admin/assets/pages/keys.js").status_code == 200  # the other pages' stubs
    for name in ("../console.py", "..%2Fconsole.py", "nope.js", "index.html", "/etc/passwd"):
        assert console_client.simulate_get("/admin/assets/" + name).status_code == 404, name


def test_a_user_key_gets_403_on_every_console_call_and_no_key_401(console_client):
    for method, path in CONSOLE_CALLS:
        resp = console_client.simulate_request(method, path, headers=bearer(console_client.user))
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json["error"]["code"] == "admin_required"
        anonymous = console_client.simulate_request(method, path)
        assert anonymous.status_code == 401, (method, path)


def test_the_admin_key_is_never_taken_from_the_query_string(console_client):
    admin = console_client.admin
    for query in (f"key={admin}", f"api_key={admin}", f"access_token={admin}", f"authorization=Bearer+{admin}"):
        resp = console_client.simulate_get("/admin/api/overview", query_string=query)
        assert resp.status_code == 401, query
    answer = console_client.simulate_get("/admin/api/overview", headers=bearer(admin))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"


def test_console_answers_carry_no_cors_headers(console_client):
    origin = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" in console_client.simulate_get("/v1/models", headers=origin).headers
    for path in ("/admin/api/overview", "/admin/status", "/admin/"):
        resp = console_client.simulate_get(path, headers={**origin, **bearer(console_client.admin)})
        assert resp.status_code == 200
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")], path
    preflight = console_client.simulate_options("/admin/api/overview",
                                                headers={**origin, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers


def test_overview_live_and_errors_for_one_worker(console_client):
    admin = bearer(console_client.admin)
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert console_client.simulate_post("/v1/chat/completions", json=chat, headers=admin).status_code == 200
    console_client.simulate_post("/v1/chat/completions", json=dict(chat, model="nope"), headers=admin,
                                 )  # an error, with its request id
    overview = console_client.simulate_get("/admin/api/overview", headers=admin).json
    assert overview["scope"] == "worker" and overview["shared"] == "off"
    assert len(overview["minutes"]) == 60 and overview["minutes"][-1]["at"] == int(time.time() // 60) * 60
    assert overview["hour"]["requests"] >= 2 and overview["hour"]["errors"] >= 1
    assert overview["hour"]["completion_tokens"] > 0
    assert overview["backends"]["chat"]["busy"] == 0 and "slots" in overview["backends"]["chat"]
    errors = console_client.simulate_get("/admin/api/errors", headers=admin).json["data"]
    assert errors[0]["error"] == "model_not_found" and errors[0]["client"] == "ops" and errors[0]["request_id"]
    live = console_client.simulate_get("/admin/api/live", headers=admin).json
    assert live["data"] == [] and live["workers"] == 1
    missing = console_client.simulate_post("/admin/api/requests/nothing-here/cancel", headers=admin)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "request_not_found"


def test_traffic_hands_over_what_it_counted_once_and_takes_back_what_was_not_written():
    class Ctx:
        usage = {"prompt_tokens": 5, "completion_tokens": 7}
        started, first_byte_at = 100.0, 100.0124
        timings, backend, route, model, status = {"queue.chat": 3.0}, "chat", "/v1/chat/completions", "m", 500
        request_id, principal = "r1", None

    traffic = Traffic()
    traffic.record(Ctx(), None)
    traffic.record(Ctx(), "boom")
    minutes, errors = traffic.take()
    [counts] = minutes.values()
    assert counts == {"requests": 2, "errors": 1, "prompt_tokens": 10, "completion_tokens": 14,
                      "first_byte_ms": 24, "first_byte_count": 2, "queue_ms": 6, "queue_count": 2}
    assert [e["request_id"] for e in errors] == ["r1"]
    assert traffic.take() == ({}, [])  # handed over once
    traffic.record(Ctx(), None)
    later, _ = traffic.take()
    assert [c["requests"] for c in later.values()] == [1]  # only what came since
    traffic.restore(later, [])
    traffic.restore(minutes, errors)  # Redis took neither: the next beat hands both over
    again, again_errors = traffic.take()
    assert sum(c["requests"] for c in again.values()) == 3 and again_errors == errors
    assert sum(c["prompt_tokens"] for c in again.values()) == 15
    assert sum(row[0] for row in traffic.minutes.values()) == 3  # the local view keeps all


def test_the_console_folder_is_read_whole():
    names = set(console.ASSETS)
    assert {"index.html", "console.css", "console.js"} <= names
    assert {f"pages/{p}.js" for p in ("overview", "models", "live", "keys", "usage")} <= names


def test_with_the_shared_redis_unreachable_the_console_shows_this_worker_and_says_so(make_client, tmp_path: Path):
    keys_file = tmp_path / "keys.yaml"
    admin = keys.add_key(keys_file, "ops", "admin")
    pipeline = [{"auth": {"keys_file": str(keys_file), "env_keys": {}}}]
    doc = config_doc("http://x:1", pipelines={"default": pipeline})
    plugins = build_pipelines(parse_config(doc))["default"].plugins
    client = make_client(plugins, admin_pipeline="default", pipelines={"default": pipeline},
                         shared={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    client.simulate_post("/v1/chat/completions", json=chat, headers=bearer(admin))
    for path in ("/admin/api/overview", "/admin/api/live", "/admin/api/errors"):
        answer = client.simulate_get(path, headers=bearer(admin)).json
        assert answer["scope"] == "worker" and answer["shared"] == "unreachable", path
    overview = client.simulate_get("/admin/api/overview", headers=bearer(admin)).json
    assert overview["hour"]["errors"] == 1
    [error] = client.simulate_get("/admin/api/errors", headers=bearer(admin)).json["data"]
    assert error["error"] == "model_not_found"
