"""pipelines.yaml: loading, environment expansion, errors with file, path and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, load_config, parse_config
from gateway.pipeline import build_pipelines, discover

from .conftest import config_doc

ROOT = Path(__file__).resolve().parent.parent

DROPIN = '''
from gateway import hookimpl

class Plugin:
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "requests_per_minute": {"type": "integer", "minimum": 1, "default": 60,
                                    "description": "allowed requests a minute"},
        },
    }

    def __init__(self, config):
        self.config = config

    @hookimpl
    def request(self, ctx):
        return None
'''


def write(tmp_path: Path, doc: dict, name: str = "pipelines.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problems(exc: ConfigError) -> dict[str, str]:
    return dict(exc.problems)


def test_the_shipped_pipelines_yaml_is_valid():
    config = load_config(ROOT / "pipelines.yaml", environ={})
    build_pipelines(config)
    assert config.backends["chat"].urls == ("http://127.0.0.1:8081",)
    assert set(config.routes) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                  "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize",
                                  "/detokenize", "/apply-template"}


def test_env_expansion_with_defaults_and_types():
    doc = config_doc("${URL}", max_body_bytes="${MAX:-1024}", health_interval="${EVERY}")
    config = parse_config(doc, environ={"URL": "http://10.0.0.1:9000/", "EVERY": "2.5"})
    assert config.backends["chat"].urls == ("http://10.0.0.1:9000",)
    assert config.max_body_bytes == 1024  # a lone reference keeps its YAML type
    assert config.health_interval == 2.5


def test_unset_variable_without_default_names_path_and_variable():
    with pytest.raises(ConfigError) as err:
        parse_config(config_doc("${NOPE_NOT_SET}"), environ={})
    assert problems(err.value)["backends.chat.urls[0]"] == \
        "environment variable NOPE_NOT_SET is not set and has no default"


def test_schema_errors_name_every_path_at_once():
    doc = config_doc("ftp://x", max_body_bytes=0)
    doc["timeouts"] = {"idle": "soon"}
    doc["routes"]["v1/images"] = "default"  # not a path
    with pytest.raises(ConfigError) as err:
        parse_config(doc, file="pipelines.yaml")
    found = problems(err.value)
    assert "max_body_bytes" in found
    assert "backends.chat.urls[0]" in found
    assert "is not of type 'number'" in found["timeouts.idle"]
    assert "routes" in found
    assert str(err.value).startswith("pipelines.yaml: ")


def test_references_must_resolve():
    doc = config_doc("http://127.0.0.1:1", routes={"/v1/models": "missing"})
    doc["models"]["other"] = {"backend": "gpu", "aliases": ["gpt-4o-mini"]}
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    found = problems(err.value)
    assert "no pipeline named 'missing'" in found["routes./v1/models"]
    assert "no backend named 'gpu'" in found["models.other.backend"]
    assert "already names model 'smollm2'" in found["models.other.aliases[0]"]


def test_dropin_plugin_config_is_checked_with_its_schema(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "limiter.py").write_text(DROPIN)
    doc = config_doc("http://127.0.0.1:1", plugin_dirs=["plugins"],
                     pipelines={"default": ["limiter", {"limiter": {"requests_per_minute": -1}}, {"nope": None}]})
    config = load_config(write(tmp_path, doc))
    assert discover(config.plugin_dirs)["limiter"].source.endswith("limiter.py")
    with pytest.raises(ConfigError) as err:
        build_pipelines(config)
    found = problems(err.value)
    assert found["pipelines.default[1].limiter.requests_per_minute"] == "-1 is less than the minimum of 1"
    assert "unknown plugin 'nope'" in found["pipelines.default[2].nope"]


def test_plugin_gets_its_schema_defaults(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "limiter.py").write_text(DROPIN)
    doc = config_doc("http://127.0.0.1:1", plugin_dirs=["plugins"], pipelines={"default": ["limiter"]})
    pipeline = build_pipelines(load_config(write(tmp_path, doc)))["default"]
    assert pipeline.plugins[0][1].config == {"requests_per_minute": 60}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_check_cli_prints_chains_and_exits_0():
    result = run_cli("check", "pipelines.yaml")
    assert result.returncode == 0, result.stderr
    assert "/v1/chat/completions  [default]" in result.stdout
    assert "model smollm2" in result.stdout


def test_check_cli_names_path_and_reason_and_exits_1(tmp_path):
    doc = config_doc("http://127.0.0.1:1")
    doc["backends"]["chat"]["max_connections"] = 0
    path = write(tmp_path, doc, "broken.yaml")
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert f"{path}: backends.chat.max_connections: 0 is less than the minimum of 1" in result.stderr


def test_check_cli_reports_yaml_syntax_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backends: [\n")
    result = run_cli("check", str(path))
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    result = run_cli("check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "cannot read the file" in result.stderr


class EntryPointPlugin:
    config_schema = {"type": "object", "properties": {"level": {"type": "integer", "default": 3}}}

    def __init__(self, config):
        self.config = config


def test_entry_point_plugins_are_found_and_configured(monkeypatch):
    from importlib.metadata import EntryPoint

    import gateway.pipeline as pipeline_module

    ep = EntryPoint(name="thirdparty", value=f"{__name__}:EntryPointPlugin", group="llamagate.plugins")
    monkeypatch.setattr(pipeline_module, "entry_points",
                        lambda group: [ep] if group == "llamagate.plugins" else [])
    found = discover()
    assert found["thirdparty"].factory is EntryPointPlugin
    assert found["thirdparty"].source.startswith("entry point")
    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{"thirdparty": {"level": 5}}]})
    plugin = build_pipelines(parse_config(doc))["default"].plugins[0][1]
    assert plugin.config == {"level": 5}


def test_routes_cli_shows_models_backends_and_replicas():
    result = run_cli("routes", "pipelines.yaml")
    assert result.returncode == 0
    assert "smollm2, SmolLM2-135M-Instruct chat           http://127.0.0.1:8081" in result.stdout


def test_plugins_cli_lists_builtins_entry_points_and_dropins(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "limiter.py").write_text(DROPIN)
    doc = config_doc("http://127.0.0.1:1", plugin_dirs=["plugins"], pipelines={"default": ["limiter"]})
    result = run_cli("plugins", "--config", str(write(tmp_path, doc)))
    assert result.returncode == 0, result.stderr
    assert "auth  (builtin)  hooks: request" in result.stdout
    assert f"limiter  ({tmp_path / 'plugins' / 'limiter.py'})  hooks: request" in result.stdout
    assert "    requests_per_minute: allowed requests a minute [default 60]" in result.stdout
