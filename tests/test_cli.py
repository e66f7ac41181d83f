"""``llamagate``'s command registry: each command declared once, on its function, and
``main`` driven by the declarations."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import cli, settings
from gateway.cli import registry
from gateway.cli.registry import Action, FromSettings, arg, command

ROOT = Path(__file__).resolve().parent.parent
# the console script pyproject.toml declares (llamagate = "gateway.cli:main"), as installed
LLAMAGATE = Path(sys.executable).parent / "llamagate"


def listed_commands(help_text: str) -> list[tuple[str, str]]:
    """The (name, help) lines of an argparse --help's sub-command list."""
    return re.findall(r"^ {4}(\S+) +(\S.*)$", help_text, flags=re.MULTILINE)


def test_llamagate_help_lists_every_declared_command_once_with_its_help():
    result = subprocess.run([str(LLAMAGATE), "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    listed = listed_commands(result.stdout)
    assert [name for name, _ in listed] == list(registry.COMMANDS)  # each once, in declaration order
    for name, help_line in listed:
        declared = registry.COMMANDS[name]
        assert declared.help.strip() and help_line == declared.help
    assert {"check", "serve", "backend", "up", "keys", "usage", "routes", "status", "models", "plugins",
            "settings"} <= set(registry.COMMANDS)


def test_every_sub_command_has_a_help_line(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # one line each
    for declared in registry.COMMANDS.values():
        for action in declared.actions:
            assert action.help.strip(), f"llamagate {declared.name} {action.name}"
        if declared.actions:
            with pytest.raises(SystemExit):
                cli.main([declared.name, "--help"])
            listed = dict(listed_commands(capsys.readouterr().out))
            assert listed == {action.name: action.help for action in declared.actions}


def test_a_command_is_one_declaration_that_main_builds_and_dispatches(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(registry, "COMMANDS", dict(registry.COMMANDS))
    monkeypatch.setenv("GATEWAY_BIND", "127.0.0.1:9345")
    monkeypatch.setenv("COLUMNS", "200")
    settings.reset()
    calls = []

    @command("echo-test", "say what was asked, for this test",
             arg("--url", default=FromSettings(lambda env: "http://" + env.bind)),
             actions=(Action("say", "say a word", (arg("word"),)),))
    def cmd_echo(args):
        calls.append((args.command, args.action, args.word, args.url))
        return 7

    assert cli.main(["echo-test", "say", "hi"]) == 7
    assert calls == [("echo-test", "say", "hi", "http://127.0.0.1:9345")]

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert ("echo-test", "say what was asked, for this test") in listed_commands(capsys.readouterr().out)

    monkeypatch.setenv("GATEWAY_WORKERS", "x")  # bad settings refuse it like every other command
    settings.reset()
    assert cli.main(["echo-test", "say", "hi"]) == 1
    assert capsys.readouterr().err == "llamagate: GATEWAY_WORKERS: 'x' is not an integer\n"
    assert len(calls) == 1


def test_a_command_name_is_declared_only_once(monkeypatch):
    monkeypatch.setattr(registry, "COMMANDS", dict(registry.COMMANDS))
    with pytest.raises(ValueError, match="llamagate routes is declared twice"):
        command("routes", "again")(lambda args: 0)


def test_the_command_line_modules_stay_small():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "gateway" / "cli").glob("*.py")}
    assert len(sizes) > 1 and max(sizes.values()) <= 200, sizes


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``llamagate settings | head -1``: the pipe closes before the output is written."""
    process = subprocess.Popen([str(LLAMAGATE), "settings"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    error = process.stderr.read()
    process.wait(timeout=30)
    assert b"Traceback" not in error and b"BrokenPipeError" not in error, error.decode()
    assert process.returncode == 1
