"""The registry of ``llamagate``'s commands, and ``main``, which builds the parser from it.

A command is declared once, on its function::

    @command("routes", "which model goes to which backend replicas",
             arg("file", nargs="?", default=FromSettings(lambda env: env.config)))
    def cmd_routes(args: argparse.Namespace) -> int: ...

``llamagate --help`` lists the commands in the order they were declared.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .. import settings

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class FromSettings:
    """An argument's default read from the settings when the parser is built: the
    environment is read once, by ``main``, and may be bad (see ``Command.checks_settings``)."""

    read: Callable[[settings.Settings], Any]


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags (or name) and options."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Action:
    """A sub-command (``keys add``); its command's function reads ``args.action``."""

    name: str
    help: str
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Run
    args: tuple[Arg, ...] = ()
    actions: tuple[Action, ...] = ()
    # False only for `settings`, which shows bad values instead of refusing them
    checks_settings: bool = True


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *args: Arg, actions: tuple[Action, ...] = (),
            checks_settings: bool = True) -> Callable[[Run], Run]:
    """Registers the decorated function as ``llamagate NAME``."""
    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"llamagate {name} is declared twice")
        COMMANDS[name] = Command(name, help, run, args, actions, checks_settings)
        return run
    return register


def add_arguments(parser: argparse.ArgumentParser, args: tuple[Arg, ...], env: settings.Settings) -> None:
    for declared in args:
        options = {key: value.read(env) if isinstance(value, FromSettings) else value
                   for key, value in declared.options.items()}
        parser.add_argument(*declared.flags, **options)


def build_parser(env: settings.Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamagate", description="An OpenAI-compatible gateway for llama-server.")
    commands = parser.add_subparsers(dest="command", required=True)
    for declared in COMMANDS.values():
        sub = commands.add_parser(declared.name, help=declared.help)
        add_arguments(sub, declared.args, env)
        if declared.actions:
            actions = sub.add_subparsers(dest="action", required=True)
            for action in declared.actions:
                add_arguments(actions.add_parser(action.name, help=action.help), action.args, env)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``llamagate``: every command but ``settings`` first checks the settings
    (``gateway/settings.py``) and refuses bad values with one line each."""
    try:
        env, problems = settings.current(), []
    except settings.SettingsError as exc:  # refused below, unless the command does not check them
        env, problems = settings.Settings(), exc.problems
    args = build_parser(env).parse_args(argv)
    declared = COMMANDS[args.command]
    if problems and declared.checks_settings:
        for line in problems:
            print(f"llamagate: {line}", file=sys.stderr)
        return 1
    try:
        return declared.run(args)
    except BrokenPipeError:
        # `llamagate status | head`: the reader left; no traceback. Python flushes stdout
        # again at exit, so point it at /dev/null first (as the signal module's docs advise).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
