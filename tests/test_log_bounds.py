"""Bounded logs: a client cannot write megabytes per request into any log line (access
log, plugin errors, 5xx lines, validate's messages); URLs in log lines lose their
userinfo; LLAMAGATE_LOG_LEVEL in any case, a bad one refused in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway import hookimpl
from gateway.config import parse_config
from gateway.pipeline import build_pipelines

from .conftest import config_doc

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
SECRET = "s3cret-pw"


def plugin(name: str, **config):
    """A built-in plugin built the way a pipeline builds it (schema checked, defaults filled)."""
    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{name: config}]})
    return build_pipelines(parse_config(doc))["default"].plugins[0]


def test_clip():
    from gateway.redact import clip, clip_json

    assert clip("short") == "short"
    assert clip("x" * 1000, 10) == "x" * 10 + "…[+990 chars]"
    assert clip_json({"a": 1}, 100) == {"a": 1}
    assert clip_json({"a": "x" * 100}, 20) == '{"a":"' + "x" * 14 + "…[+88 chars]"


def test_log_lines_show_urls_without_userinfo(caplog):
    from gateway.context import RequestContext

    ctx = RequestContext(request_id="r1", method="POST", route="/v1/chat/completions", pipeline="default")
    with caplog.at_level(logging.INFO, logger="llamagate"):
        ctx.log(logging.WARNING, "replica %s failed", "http://user:s3cret-pw@10.0.0.1:8081")
    assert "replica http://***@10.0.0.1:8081 failed" in caplog.text
    assert SECRET not in caplog.text


# --- 3. log lines stay bounded ----------------------------------------------------------

def test_unauthenticated_flood_makes_a_short_access_log_line(make_client, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOOD_TEST_KEYS", "sk-good:alice")
    log_file = tmp_path / "access.log"
    client = make_client([plugin("accesslog", path=str(log_file)),
                          plugin("auth", env_keys={"FLOOD_TEST_KEYS": "user"})])
    flood = dict(CHAT, model="m" * 1_000_000)
    resp = client.simulate_post("/v1/chat/completions", json=flood)
    assert resp.status_code == 401
    assert resp.json["error"]["code"] == "invalid_api_key"
    # with a key, the body is read: the unknown model is logged, cut
    resp = client.simulate_post("/v1/chat/completions", json=flood, headers={"Authorization": "Bearer sk-good"})
    assert resp.status_code == 404
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2 and all(len(line) < 2048 for line in lines)
    unauthenticated, known = map(json.loads, lines)
    assert unauthenticated["status"] == 401 and unauthenticated["model"] is None  # its body was never read
    assert known["model"] == "m" * 256 + "…[+999744 chars]"


def test_logged_bodies_are_cut_at_max_body_chars(make_client, tmp_path):
    from gateway.testing import FakeBackend

    backend = FakeBackend()
    try:
        log_file = tmp_path / "access.log"
        client = make_client([plugin("accesslog", path=str(log_file), log_bodies=True, max_body_chars=1000)],
                             backend_url=backend.url)
        long_text = "word " * 20_000
        backend.script({"json": {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": long_text}}]}},
                       {"events": [{"choices": [{"index": 0, "delta": {"content": "word " * 100}}]}] * 1000})
        prompt = dict(CHAT, messages=[{"role": "user", "content": "x" * 500_000}])
        assert client.simulate_post("/v1/chat/completions", json=prompt).status_code == 200
        assert client.simulate_post("/v1/chat/completions", json=dict(prompt, stream=True)).status_code == 200
        small = dict(CHAT, messages=[{"role": "user", "content": "Hi"}])
        assert client.simulate_post("/v1/chat/completions", json=small).status_code == 200
    finally:
        backend.close()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 3 and all(len(line) < 3000 for line in lines)
    whole, streamed, short = (json.loads(line) for line in lines)
    assert whole["request"].startswith('{"model":"smollm2","messages":[{"role":"user","content":"xxx')
    assert whole["request"].endswith(" chars]") and len(whole["request"]) < 1100
    assert whole["completion"] == long_text[:1000] + f"…[+{len(long_text) - 1000} chars]"
    assert streamed["completion"] == ("word " * 100 * 1000)[:1000] + f"…[+{500 * 1000 - 1000} chars]"
    assert short["request"]["messages"] == [{"role": "user", "content": "Hi"}]  # small: kept as an object


def test_accesslog_schema_describes_max_body_chars():
    schema = json.loads((ROOT / "plugins" / "accesslog" / "schema.json").read_text())
    field = schema["properties"]["max_body_chars"]
    assert field["default"] == 16384 and field["description"]


class Crash:
    @hookimpl
    def request(self, ctx):
        raise ValueError("the client sent " + ctx.body["model"])


def test_a_plugin_crash_echoing_client_text_logs_a_bounded_traceback(make_client, caplog):
    client = make_client([("crash", Crash())])
    with caplog.at_level(logging.ERROR, logger="llamagate"):
        resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, model="m" * 1_000_000))
    assert resp.status_code == 500 and resp.json["error"]["code"] == "plugin_error"
    assert "plugin failed in request hook" in caplog.text
    assert "ValueError: the client sent mmm" in caplog.text
    assert len(caplog.text) < 20_000


def test_a_5xx_with_a_huge_message_logs_a_bounded_line(make_client, caplog):
    from gateway.testing import FakeBackend

    backend = FakeBackend()
    try:
        backend.script({"status": 500, "json": {"error": {"message": "e" * 1_000_000, "type": "server_error"}}})
        client = make_client(backend_url=backend.url)
        with caplog.at_level(logging.WARNING, logger="llamagate"):
            resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    finally:
        backend.close()
    assert resp.status_code == 500
    assert "/v1/chat/completions -> 500 eee" in caplog.text
    assert len(caplog.text) < 10_000


def test_validate_param_through_client_keys_is_bounded(make_client):
    client = make_client([plugin("validate")])
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, logit_bias={"k" * 1_000_000: "high"}))
    assert resp.status_code == 400
    error = resp.json["error"]
    assert error["param"].startswith("logit_bias.kkk") and len(error["param"]) < 300
    assert len(error["message"]) < 1000


# --- 4. the log level, in any case -------------------------------------------------------

@pytest.mark.parametrize("value, level", [(None, "info"), ("", "info"), ("info", "info"), ("Warning", "warning"),
                                          ("DEBUG", "debug"), (" error ", "error"), ("critical", "critical")])
def test_log_level_in_any_case(value, level):
    from gateway.settings import Settings

    environ = {} if value is None else {"LLAMAGATE_LOG_LEVEL": value}
    assert Settings.from_environ(environ).log_level == level
    assert Settings.from_environ(environ).logging_level == level.upper()


@pytest.mark.parametrize("value", ["loud", "warn", "10", "info,debug"])
def test_a_bad_log_level_is_one_clear_error(value):
    from gateway.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as caught:
        Settings.from_environ({"LLAMAGATE_LOG_LEVEL": value})
    assert caught.value.problems == [f"LLAMAGATE_LOG_LEVEL: {value!r} is not one of debug, info, warning, error, "
                                     "critical (any case)"]


def test_llamagate_serve_refuses_a_bad_log_level_in_one_line(monkeypatch, capsys, tmp_path):
    from gateway import cli

    monkeypatch.setenv("LLAMAGATE_LOG_LEVEL", "loud")
    monkeypatch.setattr(cli.serving.os, "execve", lambda *a: pytest.fail("gunicorn started"))
    assert cli.main(["serve", "--config", str(ROOT / "pipelines.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LLAMAGATE_LOG_LEVEL: 'loud' is not one of debug, info" in err


def test_get_app_logging_set_up_accepts_lower_case(monkeypatch):
    from gateway import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        monkeypatch.setenv("LLAMAGATE_LOG_LEVEL", "warning")
        logs.setup_logging()
        assert root.level == logging.WARNING
        assert all(logs._BOUNDS in handler.filters for handler in root.handlers)
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
