"""gateway.settings: every environment variable declared once, read once, checked with one
line per bad value; the modules that used to read the environment read it through it;
docs/configuration-environment.md is generated from the declarations."""

from __future__ import annotations

import ast
import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import settings
from gateway.settings import SETTINGS, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration-environment.md"
LEVELS = "debug, info, warning, error, critical (any case)"


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(environ)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- parsing ---------------------------------------------------------------------------------------

def test_defaults_when_nothing_is_set():
    s = Settings.from_environ({})
    assert s == Settings()
    assert (s.bind, s.workers, s.worker_connections, s.timeout, s.graceful_timeout, s.keepalive) == \
        ("127.0.0.1:8000", 1, 1000, 30, 30, 5)
    assert (s.config, s.log_level, s.logging_level, s.client_timeout, s.reload_interval) == \
        ("pipelines.yaml", "info", "INFO", 30.0, 1.0)
    assert (s.fleet_socket, s.keys_file, s.llama_server_bin, s.api_key, s.llama_api_key) == \
        ("", "keys.yaml", "", "", "")


def test_every_setting_from_the_environment():
    s = Settings.from_environ({
        "GATEWAY_BIND": "0.0.0.0:9000", "GATEWAY_WORKERS": " 4 ", "GATEWAY_WORKER_CONNECTIONS": "50",
        "GATEWAY_TIMEOUT": "0", "GATEWAY_GRACEFUL_TIMEOUT": "7", "GATEWAY_KEEPALIVE": "2",
        "LLAMAGATE_LOG_LEVEL": "WaRnInG", "GATEWAY_CONFIG": "/etc/llamagate/p.yaml",
        "GATEWAY_CLIENT_TIMEOUT": "2.5", "GATEWAY_RELOAD_INTERVAL": "0",
        "LLAMAGATE_FLEET_SOCKET": "/run/fleet.sock", "LLAMAGATE_KEYS_FILE": "k.yaml", "LLAMA_SERVER_BIN": "/opt/ls",
        "LLAMAGATE_API_KEY": "sk-operator", "LLAMA_API_KEY": "sk-backend", "UNRELATED": "x"})
    assert s == Settings(bind="0.0.0.0:9000", workers=4, worker_connections=50, timeout=0, graceful_timeout=7,
                         keepalive=2, log_level="warning", config="/etc/llamagate/p.yaml", client_timeout=2.5,
                         reload_interval=0.0, fleet_socket="/run/fleet.sock", keys_file="k.yaml",
                         llama_server_bin="/opt/ls", api_key="sk-operator", llama_api_key="sk-backend")
    assert s.logging_level == "WARNING"


def test_an_empty_variable_takes_the_default():
    assert Settings.from_environ({"GATEWAY_WORKERS": "", "LLAMAGATE_LOG_LEVEL": "  "}) == Settings()


@pytest.mark.parametrize("env, value, line", [
    ("GATEWAY_WORKERS", "x", "GATEWAY_WORKERS: 'x' is not an integer"),
    ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS: '0' must be at least 1"),
    ("GATEWAY_WORKERS", "2.0", "GATEWAY_WORKERS: '2.0' is not an integer"),
    ("GATEWAY_WORKER_CONNECTIONS", "many", "GATEWAY_WORKER_CONNECTIONS: 'many' is not an integer"),
    ("GATEWAY_TIMEOUT", "-1", "GATEWAY_TIMEOUT: '-1' must be at least 0"),
    ("GATEWAY_GRACEFUL_TIMEOUT", "30s", "GATEWAY_GRACEFUL_TIMEOUT: '30s' is not an integer"),
    ("GATEWAY_KEEPALIVE", "-5", "GATEWAY_KEEPALIVE: '-5' must be at least 0"),
    ("GATEWAY_CLIENT_TIMEOUT", "0", "GATEWAY_CLIENT_TIMEOUT: '0' must be more than 0"),
    ("GATEWAY_CLIENT_TIMEOUT", "soon", "GATEWAY_CLIENT_TIMEOUT: 'soon' is not a number"),
    ("GATEWAY_CLIENT_TIMEOUT", "nan", "GATEWAY_CLIENT_TIMEOUT: 'nan' is not a finite number"),
    ("GATEWAY_RELOAD_INTERVAL", "-1", "GATEWAY_RELOAD_INTERVAL: '-1' must be at least 0"),
    ("GATEWAY_RELOAD_INTERVAL", "inf", "GATEWAY_RELOAD_INTERVAL: 'inf' is not a finite number"),
    ("LLAMAGATE_LOG_LEVEL", "loud", f"LLAMAGATE_LOG_LEVEL: 'loud' is not one of {LEVELS}"),
    ("GATEWAY_BIND", "8000", "GATEWAY_BIND: '8000' is not HOST:PORT (port 1-65535), unix:PATH or fd://N"),
    ("GATEWAY_BIND", "localhost:99999",
     "GATEWAY_BIND: 'localhost:99999' is not HOST:PORT (port 1-65535), unix:PATH or fd://N"),
    ("GATEWAY_BIND", "::1:8000", "GATEWAY_BIND: '::1:8000' is not HOST:PORT (port 1-65535), unix:PATH or fd://N"),
    ("GATEWAY_BIND", "a b:80", "GATEWAY_BIND: 'a b:80' is not HOST:PORT (port 1-65535), unix:PATH or fd://N"),
    ("GATEWAY_BIND", "h:\u00b2", "GATEWAY_BIND: 'h:\u00b2' is not HOST:PORT (port 1-65535), unix:PATH or fd://N"),
])
def test_each_bad_value_is_one_clear_line(env, value, line):
    assert problems({env: value}) == [line]


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "0.0.0.0:80", "localhost:1", "[::1]:8000", "unix:/run/lg.sock",
                                  "fd://3"])
def test_binds_gunicorn_takes(bind):
    assert Settings.from_environ({"GATEWAY_BIND": bind}).bind == bind


def test_several_bad_values_are_several_lines_in_declaration_order():
    assert problems({"LLAMAGATE_LOG_LEVEL": "LOUD", "GATEWAY_WORKERS": "x", "GATEWAY_CLIENT_TIMEOUT": "-1",
                     "GATEWAY_KEEPALIVE": "5"}) == [
        "GATEWAY_WORKERS: 'x' is not an integer",
        f"LLAMAGATE_LOG_LEVEL: 'LOUD' is not one of {LEVELS}",
        "GATEWAY_CLIENT_TIMEOUT: '-1' must be more than 0",
    ]


def test_a_bad_value_is_quoted_on_one_bounded_line():
    [line] = problems({"GATEWAY_WORKERS": "1\n" + "9" * 10_000})
    assert "\n" not in line and len(line) < 200 and line.startswith("GATEWAY_WORKERS: '1\\n999")
    assert line.endswith("is not an integer")


def test_settings_are_frozen_and_keys_stay_out_of_their_repr():
    s = Settings.from_environ({"LLAMAGATE_API_KEY": "sk-operator-secret", "LLAMA_API_KEY": "sk-backend-secret"})
    with pytest.raises(AttributeError):
        s.workers = 2
    assert "secret" not in repr(s) and "workers=1" in repr(s)


def test_every_declaration_is_complete():
    assert [spec.name for spec in SETTINGS] == [f for f in Settings.__dataclass_fields__]
    assert len({spec.env for spec in SETTINGS}) == len(SETTINGS)
    for spec in SETTINGS:
        assert spec.env.isupper() and spec.description and "\n" not in spec.description and spec.kind
        # the default is what its own text parses to
        assert spec.default == "" or spec.parse(spec.show(spec.default)) == spec.default


# --- read once -------------------------------------------------------------------------------------

def test_current_reads_the_environment_once_until_reset(monkeypatch):
    monkeypatch.setenv("GATEWAY_WORKERS", "3")
    first = settings.current()
    assert first.workers == 3
    monkeypatch.setenv("GATEWAY_WORKERS", "5")
    assert settings.current() is first
    settings.reset()
    assert settings.current().workers == 5


def test_current_refuses_bad_values(monkeypatch):
    monkeypatch.setenv("GATEWAY_WORKERS", "x")
    with pytest.raises(SettingsError, match="GATEWAY_WORKERS: 'x' is not an integer"):
        settings.current()


# --- the modules read them through gateway.settings ------------------------------------------------

# Reading a variable (os.environ[...] / .get / os.getenv) is allowed only here: the pipelines
# file's ${VAR} expansion and the auth plugin's env_keys read the variables a config names.
ALLOWED_READERS = {"gateway/settings.py", "gateway/config.py", "plugins/auth/__init__.py"}
STILL_READ: dict[str, set[str]] = {}  # exceptions by file: none


def environment_reads(path: Path) -> list[tuple[int, str | None]]:
    """Where a file reads a variable from the environment, and which (None: not a literal)."""
    reads = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target, key = None, None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "pop", "setdefault"):
                target = node.func.value
            elif node.func.attr == "getenv":
                target = node.func
            key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target, key = node.value, node.slice
        if target is not None and ast.unparse(target) in ("os.environ", "os.getenv"):
            reads.append((node.lineno, key.value if isinstance(key, ast.Constant) else None))
    return sorted(reads)


def test_no_module_reads_the_environment_but_settings():
    files = [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("plugins/**/*.py"), ROOT / "gunicorn.conf.py"]
    readers = {}
    for path in files:
        name = str(path.relative_to(ROOT))
        reads = [(line, key) for line, key in environment_reads(path) if key not in STILL_READ.get(name, ())]
        if reads and name not in ALLOWED_READERS:
            readers[name] = reads
    assert readers == {}


def test_the_scan_sees_an_environment_read(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\nA = os.environ.get('X')\nB = os.environ['Y']\nC = os.getenv('Z')\n"
                    "D = dict(os.environ)\ndef f(environ): return environ.get('W')\n")
    assert environment_reads(path) == [(2, "X"), (3, "Y"), (4, "Z")]


def test_the_backend_limit_is_split_by_the_workers_setting(monkeypatch):
    from gateway.config import BackendConfig
    from gateway.backends.upstream import Backend

    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    backend = Backend(BackendConfig("b", ("http://x",)))
    backend.replicas[0].slots = 64
    assert backend.limit == 32


def test_the_worker_sets_the_client_timeout_setting(monkeypatch):
    from gunicorn.workers.base_async import AsyncWorker

    from gateway.web import worker

    monkeypatch.setenv("GATEWAY_CLIENT_TIMEOUT", "2.5")
    monkeypatch.setattr(AsyncWorker, "handle", lambda *args: None)
    client = SimpleNamespace(setblocking=lambda flag: None, settimeout=lambda t: setattr(client, "timeout", t))
    worker.Worker.handle(object.__new__(worker.Worker), None, client, None)
    assert client.timeout == 2.5


def test_ratelimit_memory_store_refused_with_two_workers(monkeypatch):
    from gateway.config import ConfigError, parse_config
    from gateway.pipeline import build_pipelines

    from .conftest import config_doc

    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{"ratelimit": {"store": "memory"}}]})
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    with pytest.raises(ConfigError, match="GATEWAY_WORKERS=2"):
        build_pipelines(parse_config(doc))
    settings.reset()
    monkeypatch.setenv("GATEWAY_WORKERS", "1")
    assert build_pipelines(parse_config(doc))["default"].plugins


def test_setup_logging_takes_the_level_setting(monkeypatch):
    import logging

    from gateway import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        monkeypatch.setenv("LLAMAGATE_LOG_LEVEL", "ERROR")
        logs.setup_logging()
        assert root.level == logging.ERROR
        root.handlers = []
        logs.setup_logging("Debug")  # what get_app passes: settings.current().log_level
        assert root.level == logging.DEBUG
        with pytest.raises(ValueError, match="'loud' is not one of debug"):
            logs.setup_logging("loud")
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])


def test_gunicorn_conf_takes_the_settings(monkeypatch):
    for name, value in {"GATEWAY_BIND": "127.0.0.1:9999", "GATEWAY_WORKERS": "3", "GATEWAY_WORKER_CONNECTIONS": "10",
                        "GATEWAY_TIMEOUT": "11", "GATEWAY_GRACEFUL_TIMEOUT": "12", "GATEWAY_KEEPALIVE": "13",
                        "LLAMAGATE_LOG_LEVEL": "Warning"}.items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert (conf["bind"], conf["workers"], conf["worker_connections"], conf["timeout"], conf["graceful_timeout"],
            conf["keepalive"], conf["loglevel"]) == ("127.0.0.1:9999", 3, 10, 11, 12, 13, "warning")


def test_gunicorn_conf_refuses_bad_settings_one_line_each(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_WORKERS", "x")
    monkeypatch.setenv("GATEWAY_KEEPALIVE", "-1")
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert caught.value.code == 1
    assert capsys.readouterr().err == ("llamagate: GATEWAY_WORKERS: 'x' is not an integer\n"
                                       "llamagate: GATEWAY_KEEPALIVE: '-1' must be at least 0\n")


# --- the command line ------------------------------------------------------------------------------

def test_llamagate_settings_prints_every_setting(monkeypatch, capsys):
    from gateway import cli

    monkeypatch.setenv("GATEWAY_WORKERS", "4")
    monkeypatch.setenv("LLAMAGATE_API_KEY", "sk-operator-" + "q" * 30)
    monkeypatch.delenv("LLAMA_API_KEY", raising=False)
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["variable", "value", "default", "description"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert list(rows) == [spec.env for spec in SETTINGS]
    assert rows["GATEWAY_WORKERS"].split()[1:3] == ["4", "1"]
    for spec in SETTINGS:
        assert rows[spec.env].endswith(spec.description)
    assert "q" * 10 not in "\n".join(out) and rows["LLAMAGATE_API_KEY"].split()[1:3] == ["sk-ope…", "(not"]
    assert rows["LLAMA_API_KEY"].split()[1] == "(not"


def test_llamagate_settings_shows_bad_values_and_says_why(monkeypatch, capsys):
    from gateway import cli

    monkeypatch.setenv("GATEWAY_WORKERS", "x")
    monkeypatch.setenv("LLAMAGATE_LOG_LEVEL", "loud")
    assert cli.main(["settings"]) == 1
    captured = capsys.readouterr()
    assert "GATEWAY_WORKERS" in captured.out and "'x' (bad)" in captured.out
    assert captured.err == ("llamagate: GATEWAY_WORKERS: 'x' is not an integer\n"
                            f"llamagate: LLAMAGATE_LOG_LEVEL: 'loud' is not one of {LEVELS}\n")


def test_every_other_command_refuses_bad_settings(monkeypatch, capsys):
    from gateway import cli

    monkeypatch.setenv("GATEWAY_WORKERS", "x")
    monkeypatch.setenv("GATEWAY_CLIENT_TIMEOUT", "http")
    assert cli.main(["check", str(ROOT / "pipelines.yaml")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("llamagate: GATEWAY_WORKERS: 'x' is not an integer\n"
                            "llamagate: GATEWAY_CLIENT_TIMEOUT: 'http' is not a number\n")


def test_command_defaults_come_from_the_settings(monkeypatch):
    from gateway import cli

    seen = {}
    monkeypatch.setenv("GATEWAY_CONFIG", "/tmp/elsewhere.yaml")
    monkeypatch.setenv("GATEWAY_BIND", "127.0.0.1:9123")
    monkeypatch.setenv("LLAMAGATE_KEYS_FILE", "/tmp/k.yaml")
    commands = cli.registry.COMMANDS  # each declaration kept, its function replaced
    for name, run in (("check", lambda args: seen.setdefault("check", args.file) and 0),
                      ("status", lambda args: seen.setdefault("status", args.url) and 0),
                      ("keys", lambda args: seen.setdefault("keys", args.file) and 0),
                      ("up", lambda args: seen.setdefault("up", args.config) and 0)):
        monkeypatch.setitem(commands, name, dataclasses.replace(commands[name], run=run))
    for argv in (["check"], ["status"], ["keys", "list"], ["up"]):
        assert cli.main(argv) == 0
    assert seen == {"check": "/tmp/elsewhere.yaml", "status": "http://127.0.0.1:9123", "keys": "/tmp/k.yaml",
                    "up": "/tmp/elsewhere.yaml"}


def test_backend_binary_from_the_settings(monkeypatch):
    from gateway.fleet import llamaserver as backend

    monkeypatch.setenv("LLAMA_SERVER_BIN", "/opt/llama-server")
    assert backend.find_binary(backend.BackendOptions(model="m.gguf")) == "/opt/llama-server"


def test_python_m_gateway_settings_prints_them():
    result = subprocess.run([sys.executable, "-m", "gateway.settings"], capture_output=True, text=True, cwd=ROOT,
                            env={"GATEWAY_WORKERS": "6", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == [spec.env for spec in SETTINGS]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("GATEWAY_WORKERS ")] == ["6"]


# --- the documentation -----------------------------------------------------------------------------

def test_the_environment_doc_matches_the_declarations():
    # regenerate with: python -m gateway.settings --markdown > docs/configuration-environment.md
    assert DOC.read_text() == settings.markdown()
    table = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == [spec.env for spec in SETTINGS]
