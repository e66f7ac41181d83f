"""The operator's status page at /admin/, rendered by headless Chromium (Debian's package)
against a real gateway: the numbers appear, and they move with the traffic."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from gateway.storage import keys

from .conftest import ROUTES

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=4000"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not on PATH: `make test` installs Debian's package")
    return path


@pytest.fixture(scope="module")
def watched(start_gateway, chat_backend, logs):
    keys_file = logs / "status-keys.yaml"
    admin, user = keys.add_key(keys_file, "ops", "admin"), keys.add_key(keys_file, "alice")
    doc = {
        "admin_pipeline": "default",
        "backends": {"chat": {"urls": [chat_backend]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [{"auth": {"keys_file": str(keys_file), "env_keys": {}}}, "cache"]},
        "routes": {route: "default" for route in ROUTES if route != "/v1/embeddings"},
    }
    gw = start_gateway(doc)
    gw.admin, gw.user = admin, user
    return gw


def traffic(gw, n: int) -> None:
    headers = {"Authorization": f"Bearer {gw.user}"}
    for i in range(n):
        body = {"model": "smollm2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": f"Say {i % 2}."}]}
        assert requests.post(gw.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
    requests.post(gw.url + "/v1/chat/completions", json={"model": "nope", "messages": []}, headers=headers)


def render(chromium: str, url: str, profile: Path, *mode: str) -> str:
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url],
                            capture_output=True, text=True, timeout=60, cwd=profile)
    return result.stdout


def card(dom: str, name: str) -> str:
    match = re.search(rf'id="{name}">([^<]*)<', dom)
    assert match, f"no {name} card in the page"
    return match.group(1)


def test_status_page_shows_live_numbers_and_they_update(chromium, watched, chat_backend, tmp_path):
    page = f"{watched.url}/admin/#key={watched.admin}"
    traffic(watched, 4)
    first = render(chromium, page, tmp_path, "--dump-dom")
    assert card(first, "pid").isdigit()
    assert float(card(first, "rps")) > 0
    requests_before = int(card(first, "requests"))
    assert requests_before >= 5
    assert float(card(first, "p50")) > 0 and float(card(first, "p99")) >= float(card(first, "p50"))
    assert card(first, "hitrate").endswith("%")
    assert int(card(first, "errors")) >= 1
    assert chat_backend in first and ">closed<" in first and "model_not_found" in first
    assert card(first, "updated") != "never"

    traffic(watched, 6)
    second = render(chromium, page, tmp_path, "--dump-dom")
    assert int(card(second, "requests")) > requests_before  # the page follows the traffic

    shot = tmp_path / "status.png"
    render(chromium, page, tmp_path, "--window-size=1200,900", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    shutil.copy(shot, Path(watched.proc.log).parent / "status-page.png")


def test_status_page_without_a_key_asks_for_one_and_shows_no_data(chromium, watched, tmp_path):
    dom = render(chromium, f"{watched.url}/admin/", tmp_path, "--dump-dom")
    assert '<form id="login">' in dom  # no longer hidden
    assert card(dom, "rps") == "-"
    wrong = render(chromium, f"{watched.url}/admin/#key={watched.user}", tmp_path, "--dump-dom")
    assert "This endpoint needs an admin key." in wrong and card(wrong, "rps") == "-"
