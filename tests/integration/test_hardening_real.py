"""The security review's findings, reproduced through real gunicorn gevent workers against
the canned backend: prefix routes that escaped their prefix, replica passwords in
/health, access-log floods, the log level's case, a bad log level's traceback per worker."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time

import pytest
import requests

from gateway.testing import serve_in_thread

from .conftest import ROOT, Proc

SECRET = "s3cret-pw"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}

# Each was relayed outside /sdapi/ before (/props, /slots, /metrics of the images backend)
ESCAPES = [
    "/sdapi/../props", "/sdapi/%2e%2e/slots", "/sdapi/..%2f..%2fmetrics", "/sdapi/%2E%2E/slots",
    "/sdapi/.%2e/props", "/sdapi/v1/..%2F..%2F..%2Fmetrics", "/sdapi/..;/props", "/sdapi/%252e%252e/props",
    "/sdapi/..%5c..%5cmetrics", "/sdapi/..\\..\\metrics", "/sdapi/a%00b", "/sdapi%2f../props",
    "/sdapi/x/../../props", "/sdapi/x#/../../props", "http://127.0.0.1/sdapi/../props",
    "/sdapi/%c0%ae%c0%ae/props",
]


class Recorder:
    """A WSGI backend that keeps the raw target of every relayed request (the in-process
    server puts the raw request target in PATH_INFO and QUERY_STRING)."""

    def __init__(self) -> None:
        self.relayed: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        target = environ["PATH_INFO"] + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")
        if environ.get("HTTP_X_REQUEST_ID"):  # relayed by the gateway, not its health check
            with self.lock:
                self.relayed.append(target)
        data = json.dumps({"target": target}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


@pytest.fixture(scope="module")
def setup(start_gateway, canned_url, logs):
    chat_url = canned_url
    recorder = Recorder()
    images_server, images_url = serve_in_thread(recorder)
    access_log = logs / "hardening-access.log"
    doc = {
        "health_interval": 1,
        "backends": {"chat": {"urls": [chat_url.replace("http://", f"http://user:{SECRET}@")]},
                     "images": {"urls": [images_url]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"guarded": [{"accesslog": {"path": str(access_log)}},
                                  {"auth": {"env_keys": {"HARDENING_KEYS": "user"}}}],
                      "open": []},
        "routes": {"/v1/chat/completions": "guarded", "/sdapi/*": {"pipeline": "open", "backend": "images"}},
    }
    gw = start_gateway(doc, LLAMAGATE_LOG_LEVEL="info", HARDENING_KEYS="sk-hardening-key:alice")
    gw.recorder, gw.access_log, gw.chat_url = recorder, access_log, chat_url
    yield gw
    images_server.shutdown()


def send_raw(gw, request: bytes) -> tuple[int, bytes]:
    """One request written byte for byte (requests and http.client would normalise or
    refuse some of these targets); returns the status and the body."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(gw, target: str, *headers: str) -> tuple[int, bytes]:
    extra = "".join(f"{h}\r\n" for h in headers)
    return send_raw(gw, f"GET {target} HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n".encode())


@pytest.mark.parametrize("target", ESCAPES)
def test_prefix_route_never_relays_outside_its_prefix(setup, target):
    before = len(setup.recorder.relayed)
    status, body = get(setup, target)
    assert setup.recorder.relayed[before:] == []  # the backend saw nothing of it
    assert status in (400, 404), (status, body)
    if status == 400:  # routed to the prefix route, refused there in OpenAI's shape
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert all(t.startswith("/sdapi/") and ".." not in t for t in setup.recorder.relayed)


def test_a_script_name_header_cannot_move_the_prefix(setup):
    before = len(setup.recorder.relayed)
    status, _ = get(setup, "/x/sdapi/../../props", "SCRIPT_NAME: /x")
    assert status in (400, 404)
    assert setup.recorder.relayed[before:] == []


def test_prefix_route_relays_the_raw_path_byte_for_byte(setup):
    before = len(setup.recorder.relayed)
    host, port = setup.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)  # sends the target as written
    try:
        conn.request("GET", "/sdapi/a%3Fb%23c/caf%C3%A9?x=%3F&y=a/b")
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"target": "/sdapi/a%3Fb%23c/caf%C3%A9?x=%3F&y=a/b"}  # %3F stays encoded
        conn.request("POST", "/sdapi/v1/txt2img", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"target": "/sdapi/v1/txt2img"}
    finally:
        conn.close()
    assert setup.recorder.relayed[before:] == ["/sdapi/a%3Fb%23c/caf%C3%A9?x=%3F&y=a/b", "/sdapi/v1/txt2img"]


def test_health_shows_no_replica_password(setup):
    resp = requests.get(setup.url + "/health", timeout=10)
    assert resp.status_code == 200  # the chat backend's checks pass with the userinfo
    assert SECRET not in resp.text
    assert resp.json()["backends"]["chat"]["replicas"][0]["url"].startswith("http://***@127.0.0.1:")


def test_unauthenticated_megabyte_model_makes_a_short_access_log_line(setup):
    resp = requests.post(setup.url + "/v1/chat/completions", json=dict(CHAT, model="m" * 1_000_000), timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    request_id = resp.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # complete() runs as the body closes: it may trail the answer
        lines = [line for line in setup.access_log.read_text().splitlines() if request_id in line]
        if lines:
            break
        time.sleep(0.05)
    assert len(lines) == 1 and len(lines[0]) < 2048
    assert json.loads(lines[0])["status"] == 401


def test_lower_case_log_levels_serve(setup, start_gateway):
    # `setup` runs at LLAMAGATE_LOG_LEVEL=info; warning too
    assert requests.get(setup.url + "/health", timeout=10).status_code == 200
    doc = {"backends": {"chat": {"urls": [setup.chat_url]}}, "models": {"smollm2": {"backend": "chat"}},
           "pipelines": {"open": []}, "routes": {"/v1/chat/completions": "open"}}
    quiet = start_gateway(doc, LLAMAGATE_LOG_LEVEL="warning")
    assert requests.get(quiet.url + "/health", timeout=10).status_code == 200
    for gw in (setup, quiet):
        assert "Traceback" not in gw.proc.output() and "Unknown level" not in gw.proc.output()


def test_a_bad_log_level_stops_gunicorn_with_one_clear_line(tmp_path):
    import os

    env = dict(os.environ, LLAMAGATE_LOG_LEVEL="loud", GATEWAY_CONFIG=str(ROOT / "pipelines.yaml"),
               GATEWAY_BIND="127.0.0.1:1")
    proc = Proc([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], tmp_path / "loud.log", env)
    try:
        assert proc.popen.wait(timeout=60) == 1
    finally:
        proc.stop()
    assert proc.output() == ("llamagate: LLAMAGATE_LOG_LEVEL: 'loud' is not one of debug, info, "
                             "warning, error, critical (any case)\n")
