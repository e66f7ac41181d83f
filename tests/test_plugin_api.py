"""The plugin contract is one module: plugins (built-in and examples, their tests
included) import ``gateway.plugin`` and, in tests, ``gateway.testing``, and only the
names of their ``__all__``; every one of those names is documented in docs/plugins.md."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import gateway

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(path for folder in ("plugins", "examples") for path in (ROOT / folder).rglob("*.py"))
GUIDE = (ROOT / "docs" / "plugins.md").read_text()


def gateway_uses(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` for each use of the gateway package in ``tree``: each
    name imported from a ``gateway`` module (name None for ``import gateway.x``), and
    each attribute read off a ``gateway`` or ``gateway.<module>`` name."""
    uses: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "gateway" or node.module.startswith("gateway.")):
            uses.extend((node.lineno, node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            uses.extend((node.lineno, alias.name, None) for alias in node.names
                        if alias.name == "gateway" or alias.name.startswith("gateway."))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "gateway":
            uses.append((node.lineno, f"gateway.{node.attr}", None))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Name) and node.value.value.id == "gateway":
            uses.append((node.lineno, f"gateway.{node.value.attr}", node.attr))
    return uses


def problems(source: str) -> list[str]:
    """What in ``source`` reaches past the public modules or their ``__all__``."""
    found = []
    for line, module, name in gateway_uses(ast.parse(source)):
        if module not in gateway.PUBLIC_MODULES:
            found.append(f"line {line}: {module}" + (f".{name}" if name else "") + " is not gateway.plugin or gateway.testing")
        elif name is not None and name not in importlib.import_module(module).__all__:
            found.append(f"line {line}: {module}.{name} is not in {module}.__all__")
    return found


def test_every_plugin_and_example_file_is_checked():
    names = {str(path.relative_to(ROOT)) for path in SOURCES}
    assert {"plugins/router/affinity.py", "examples/prompt-guard/tests/test_prompt_guard.py",
            "examples/usage-meter/tests/test_usage_meter.py"} <= names
    assert len(SOURCES) >= 17


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_plugins_and_examples_use_only_the_facade(path):
    assert problems(path.read_text()) == []


@pytest.mark.parametrize("source, problem", [
    ("from gateway.pipeline import Pipeline", "gateway.pipeline.Pipeline is not"),
    ("from gateway import hookimpl", "gateway.hookimpl is not"),
    ("from gateway.storage import ledger", "gateway.storage.ledger is not"),
    ("import gateway.answers", "gateway.answers is not"),
    ("import gateway\nx = gateway.settings.current()", "gateway.settings is not"),
    ("from gateway.plugin import make_store, _private", "gateway.plugin._private is not in gateway.plugin.__all__"),
    ("import gateway.plugin\ngateway.plugin.pg.connect", "gateway.plugin.pg is not in"),
])
def test_the_check_catches_every_way_around_the_facade(source, problem):
    found = problems(source)
    assert any(problem in line for line in found), found


def test_the_public_modules_are_the_facade_and_the_test_kit():
    assert gateway.PUBLIC_MODULES == ("gateway.plugin", "gateway.testing")


@pytest.mark.parametrize("module", gateway.PUBLIC_MODULES)
def test_every_public_name_exists_and_is_documented(module):
    public = importlib.import_module(module)
    for name in public.__all__:
        assert hasattr(public, name), f"{module}.{name} is listed but missing"
        assert re.search(rf"^- `{re.escape(name)}[`(]", GUIDE, re.M), \
            f"docs/plugins.md has no line '- `{name}...' for {module}.{name}"


def test_gateway_keeps_its_old_names_for_plugins_written_against_it():
    import gateway.plugin

    for name in gateway.__all__:
        assert getattr(gateway, name) is getattr(gateway.plugin, name)


def test_the_plugin_protocol_is_read_in_one_place():
    """The core reads a plugin's optional members (the Plugin protocol) only through
    hookspecs.plugin_attribute, never with getattr/hasattr of its own."""
    members = {"config_schema", "watch_files", "wants_events"}
    readers = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path.name == "hookspecs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and node.args[1].value in members:
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == []
    from gateway.hookspecs import PLUGIN_ATTRIBUTES

    assert set(PLUGIN_ATTRIBUTES) == members


def test_a_plugin_that_inherits_the_protocol_gets_its_defaults():
    from gateway.hookspecs import plugin_attribute
    from gateway.plugin import Plugin, hookimpl
    from gateway.testing import Harness

    class Explicit(Plugin):
        @hookimpl
        def response_event(self, ctx, event):
            return None

    class Bare:
        pass

    assert plugin_attribute(Bare(), "watch_files") is None and plugin_attribute(Explicit(), "watch_files") == ()
    assert plugin_attribute(Explicit, "config_schema") is None  # then schema.json, or no config
    with Harness([Explicit()]) as harness:
        assert harness.wants_events()  # the protocol's default: every event
    with pytest.raises(AttributeError):
        plugin_attribute(Bare(), "wants_everything")


def test_every_member_of_the_plugin_protocol_is_documented():
    from gateway.hookspecs import PLUGIN_ATTRIBUTES

    section = GUIDE.split("## The plugin protocol", 1)[1].split("\n## ", 1)[0]
    for name in PLUGIN_ATTRIBUTES:
        assert re.search(rf"^- `{name}[`(]", section, re.M), f"the plugin protocol section does not document {name}"


def test_the_context_plugins_get_holds_only_public_types_and_call_backend_works():
    """What the core keeps of a request for itself (the replica object, its pools and
    breaker) is not on the context; ``ctx.call_backend`` still reaches the chosen replica."""
    import gateway.plugin
    from gateway.plugin import hookimpl
    from gateway.testing import Harness

    public = tuple(value for value in vars(gateway.plugin).values()
                   if isinstance(value, type) and not getattr(value, "_is_protocol", False))

    class Peek:
        @hookimpl
        def upstream_request(self, ctx, payload):
            self.routed = ctx.replica_view
            self.tokens = ctx.call_backend("POST", "/tokenize", json={"content": "one two three"}).json()

        @hookimpl
        def complete(self, ctx, outcome):
            self.core = {name: type(value).__qualname__ for name, value in vars(ctx).items()
                         if type(value).__module__.startswith("gateway") and not isinstance(value, public)}

    peek = Peek()
    with Harness([peek]) as harness:
        assert harness.chat("hi").status == 200
        assert ("POST", "/tokenize", {"content": "one two three"}) in harness.backend.requests
    assert len(peek.tokens["tokens"]) == 3
    assert isinstance(peek.routed, gateway.plugin.ReplicaView) and peek.routed.url == harness.backend.url
    assert peek.core == {}
