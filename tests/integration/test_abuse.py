"""Bad input and abuse against real gunicorn gevent workers: each a clear 4xx in OpenAI's
shape while the gateway keeps serving; keys never reach a log; a schemathesis run finds no 5xx."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gateway.storage import keys

from .conftest import ROUTES, read_response

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def guarded(start_gateway, chat_backend, logs):
    keys_file = logs / "abuse-keys.yaml"
    key = keys.add_key(keys_file, "mallory", "user")
    admin = keys.add_key(keys_file, "ops", "admin")
    doc = {
        "health_interval": 1,
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [chat_backend]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [
            {"accesslog": {"path": str(logs / "abuse-access.log")}},
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
            {"validate": {"max_tokens_limit": 256}},
        ]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }
    gw = start_gateway(doc, GATEWAY_CLIENT_TIMEOUT="1", GATEWAY_KEEPALIVE="2")
    gw.key, gw.admin = key, admin
    return gw


def post(gw, body: bytes | dict, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(gw.url + "/v1/chat/completions", data=data, timeout=10,
                         headers={"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json", **headers})


def assert_error(resp: requests.Response, status: int, code=None, param=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param
    assert "Traceback" not in resp.text
    return error


def raw(gw, data: bytes, read_timeout: float = 10) -> bytes:
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


@pytest.mark.parametrize("body, fragment", [
    (b'{"model": "smollm2", "messages": [', "could not parse"),                 # truncated JSON
    (b'{"model": "smollm2", "messages": "\xff\xfe"}', "not valid UTF-8"),      # invalid UTF-8
    (b'{"model": "smollm2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),  # past json's own limit
    (json.dumps({"model": "smollm2", "messages": [], "extra": json.loads("[" * 100 + "]" * 100)}).encode(),
     "nested deeper than 64"),
])
def test_malformed_bodies_get_400(guarded, body, fragment):
    error = assert_error(post(guarded, body), 400)
    assert fragment in error["message"]


@pytest.mark.parametrize("change, param", [
    ({"messages": "hello"}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"n": 10**6}, "n"),
    ({"stream": "yes"}, "stream"),
])
def test_wrong_types_and_absurd_values_get_400_naming_the_field(guarded, change, param):
    assert_error(post(guarded, dict(CHAT, **change)), 400, param=param)


def test_request_id_abuse(guarded):
    assert_error(post(guarded, CHAT, **{"X-Request-Id": "x" * 129}), 400, param="x-request-id")
    answer = raw(guarded, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rb\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"error": {"message": "Bad Request' in answer and b"application/json" in answer


def test_huge_headers_get_an_openai_shaped_431_or_400(guarded):
    answer = raw(guarded, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 431)
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    answer = raw(guarded, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400")
    assert b'"error"' in answer


def test_a_client_trickling_its_body_gets_408(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    body = json.dumps(CHAT).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + guarded.key.encode() + b"\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        started = time.monotonic()
        answer = sock.recv(65536)
        elapsed = time.monotonic() - started
        while b"request_timeout" not in answer:  # the body may follow the headers in another segment
            chunk = sock.recv(65536)
            assert chunk, f"closed after {answer!r}"
            answer += chunk
    assert elapsed < 5
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code": "request_timeout"' in answer


def test_a_client_trickling_its_headers_is_dropped_and_others_are_served(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        assert requests.get(guarded.url + "/v1/models", timeout=5,
                            headers={"Authorization": f"Bearer {guarded.key}"}).status_code == 200
        started = time.monotonic()
        for _ in range(10):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            if sock.recv(1024) == b"":
                break
        assert time.monotonic() - started < 6  # gunicorn's keepalive (2 s here) bounds the headers


def test_unknown_routes_and_methods(guarded):
    assert_error(requests.get(guarded.url + "/v2/anything"), 404, "unknown_url")
    assert_error(requests.put(guarded.url + "/v1/chat/completions"), 405, "method_not_allowed")


def test_admin_endpoints_need_the_admin_role(guarded):
    user = {"Authorization": f"Bearer {guarded.key}"}
    assert_error(requests.get(guarded.url + "/admin/status", headers=user), 403, "admin_required")
    assert_error(requests.get(guarded.url + "/admin/status"), 401, "invalid_api_key")
    status = requests.get(guarded.url + "/admin/status", headers={"Authorization": f"Bearer {guarded.admin}"})
    assert status.status_code == 200 and "chat" in status.json()["backends"]
    assert status.json()["backends"]["chat"]["replicas"][0]["slots"] == 2  # learned from llama-server's /props
    assert_error(requests.post(guarded.url + "/v1/requests/nope/cancel", headers=user), 404, "request_not_found")


def test_the_gateway_still_serves_after_all_that(guarded):
    assert post(guarded, CHAT).status_code == 200


def test_api_keys_never_reach_any_log(guarded, logs, full_run_marker=None):
    # Use the keys once more, right and wrong, then read every log this session wrote.
    post(guarded, CHAT)
    requests.get(guarded.url + "/admin/status", headers={"Authorization": f"Bearer {guarded.admin}"})
    requests.get(guarded.url + "/v1/models", headers={"x-api-key": "sk-wrong-key-abcdef"})
    time.sleep(0.3)
    files = [path for path in Path(logs).rglob("*") if path.is_file() and path.suffix == ".log"]
    assert any("abuse-access" in path.name for path in files)
    for path in files:
        text = path.read_text(errors="replace")
        for secret in (guarded.key, guarded.admin, "sk-wrong-key-abcdef"):
            assert secret not in text, f"{secret[:8]}... found in {path.name}"


def test_schemathesis_finds_no_server_error(start_gateway, canned_url, logs):
    """A bounded property-based run of the gateway's own /openapi.json (canned backend,
    so every generated body is answered fast and deterministically)."""
    keys_file = logs / "fuzz-keys.yaml"
    key = keys.add_key(keys_file, "fuzzer", "admin")
    doc = {
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [canned_url]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"auth": {"keys_file": str(keys_file), "env_keys": {}}},
                                  {"validate": {"max_tokens_limit": 64}}, "cache", "router"]},
        "routes": {route: "default" for route in ROUTES},
    }
    gw = start_gateway(doc)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", gw.url + "/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "25",
         "--header", f"Authorization: Bearer {key}", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all", "--no-color"],
        capture_output=True, text=True, timeout=240)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > 100, summary
    assert "Tested: 12" in summary  # 9, and the fleet's /admin/models, load and unload


def test_cancel_through_gunicorn_frees_the_llama_server_slot(guarded, chat_backend):
    user = {"Authorization": f"Bearer {guarded.key}"}
    body = {"model": "smollm2", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Write a very long story about a llama."}]}
    with requests.post(guarded.url + "/v1/chat/completions", json=body, stream=True, timeout=30,
                       headers={**user, "X-Request-Id": "cancel-me"}) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        admin_view = requests.get(guarded.url + "/admin/status",
                                  headers={"Authorization": f"Bearer {guarded.admin}"}).json()
        assert admin_view["in_flight"] == 1
        answer = requests.post(guarded.url + "/v1/requests/cancel-me/cancel", headers=user, timeout=5)
        assert answer.status_code == 200 and answer.json()["cancelled"] is True
        rest = [line for line in lines if line]
    assert json.loads(rest[-1][6:])["error"]["code"] == "request_cancelled"
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(s["is_processing"] for s in requests.get(chat_backend + "/slots").json()):
        time.sleep(0.02)
    assert not any(s["is_processing"] for s in requests.get(chat_backend + "/slots").json())
    records = [json.loads(line) for line in (Path(guarded.proc.log.parent) / "abuse-access.log").read_text().splitlines()]
    assert next(r for r in records if r["request_id"] == "cancel-me")["outcome"] == "cancelled"


def test_llamagate_status_prints_a_running_gateways_table(guarded, chat_backend):
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--url", guarded.url,
                             "--key", guarded.admin], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("worker pid ")
    row = next(line for line in lines if line.startswith("chat "))
    assert chat_backend in row and "yes" in row and row.rstrip().endswith("closed")
    assert "default: accesslog -> auth -> validate" in result.stdout
    denied = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--url", guarded.url,
                             "--key", guarded.key], capture_output=True, text=True, timeout=30)
    assert denied.returncode == 1 and "HTTP 403" in denied.stderr
