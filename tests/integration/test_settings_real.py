"""Settings through real gunicorn: bad values stop the master before any worker with one
line each and no traceback; good ones reach the gevent workers (gateway.settings)."""

from __future__ import annotations

import math
import os
import sys

import requests

from gateway.testing import canned_llama_app, serve_in_thread

from .conftest import ROOT, Proc


def test_bad_settings_stop_gunicorn_with_one_line_each(tmp_path):
    env = dict(os.environ, GATEWAY_WORKERS="x", LLAMAGATE_LOG_LEVEL="loud", GATEWAY_CLIENT_TIMEOUT="0",
               GATEWAY_CONFIG=str(ROOT / "pipelines.yaml"), GATEWAY_BIND="127.0.0.1:1")
    proc = Proc([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], tmp_path / "bad.log", env)
    try:
        assert proc.popen.wait(timeout=60) == 1
    finally:
        proc.stop()
    assert proc.output() == (
        "llamagate: GATEWAY_WORKERS: 'x' is not an integer\n"
        "llamagate: LLAMAGATE_LOG_LEVEL: 'loud' is not one of debug, info, warning, error, critical (any case)\n"
        "llamagate: GATEWAY_CLIENT_TIMEOUT: '0' must be more than 0\n")


def test_the_workers_setting_reaches_the_workers(start_gateway):
    # Each worker admits its share of a backend's slots: with two, half of them.
    server, chat_url = serve_in_thread(canned_llama_app)
    try:
        doc = {"health_interval": 1, "backends": {"chat": {"urls": [chat_url]}},
               "models": {"smollm2": {"backend": "chat"}}, "pipelines": {"open": []},
               "routes": {"/v1/chat/completions": "open"}}
        gw = start_gateway(doc, workers=2, LLAMAGATE_LOG_LEVEL="INFO")
        chat = requests.get(gw.url + "/health", timeout=10).json()["backends"]["chat"]
        slots = chat["replicas"][0]["slots"] or 4  # 4 until /props answered
        assert chat["limit"] == math.ceil(slots / 2)
        output = gw.proc.output()
        assert "Traceback" not in output and "Booting worker" in output
    finally:
        server.shutdown()


def test_a_stopped_gateway_removes_the_metrics_folder_it_made(start_gateway, tmp_path):
    # Without PROMETHEUS_MULTIPROC_DIR (the tests' environment has none), gunicorn.conf.py
    # makes a folder per run of the gateway; its on_exit must remove it, as well as stop
    # the fleet (a second on_exit in the file used to replace the first).
    server, chat_url = serve_in_thread(canned_llama_app)
    try:
        doc = {"backends": {"chat": {"urls": [chat_url]}}, "models": {"smollm2": {"backend": "chat"}},
               "pipelines": {"open": []}, "routes": {"/v1/chat/completions": "open"}}
        gw = start_gateway(doc, TMPDIR=str(tmp_path))
        made = list(tmp_path.glob("llamagate-metrics-*"))
        assert len(made) == 1 and made[0].is_dir()
        gw.proc.stop()
        assert gw.proc.popen.returncode == 0, gw.proc.output()
        assert not made[0].exists(), gw.proc.output()
    finally:
        server.shutdown()
