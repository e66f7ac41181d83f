"""The console's keys and usage pages and their APIs through the real parts: gunicorn with
2 gevent workers sharing a redis-server of our own, a real llama-server, the keys database
and the usage ledger in a PostgreSQL cluster of our own (tests/integration/conftest.py)."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from typing import Any

import pytest
import requests

from ..conftest import gateway_doc
from ..test_postgres import add_key, chat, ledger_rows, poll

API = "/admin/api"
ROUTES = (f"{API}/keys", f"{API}/keys/revoke", f"{API}/keys/rotate", f"{API}/keys/limits", f"{API}/usage",
          f"{API}/usage.csv")
USER_KEY = "sk-console-user-0123456789abcdef"  # an env key: read-only in the console
XSS = "<script>window.pwned=1</script><img src=x onerror=pwned=2>"
FORMULA = "=HYPERLINK(\"http://evil\",\"x\")"


@pytest.fixture(scope="module")
def stack(start_gateway, chat_backend, embeddings_backend, postgres, redis_url):
    doc = gateway_doc(chat_backend, embeddings_backend, pipelines={"default": [
        {"auth": {"keys_db": postgres.url, "keys_db_poll_interval": 0.2, "env_keys": {"CONSOLE_USER_KEYS": "user"}}},
        {"quota": {"redis_url": redis_url, "reserve_tokens": 64}},
        {"ledger": {"database": postgres.url, "flush_interval": 0.2}},
    ]}, admin_pipeline="default", shared={"redis_url": redis_url, "admission": "redis"})
    doc["routes"].update({route: {"pipeline": "default"} for route in ROUTES})
    admin = add_key(postgres, "console-ops", "--role", "admin")
    gateway = start_gateway(doc, workers=2, CONSOLE_USER_KEYS=f"{USER_KEY}:console-user")
    gateway.admin = admin
    return gateway


def api(stack, method: str, path: str, body: Any = None, key: str | None = None, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key or stack.admin}", "Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, stack.url + API + path, json=body, headers=headers, timeout=30, **kwargs)


def keys_listed(stack, everything: bool = False) -> dict[str, dict[str, Any]]:
    answer = api(stack, "GET", "/keys" + ("?all=true" if everything else ""))
    assert answer.status_code == 200, answer.text
    return {row["key_id"]: row for row in answer.json()["data"]}


def works_on_both_workers(stack, key: str) -> bool:
    return all(chat(stack.url, key).status_code == 200 for _ in range(6))


def test_a_key_added_in_the_console_works_at_once_on_both_workers_and_a_revoked_one_is_refused(stack, postgres):
    before = set(keys_listed(stack))
    added = api(stack, "POST", "/keys", {"client": "dora", "models": ["smollm2"], "limits": {"tokens_per_day": 50000},
                                         "priority": 7})
    assert added.status_code == 201, added.text
    assert added.headers["Cache-Control"] == "no-store"
    secret, row = added.json()["secret"], added.json()["key"]
    assert secret.startswith("sk-lg-") and row["client"] == "dora" and row["state"] == "live"
    assert row["limits"] == {"tokens_per_day": 50000} and row["priority"] == 7 and row["models"] == ["smollm2"]
    # only its hash is stored, and the list never shows the secret again
    stored = postgres.query("SELECT sha256 FROM llamagate_keys WHERE client = 'dora'")
    assert len(stored) == 1 and stored[0][0].startswith(row["key_id"]) and secret not in str(stored)
    listed = api(stack, "GET", "/keys")
    assert secret not in listed.text and stored[0][0] not in listed.text
    assert set(keys_listed(stack)) - before == {row["key_id"]}

    # "at once": within the workers' keys_db_poll_interval (0.2 s), on both workers
    assert poll(lambda: works_on_both_workers(stack, secret), timeout=5)
    assert chat(stack.url, secret, model="smollm2-embeddings").status_code == 403  # its models only

    revoked = api(stack, "POST", "/keys/revoke", {"key_id": row["key_id"]})
    assert revoked.status_code == 200, revoked.text
    time.sleep(1.0)
    assert [chat(stack.url, secret).status_code for _ in range(8)] == [401] * 8
    assert row["key_id"] not in keys_listed(stack)
    assert keys_listed(stack, everything=True)[row["key_id"]]["state"] == "revoked"
    again = api(stack, "POST", "/keys/revoke", {"key_id": row["key_id"]})
    assert again.status_code == 404 and again.json()["error"]["code"] == "key_not_found"


def test_rotate_shows_a_new_secret_once_and_the_old_one_is_refused(stack):
    old = api(stack, "POST", "/keys", {"client": "rory", "limits": {"requests_per_minute": 100}}).json()
    assert poll(lambda: works_on_both_workers(stack, old["secret"]), timeout=5)
    rotated = api(stack, "POST", "/keys/rotate", {"key_id": old["key"]["key_id"]})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert new["secret"] != old["secret"] and new["replaces"] == old["key"]["key_id"]
    assert new["key"]["client"] == "rory" and new["key"]["limits"] == {"requests_per_minute": 100}
    assert poll(lambda: works_on_both_workers(stack, new["secret"]), timeout=5)
    assert poll(lambda: all(chat(stack.url, old["secret"]).status_code == 401 for _ in range(6)), timeout=5)


def test_a_key_is_named_by_its_id_only_never_by_a_client_of_that_name(stack):
    target = api(stack, "POST", "/keys", {"client": "tara"}).json()["key"]
    # a client whose name is the key's id: the CLI's `revoke WHO` would take it for the client
    decoy = api(stack, "POST", "/keys", {"client": target["key_id"]}).json()["key"]
    assert api(stack, "POST", "/keys/revoke", {"key_id": target["key_id"]}).status_code == 200
    listed = keys_listed(stack)
    assert target["key_id"] not in listed and decoy["key_id"] in listed


def test_limits_set_in_the_console_apply_on_both_workers(stack):
    made = api(stack, "POST", "/keys", {"client": "lena"}).json()
    key_id, secret = made["key"]["key_id"], made["secret"]
    assert poll(lambda: chat(stack.url, secret).status_code == 200, timeout=5)
    changed = api(stack, "POST", "/keys/limits", {"key_id": key_id, "limits": {"requests_per_day": 1},
                                                  "priority": 3, "models": ["smollm2"]})
    assert changed.status_code == 200, changed.text
    assert changed.json()["key"]["limits"] == {"requests_per_day": 1} and changed.json()["key"]["priority"] == 3
    listed = keys_listed(stack)[key_id]
    assert listed["limits"] == {"requests_per_day": 1} and listed["models"] == ["smollm2"]
    # the quota's counters are in the shared Redis: the day's one request was made; both workers refuse more
    assert poll(lambda: all(chat(stack.url, secret).status_code == 429 for _ in range(6)), timeout=5)
    cleared = api(stack, "POST", "/keys/limits", {"key_id": key_id, "limits": None, "models": None})
    assert cleared.status_code == 200
    assert cleared.json()["key"]["limits"] == {} and cleared.json()["key"]["models"] == []
    assert poll(lambda: works_on_both_workers(stack, secret), timeout=5)


@pytest.mark.parametrize("path, body, param", [
    ("/keys", {"client": ""}, "client"),
    ("/keys", {"client": "x" * 65}, "client"),
    ("/keys", {"client": "eve\nINFO forged log line"}, "client"),
    ("/keys", {"client": 5}, "client"),
    ("/keys", {}, "client"),
    ("/keys", {"client": "ok", "role": "root"}, "role"),
    ("/keys", {"client": "ok", "limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
    ("/keys", {"client": "ok", "limits": {"tokens_per_day": 0}}, "limits.tokens_per_day"),
    ("/keys", {"client": "ok", "limits": {"tokens_per_day": 1.5}}, "limits.tokens_per_day"),
    ("/keys", {"client": "ok", "limits": {"bogus": 1}}, "limits.bogus"),
    ("/keys", {"client": "ok", "limits": [1]}, "limits"),
    ("/keys", {"client": "ok", "priority": 101}, "priority"),
    ("/keys", {"client": "ok", "priority": -1}, "priority"),
    ("/keys", {"client": "ok", "priority": "5"}, "priority"),
    ("/keys", {"client": "ok", "models": "smollm2"}, "models"),
    ("/keys", {"client": "ok", "models": [""]}, "models[0]"),
    ("/keys", {"client": "ok", "models": ["a\u0000b"]}, "models[0]"),
    ("/keys", {"client": "ok", "expires_days": 0}, "expires_days"),
    ("/keys", {"client": "ok", "sha256": "0" * 64}, "sha256"),
    ("/keys/revoke", {"key_id": "not-hex!"}, "key_id"),
    ("/keys/revoke", {"key_id": "abc"}, "key_id"),
    ("/keys/rotate", {}, "key_id"),
    ("/keys/limits", {"key_id": "0123456789ab"}, None),
    ("/keys/limits", {"key_id": "0123456789ab", "priority": True}, "priority"),
])
def test_every_bad_input_gets_an_openai_shaped_400_and_changes_nothing(stack, postgres, path, body, param):
    count = postgres.query("SELECT count(*), max(id) FROM llamagate_keys")
    answer = api(stack, "POST", path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert postgres.query("SELECT count(*), max(id) FROM llamagate_keys") == count


def test_bad_usage_queries_get_400(stack):
    for query in ("days=0", "days=367", "days=-1", "days=x", "by=client", "days=1&days=2"):
        answer = api(stack, "GET", f"/usage?{query}")
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", query


def test_keys_of_the_env_and_files_are_listed_read_only_without_secrets(stack):
    fixed = [row for row in keys_listed(stack).values() if row["read_only"]]
    assert [(row["client"], row["source"], row["origin"]) for row in fixed] == [
        ("console-user", "env", "CONSOLE_USER_KEYS")]
    assert USER_KEY not in api(stack, "GET", "/keys").text
    for action in ("revoke", "rotate", "limits"):
        answer = api(stack, "POST", f"/keys/{action}", {"key_id": fixed[0]["key_id"], "priority": 1}
                     if action == "limits" else {"key_id": fixed[0]["key_id"]})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "read_only", answer.text
    assert chat(stack.url, USER_KEY).status_code == 200


def test_a_user_key_gets_403_on_every_console_call_and_no_key_401(stack):
    calls = [("GET", "/keys", None), ("POST", "/keys", {"client": "sneaky", "role": "admin"}),
             ("POST", "/keys/revoke", {"key_id": "0123456789ab"}), ("POST", "/keys/rotate", {"key_id": "0123456789ab"}),
             ("POST", "/keys/limits", {"key_id": "0123456789ab", "priority": 1}), ("GET", "/usage", None),
             ("GET", "/usage?by=model", None), ("GET", "/usage.csv", None)]
    for method, path, body in calls:
        answer = api(stack, method, path, body, key=USER_KEY)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"]["code"] == "admin_required"
        anonymous = requests.request(method, stack.url + API + path, json=body, timeout=10)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert "sneaky" not in {row["client"] for row in keys_listed(stack).values()}


def test_a_cross_site_form_or_link_cannot_call_the_keys_api(stack):
    """What another origin can make a browser send: a form (urlencoded, multipart or
    text/plain, cookies but no Authorization header) or a link (a query string)."""
    clients = lambda: {row["client"] for row in keys_listed(stack, everything=True).values()}  # noqa: E731
    url = stack.url + API + "/keys"
    # a form cannot set Authorization: the key in a cookie or the query string is not read
    forged = [requests.post(url, data={"client": "csrf1"}, timeout=10),
              requests.post(url, data='{"client": "csrf2"}', headers={"Content-Type": "text/plain"}, timeout=10),
              requests.post(url, files={"client": (None, "csrf3")}, timeout=10),
              requests.post(url, data={"client": "csrf4"}, cookies={"Authorization": f"Bearer {stack.admin}",
                                                                    "api_key": stack.admin}, timeout=10),
              requests.post(f"{url}?api_key={stack.admin}&key={stack.admin}", json={"client": "csrf5"}, timeout=10),
              requests.get(f"{url}?api_key={stack.admin}&key={stack.admin}&authorization=Bearer+{stack.admin}",
                           timeout=10)]
    assert [answer.status_code for answer in forged] == [401] * len(forged)
    # even with the key, only a JSON body is taken (so a form's content type never is)
    for content_type, data in (("text/plain", '{"client": "csrf6"}'), ("application/x-www-form-urlencoded", "client=x"),
                               ("multipart/form-data; boundary=b", '{"client": "csrf7"}')):
        answer = api(stack, "POST", "/keys", headers={"Content-Type": content_type}, data=data)
        assert answer.status_code == 400, answer.text
    assert not {c for c in clients() if c.startswith("csrf")}
    # and no console answer lets another origin read it
    preflight = requests.options(url, headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in preflight.headers


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_usage_per_key_and_model_and_the_csv_have_the_ledgers_rows(stack, postgres):
    made = {client: api(stack, "POST", "/keys", {"client": client}).json() for client in ("ulla", XSS, FORMULA)}
    for client, n in (("ulla", 3), (XSS, 2), (FORMULA, 1)):
        secret = made[client]["secret"]
        assert poll(lambda: chat(stack.url, secret).status_code == 200, timeout=5)
        for _ in range(n - 1):
            assert chat(stack.url, secret).status_code == 200
    embedded = requests.post(stack.url + "/v1/embeddings", json={"model": "smollm2-embeddings", "input": "hi"},
                             headers={"Authorization": f"Bearer {made['ulla']['secret']}"}, timeout=60)
    assert embedded.status_code == 200
    wanted = {"ulla": 4, XSS: 2, FORMULA: 1}
    assert poll(lambda: all(len(ledger_rows(postgres, c)) == n for c, n in wanted.items()), timeout=15)

    by_key = api(stack, "GET", "/usage?days=7&by=key")
    by_model = api(stack, "GET", "/usage?days=7&by=model")
    download = api(stack, "GET", "/usage.csv?days=7")
    assert by_key.status_code == by_model.status_code == download.status_code == 200
    # What the ledger holds, summed here per day, client, key and model. The admin's own
    # console calls (no model) keep coming in, so they are left out of the comparisons.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    ledger: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for day, client, key_id, model, total in postgres.query(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), client, key_id, model, total_tokens "
            "FROM llamagate_requests WHERE client IS NOT NULL AND client <> 'console-ops'"):
        ledger[(day, client, key_id, model)][0] += 1
        ledger[(day, client, key_id, model)][1] += total or 0

    assert by_key.json()["to"] == today and by_key.json()["by"] == "key"
    per_key = {(r["day"], r["client"], r["key_id"]): [r["requests"], r["total_tokens"]]
               for r in by_key.json()["data"] if r["client"] != "console-ops"}
    expected_keys: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for (day, client, key_id, _), (count, total) in ledger.items():
        expected_keys[(day, client, key_id)][0] += count
        expected_keys[(day, client, key_id)][1] += total
    assert per_key == expected_keys
    assert per_key[(today, XSS, made[XSS]["key"]["key_id"])][0] == 2
    assert per_key[(today, "ulla", made["ulla"]["key"]["key_id"])][1] > 0

    per_model = {(r["day"], r["model"]): [r["requests"], r["total_tokens"]]
                 for r in by_model.json()["data"] if r["model"] is not None}
    expected_models: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for (day, _, _, model), (count, total) in ledger.items():
        if model is not None:
            expected_models[(day, model)][0] += count
            expected_models[(day, model)][1] += total
    assert per_model == expected_models
    assert {model for _, model in per_model} == {"smollm2", "smollm2-embeddings"}

    assert download.headers["Content-Type"].startswith("text/csv")
    assert download.headers["Content-Disposition"].startswith("attachment; filename=\"usage-")
    rows = [row for row in csv_rows(download.text) if row["client"] != "console-ops"]
    # an empty cell is a null (a request that named no model, say); a formula got a quote
    assert {(row["day"], row["client"][1:] if row["client"].startswith("'=") else row["client"],
             row["key_id"] or None, row["model"] or None): [int(row["requests"]), int(row["total_tokens"])]
            for row in rows} == ledger
    assert len(rows) == len(ledger)
    # a formula in a client id is text for a spreadsheet; markup is left as it is (it is not HTML)
    assert {row["client"] for row in rows} >= {"ulla", XSS, "'" + FORMULA}


# The pages, in headless Chromium (conftest.py's ConsolePage), on the data the tests above made.

def script_errors(page) -> list[str]:
    return [e for e in page.script_errors() if "/favicon.ico" not in e]  # the console has no icon


def rows_with(page, css: str, text: str) -> list:
    return [row for row in page.all(f"{css} tbody tr") if text in row.text]


def test_the_keys_page_adds_a_key_that_works_at_once_and_revokes_it(stack, console_page):
    page = console_page(stack.url)
    page.sign_in(stack.admin, "keys")
    page.wait_text("#keys-table", "console-user")
    assert "read-only (env)" in rows_with(page, "#keys-table", "console-user")[0].text
    page.find("#new-client").send_keys("webby")
    page.find("#new-models").send_keys("smollm2")
    page.find("#new-tpd").send_keys("100000")
    page.find("#new-priority").send_keys("5")
    page.find("#key-form button[type=submit]").click()
    secret = page.wait(lambda: page.text("#new-secret"), message="the new key's secret")
    assert secret.startswith("sk-lg-")
    row = page.wait(lambda: rows_with(page, "#keys-table", "webby"), message="the new key's row")[0]
    key_id = row.get_attribute("data-key")
    assert "100k tokens/day" in row.text and "smollm2" in row.text and secret not in page.text("#keys-table")
    assert poll(lambda: works_on_both_workers(stack, secret), timeout=5)  # at once, on both workers
    page.shot("keys")

    revoke = row.find_element("css selector", "button.revoke")
    revoke.click()
    assert page.wait(lambda: revoke.text.startswith("Really"))  # a second click confirms
    revoke.click()
    page.wait(lambda: not rows_with(page, "#keys-table", "webby"), message="the revoked key to leave the list")
    time.sleep(1.0)
    assert [chat(stack.url, secret).status_code for _ in range(8)] == [401] * 8
    assert keys_listed(stack, everything=True)[key_id]["state"] == "revoked"
    assert not script_errors(page)


def test_a_client_id_carrying_markup_is_shown_as_text_on_both_pages(stack, console_page):
    page = console_page(stack.url)
    for name, table in (("keys", "#keys-table"), ("usage", "#usage-keys-table")):
        page.open(name)
        page.wait_text(table, XSS)  # the markup is the cell's visible text
        cell = [c for c in page.all(f"{table} td") if c.text == XSS][0]
        assert "&lt;script&gt;" in cell.get_attribute("innerHTML")
        assert page.all(f"#page-{name} img") == [] and page.all(f"#page-{name} script") == []
        assert page.driver.execute_script("return window.pwned === undefined")
    assert not script_errors(page)


def test_the_usage_page_charts_and_tables_the_ledger_and_downloads_its_csv(stack, console_page, logs):
    page = console_page(stack.url)
    downloads = logs / "console-downloads"
    downloads.mkdir(exist_ok=True)
    page.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    page.open("usage")
    page.wait_text("#usage-keys-table", "ulla")
    page.wait_text("#usage-models-table", "smollm2-embeddings")
    by_key = api(stack, "GET", "/usage?days=30&by=key").json()["data"]
    ulla = [r for r in by_key if r["client"] == "ulla"][0]
    shown = rows_with(page, "#usage-keys-table", ulla["key_id"])[0].text.split()
    assert shown[-4:] == [str(ulla[name]) for name in ("requests", "prompt_tokens", "completion_tokens",
                                                       "total_tokens")]
    for chart in ("#usage-keys-chart", "#usage-models-chart"):
        assert page.all(f"{chart} svg polyline"), chart  # a line per series
    # the legends name the three biggest keys and models of the range, the rest summed as "others"
    for chart, by, name in (("#usage-keys-chart", "key", lambda r: f"{r['client']} ({r['key_id']})"),
                            ("#usage-models-chart", "model", lambda r: r["model"] or "(no model)")):
        totals: dict[str, int] = defaultdict(int)
        for r in api(stack, "GET", f"/usage?days=30&by={by}").json()["data"]:
            totals[name(r)] += r["total_tokens"]
        legend = page.text(f"{chart} .legend")
        top = sorted(totals, key=totals.get, reverse=True)[:3]
        assert all(f"{n} (tokens)" in legend for n in top), (legend, totals)
        assert ("others (tokens)" in legend) == (len(totals) > 3)
    page.shot("usage")

    page.find("#usage-csv").click()
    target = downloads / "llamagate-usage-30d.csv"
    assert poll(lambda: target.exists() and target.stat().st_size > 0, timeout=10)
    expected = api(stack, "GET", "/usage.csv?days=30").text
    # the admin's own console calls (no model) go on meanwhile: the rest is the same file
    without_admin = lambda text: [r for r in csv_rows(text) if r["client"] != "console-ops"]  # noqa: E731
    assert without_admin(target.read_text()) == without_admin(expected)
    assert any(r["client"] == "'" + FORMULA for r in csv_rows(target.read_text()))
    assert not script_errors(page)
