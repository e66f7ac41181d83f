"""Secrets stay put: replica URLs shown without their userinfo (/health, /admin/status,
the command line), an operator key never echoed when the operator already has it, a
backend's API key off the process list."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gateway import Principal, hookimpl

from .conftest import config_doc

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-pw"


def with_userinfo(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@")


# --- the helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("http://user:s3cret@127.0.0.1:8081", "http://***@127.0.0.1:8081"),
    ("https://token@example.com/base", "https://***@example.com/base"),
    ("http://u:p@ss@host:1/x", "http://***@host:1/x"),  # the userinfo runs to the last @
    ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
    ("http://host/a@b", "http://host/a@b"),  # an @ in the path is not userinfo
    ("replicas http://a:b@h1:1, http://h2:2 and HTTP://c@h3", "replicas http://***@h1:1, http://h2:2 and HTTP://***@h3"),
])
def test_redact_url(url, shown):
    from gateway.redact import redact_url

    assert redact_url(url) == shown


def test_key_hint():
    from gateway.redact import key_hint

    assert key_hint("sk-lg-" + "a" * 40) == "sk-lg-…"
    assert key_hint("short-key") == "…"


# --- 2. replica URLs keep their userinfo to themselves ----------------------------------

class AdminEveryone:
    @hookimpl
    def request(self, ctx):
        ctx.principal = Principal("root", "admin")


def test_health_and_admin_status_show_replica_urls_without_userinfo(make_client, canned_url):
    client = make_client([("admin", AdminEveryone())], admin_pipeline="default",
                         backends={"chat": {"urls": [with_userinfo(canned_url)], "connect_timeout": 2}})
    client.gateway.upstreams.check_all()  # userinfo is still used: requests sends it as Basic auth
    health = client.simulate_get("/health")
    assert health.status_code == 200
    assert SECRET not in health.text
    assert health.json["backends"]["chat"]["replicas"][0]["url"] == canned_url.replace("http://", "http://***@")
    status = client.simulate_get("/admin/status")
    assert status.status_code == 200
    assert SECRET not in status.text
    assert status.json["backends"]["chat"]["replicas"][0]["url"] == canned_url.replace("http://", "http://***@")


def test_cli_check_routes_and_status_show_replica_urls_without_userinfo(tmp_path, capsys):
    from gateway import cli

    doc = config_doc(with_userinfo("http://127.0.0.1:8081"),
                     backends={"chat": {"urls": [with_userinfo("http://127.0.0.1:8081")]},
                               "images": {"urls": [with_userinfo("http://127.0.0.1:7860")]}},
                     routes={"/v1/chat/completions": "default",
                             "/sdapi/*": {"pipeline": "default", "backend": "images"}})
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["check", str(path)]) == 0
    assert cli.main(["routes", str(path)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "http://***@127.0.0.1:8081" in out and "http://***@127.0.0.1:7860" in out
    table = cli.inspection.status_table({"pid": 1, "in_flight": 0, "draining": False, "pipelines": {}, "backends": {
        "chat": {"limit": 4, "in_flight": 0, "queued": 0, "replicas": [
            {"url": with_userinfo("http://10.0.0.1:8081"), "ready": True, "slots": 4, "in_flight": 0,
             "breaker": "closed"}]}}})
    assert SECRET not in table and "http://***@10.0.0.1:8081" in table


def test_a_config_error_does_not_print_a_replica_password(tmp_path, capsys):
    from gateway import cli

    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config_doc("http://user:s3cret-pw@127.0.0.1:8081 oops")))
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "does not match" in err and SECRET not in err


# --- 5. the operator key in llamagate up's banner -----------------------------------------

class FakeChild:
    def __init__(self, *args, **kwargs):
        pass

    def poll(self):
        return 0  # "exited": cmd_up prints the banner, then stops everything

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return 0


def run_up(monkeypatch, tmp_path) -> None:
    from gateway.cli import serving as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "OPERATOR_KEY_FILE", tmp_path / ".llamagate-api-key")
    monkeypatch.setattr(cli.subprocess, "Popen", FakeChild)
    monkeypatch.setattr(cli, "wait_until_ready", lambda urls, timeout: True)
    monkeypatch.setattr(cli, "checked_config", lambda path: object())
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    args = SimpleNamespace(config="pipelines.yaml", bind="127.0.0.1:1")
    with pytest.raises(SystemExit):
        cli.cmd_up(args)
    monkeypatch.delenv("LLAMAGATE_API_KEY", raising=False)  # cmd_up exported it


def test_up_does_not_print_a_key_from_the_environment(monkeypatch, tmp_path, capsys):
    key = "sk-operator-" + "q" * 40
    monkeypatch.setenv("LLAMAGATE_API_KEY", key)
    run_up(monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "Llamagate is up" in out
    assert key not in out and "q" * 10 not in out
    assert '"Authorization: Bearer $LLAMAGATE_API_KEY"' in out
    assert "sk-ope…" in out


def test_up_shows_a_key_it_made_once_and_then_only_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("LLAMAGATE_API_KEY", raising=False)
    run_up(monkeypatch, tmp_path)
    first = capsys.readouterr().out
    key = (tmp_path / ".llamagate-api-key").read_text().strip()
    assert f"'Authorization: Bearer {key}'" in first  # made now: shown, once
    run_up(monkeypatch, tmp_path)
    second = capsys.readouterr().out
    assert "Llamagate is up" in second and key not in second
    assert '"Authorization: Bearer $(cat ' in second


# --- beyond the list: a backend's API key stays off the process list -----------------------

def test_llama_server_gets_its_api_key_through_the_environment_not_argv(monkeypatch, tmp_path):
    from gateway.fleet import llamaserver as backend

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    started = {}

    def fake_execve(path, argv, env):
        started.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(backend.os, "execve", fake_execve)
    monkeypatch.setattr(backend.os, "execv", lambda path, argv: started.update(path=path, argv=argv, env=None)
                        or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        backend.run(backend.BackendOptions(model=str(model), binary="/bin/true", api_key="sk-backend-secret"))
    assert started["path"] == "/bin/true"
    assert not any("sk-backend-secret" in arg for arg in started["argv"])  # argv is world-readable
    assert started["env"]["LLAMA_API_KEY"] == "sk-backend-secret"
