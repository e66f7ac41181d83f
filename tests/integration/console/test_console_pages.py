"""The operator console's core pages (overview, models, live) in headless Chromium against a
real gateway: two gunicorn workers sharing a Redis, and the fleet launching SmolLM2. A
client id and a model id carrying markup show as text; a user key gets 403 on every
console call (also checked without a browser, with the CSP, the 401 without a key and the
key never taken from a query string)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from selenium.webdriver.support.ui import Select

from gateway.storage import keys
from gateway.testing import free_ports, launched_backend, pipelines_doc

from ..conftest import until

EVIL_CLIENT = '<img src=x onerror="window.__pwned=1">mallory'
EVIL_MODEL = "<script>window.__pwned=2</script>smol"
CONSOLE_CALLS = [  # every JSON call the core pages make
    ("GET", "/admin/api/overview"), ("GET", "/admin/api/live"), ("GET", "/admin/api/errors"),
    ("POST", "/admin/api/requests/some-id/cancel"), ("GET", "/admin/status"), ("GET", "/admin/models"),
    ("POST", "/admin/models/chat/load"), ("POST", "/admin/models/chat/unload"), ("POST", "/admin/backends/chat/cancel"),
]


@pytest.fixture(scope="module")
def gw(start_gateway, model_path, redis_url, logs):
    keys_file = logs / f"console-keys-{uuid.uuid4().hex[:8]}.yaml"
    made = {"admin": keys.add_key(keys_file, "ops", "admin"), "user": keys.add_key(keys_file, "alice"),
            "evil": keys.add_key(keys_file, EVIL_CLIENT)}
    ports = free_ports(2)
    doc = pipelines_doc(
        {"chat": launched_backend(model_path.resolve(), ctx=1024, parallel=2, threads=1)},
        {"smollm2": "chat", EVIL_MODEL: "chat"},
        pipeline=[{"auth": {"keys_file": str(keys_file), "env_keys": {}}}],
        admin_pipeline="default", health_interval=0.5,
        shared={"redis_url": redis_url, "prefix": f"console-{uuid.uuid4().hex[:8]}:"},
        fleet={"ports": {"first": ports[0], "last": ports[-1]}, "log_dir": str(logs / "console-fleet")})
    gateway = start_gateway(doc, workers=2)
    for name, key in made.items():
        setattr(gateway, name, key)
    return gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(gw, key: str, model: str = "smollm2", max_tokens: int = 4, request_id: str | None = None,
         **extra: Any) -> requests.Response:
    headers = bearer(key) | ({"X-Request-Id": request_id} if request_id else {})
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}], **extra}
    return requests.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=120,
                         stream=bool(extra.get("stream")))


def api(gw, path: str) -> dict[str, Any]:
    resp = requests.get(gw.url + path, headers=bearer(gw.admin), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def page(gw, console_page):
    console = console_page(gw.url)
    console.sign_in(gw.admin)
    console.wait(lambda: console.find("#page-overview"), message="timed out waiting for the overview after signing in")
    return console


def test_security_without_a_browser(gw):
    page = requests.get(gw.url + "/admin/", timeout=10)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    for method, path in CONSOLE_CALLS:
        user = requests.request(method, gw.url + path, headers=bearer(gw.user), timeout=30)
        assert user.status_code == 403 and user.json()["error"]["code"] == "admin_required", (method, path)
        assert requests.request(method, gw.url + path, timeout=30).status_code == 401, (method, path)
        for query in ({"key": gw.admin}, {"api_key": gw.admin}, {"access_token": gw.admin}):
            assert requests.request(method, gw.url + path, params=query, timeout=30).status_code == 401


def test_overview_charts_the_whole_gateways_traffic(gw, page):
    sent = 8
    with ThreadPoolExecutor(sent) as pool:  # at once: both workers serve, and some wait in the queue
        answers = list(pool.map(lambda i: chat(gw, gw.user, max_tokens=8).status_code, range(sent)))
    assert answers == [200] * sent
    assert chat(gw, gw.user, model="no-such-model").status_code == 404
    # every worker's counts reach Redis within a beat; both workers answer the same totals
    hour = until(lambda: (h := api(gw, "/admin/api/overview")["hour"])["requests"] >= sent + 1 and h,
                message="timed out waiting for the requests in the shared totals")
    assert hour["requests"] == sent + 1 and hour["errors"] == 1 and hour["completion_tokens"] >= sent
    status = api(gw, "/admin/status")
    assert status["totals"]["workers"] == 2 and status["shared"] == "ok"
    for _ in range(4):
        assert api(gw, "/admin/api/overview")["hour"] == hour  # whichever worker answers

    page.open("overview")
    page.wait_text("#overview-scope", "2 worker(s)")
    assert page.wait(lambda: page.text("#card-requests") == str(sent + 1), message="timed out waiting for the requests card")
    assert page.text("#card-errors") == "1"
    for chart in ("requests", "tokens", "first-byte", "queue"):
        page.wait(lambda: page.all(f"#chart-{chart} svg"), message=f"timed out waiting for the {chart} chart")
    bars = [r.get_attribute("textContent").split(": ") for r in page.all("#chart-requests rect")]
    assert sum(int(n) for name, n in bars if name == "requests") == sent + 1  # (a minute's turn may split them)
    assert sum(int(n) for name, n in bars if name == "errors") == 1
    for chart in ("first-byte", "queue"):  # a minute's mean, a point
        points = [float(c.get_attribute("textContent").split(": ")[1]) for c in page.all(f"#chart-{chart} circle")]
        assert points and all(p > 0 for p in points), chart
    backends = page.wait_text("#overview-backends", "chat")
    assert "chat yes 2 1 per worker" in backends  # ready, two slots, one per worker
    assert page.driver.execute_script("return window.__pwned") is None
    page.shot("overview")


def test_live_lists_every_workers_requests_and_cancels_a_stream(gw, page):
    ids = [f"live-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    ended: dict[str, bytes] = {}

    def stream(request_id: str) -> None:
        with chat(gw, gw.evil, model=EVIL_MODEL, max_tokens=2000, request_id=request_id, stream=True,
                  messages=[{"role": "user", "content": "Write a very long story about a llama."}]) as resp:
            ended[request_id] = b"\n".join(resp.iter_lines())

    threads = [threading.Thread(target=stream, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    live = until(lambda: (d := api(gw, "/admin/api/live"))["in_flight"] >= 2 and d,
                 message="timed out waiting for two streams in flight")
    assert {r["request_id"] for r in live["data"]} >= set(ids)
    holders = {r["worker"] for r in live["data"] if r["request_id"] in ids}
    if len(holders) == 1:  # both on one worker: the other one lists them too (from its snapshot in Redis)
        until(lambda: (d := api(gw, "/admin/api/live"))["answered_by"] not in holders
             and set(ids) <= {r["request_id"] for r in d["data"]}, message="timed out waiting for the other worker to list them")
    # each worker admits one at a time (two slots, two workers): a second one there waits
    waiting = 1 if len(holders) == 1 else 0
    until(lambda: sum(r["waiting"] for r in api(gw, "/admin/api/live")["data"] if r["request_id"] in ids) == waiting,
         message=f"timed out waiting for {waiting} of them waiting")
    page.open("live")
    for request_id in ids:
        page.wait(lambda: page.all(f'tr[data-request-id="{request_id}"]'), message=f"timed out waiting for {request_id} listed")
    row = page.find(f'tr[data-request-id="{ids[0]}"]')
    assert EVIL_CLIENT in row.text and EVIL_MODEL in row.text  # markup shown as text, never run
    assert page.driver.execute_script("return window.__pwned") is None
    page.shot("live")

    row.find_element("css selector", "button.cancel").click()
    threads[0].join(timeout=20)
    assert not threads[0].is_alive()
    assert b"request_cancelled" in ended[ids[0]]
    page.wait(lambda: not page.all(f'tr[data-request-id="{ids[0]}"]'), message="timed out waiting for the cancelled request gone")
    assert threads[1].is_alive()  # only that one
    requests.post(f"{gw.url}/admin/api/requests/{ids[1]}/cancel", headers=bearer(gw.admin), timeout=30)
    threads[1].join(timeout=20)

    # the cancels are errors now, listed with their request ids and client, as text
    errors = page.wait_text("#live-errors", ids[0])
    assert "request_cancelled" in errors and EVIL_CLIENT in errors
    assert page.driver.execute_script("return window.__pwned") is None


def test_models_page_unloads_and_loads_with_its_buttons_and_streams_a_chat(gw, page):
    assert chat(gw, gw.user).status_code == 200  # loaded
    page.open("models")
    row = 'tr[data-backend="chat"]'
    page.wait(lambda: "ready" in page.text(row), message="timed out waiting for chat ready")
    text = page.text(row)
    assert "smollm2" in text and EVIL_MODEL in text
    assert page.driver.execute_script("return window.__pwned") is None
    [pid] = api(gw, "/admin/models")["models"]["chat"]["pids"]

    # the playground streams an answer from the model
    Select(page.find("#play-model")).select_by_value("smollm2")
    page.find("#play-send").click()
    page.wait(lambda: "done in" in page.text("#play-outcome"), timeout=60, message="timed out waiting for the playground's answer")
    assert page.text("#play-output").strip()
    assert "first token after" in page.text("#play-outcome")
    page.shot("models")

    page.find(f"{row} button.unload").click()
    page.wait(lambda: page.text(f"{row} .state") == "stopped", timeout=60, message="timed out waiting for chat stopped")
    model = api(gw, "/admin/models")["models"]["chat"]
    assert model["state"] == "stopped" and model["pids"] == []
    until(lambda: not _alive(pid), timeout=10, message="timed out waiting for the llama-server process gone")

    page.find(f"{row} button.load").click()
    page.wait(lambda: page.text(f"{row} .state") == "ready", timeout=90, message="timed out waiting for chat ready again")
    assert api(gw, "/admin/models")["models"]["chat"]["pids"] != [pid]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_user_key_is_turned_away_with_no_data(gw, console_page):
    page = console_page(gw.url)
    page.sign_in(gw.user, page="live")
    message = page.wait_text("#login-error", "admin key")
    assert "This endpoint needs an admin key." in message
    assert not page.find("#main").is_displayed() and page.text("#page") == ""
    assert page.driver.execute_script("return sessionStorage.length") == 0  # nothing kept
    assert page.driver.execute_script("return document.cookie") == ""
    page.sign_in(gw.admin)  # the module's page goes on signed in
    page.wait(lambda: page.find("#page-overview"))


def test_no_script_error_and_no_key_in_any_url(gw, page):
    page.script_errors()  # the 403s the user key's visit logged
    page.open("overview")
    page.wait(lambda: page.all("#chart-requests svg"))
    page.open("live")
    page.wait_text("#live-scope", "in flight")
    page.open("models")
    page.wait(lambda: page.all('tr[data-backend="chat"]'))
    assert gw.admin not in page.driver.current_url
    history = page.driver.execute_script("return location.href + document.referrer")
    assert gw.admin not in history
    errors = [e for e in page.script_errors() if "favicon" not in e]
    assert errors == [], json.dumps(errors)
