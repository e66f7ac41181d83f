"""The hook contract: each hook documented in docs/plugins.md with its exact arguments,
and each with a test of its own below (test_hook_<name>), written with gateway.testing."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

from gateway import InvalidRequestError, Response, hookimpl, hookspecs
from gateway.testing import Harness

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, _ in inspect.getmembers(hookspecs.GatewaySpec, inspect.isfunction)]


def arguments(name: str) -> list[str]:
    return [a for a in inspect.signature(getattr(hookspecs.GatewaySpec, name)).parameters if a != "self"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_exact_arguments(hook):
    guide = (ROOT / "docs" / "plugins.md").read_text()
    heading = f"### `{hook}({', '.join(arguments(hook))})`"
    assert heading in guide, f"docs/plugins.md has no section {heading}"
    section = guide.split(heading, 1)[1].split("\n### ", 1)[0]
    for argument in arguments(hook):
        assert f"- `{argument}`:" in section, f"{hook}: argument {argument} is not described"
    assert "```python" in section, f"{hook}: no example"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    assert callable(getattr(sys.modules[__name__], f"test_hook_{hook}", None)), f"no test_hook_{hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_typed_and_documented_in_the_spec(hook):
    spec = getattr(hookspecs.GatewaySpec, hook)
    for argument in arguments(hook):
        assert argument in spec.__annotations__, f"{hook}.{argument} has no type"
        assert re.search(rf"^\s+{argument}:", spec.__doc__, re.M), f"{hook}.{argument} is not in its docstring"


def test_hook_request_start():
    class Gate:
        def __init__(self):
            self.bodies = []

        @hookimpl
        def request_start(self, ctx):
            self.bodies.append(ctx.body)
            if ctx.headers.get("X-TENANT") != "acme":
                raise InvalidRequestError("unknown tenant")

    gate = Gate()
    with Harness([gate]) as harness:
        assert harness.chat("hi").status == 400  # no tenant header
        assert harness.chat("hi", headers={"X-Tenant": "acme"}).status == 200
    assert gate.bodies == [None, None]  # it ran before the body was read
    assert len(harness.backend.requests) == 1


def test_hook_shutdown(tmp_path):
    class Buffer:
        def __init__(self):
            self.pending, self.flushed = [], []

        @hookimpl
        def complete(self, ctx, outcome):
            self.pending.append(ctx.request_id)

        @hookimpl
        def shutdown(self):
            self.flushed, self.pending = self.flushed + self.pending, []

    buffer = Buffer()
    with Harness([buffer]) as harness:
        harness.chat("hi")
        assert buffer.flushed == [] and len(buffer.pending) == 1
        harness.gateway.shutdown()
    assert len(buffer.flushed) == 1 and buffer.pending == []


def test_hook_request():
    class Gate:
        @hookimpl
        def request(self, ctx):
            if ctx.body["messages"][0]["content"] == "answer":
                return Response(body={"answered": "by the plugin"})
            if ctx.body["messages"][0]["content"] == "reject":
                raise InvalidRequestError("no", param="messages")

    with Harness([Gate()]) as harness:
        assert harness.chat("answer").json == {"answered": "by the plugin"}
        assert harness.backend.requests == []  # the backend never saw it
        rejected = harness.chat("reject")
        assert rejected.status == 400 and rejected.outcome == "error"
        assert harness.chat("pass").status == 200 and len(harness.backend.requests) == 1


def test_hook_route():
    class Pick:
        @hookimpl
        def route(self, ctx, backends):
            self.seen = sorted(backends)
            return backends[ctx.backend].replicas[-1]

    pick = Pick()
    with Harness([pick]) as harness:
        result = harness.chat("hi")
        assert result.status == 200 and pick.seen == ["test"]
        assert result.ctx.replica == harness.backend.url


def test_hook_upstream_request():
    class Edit:
        @hookimpl
        def upstream_request(self, ctx, payload):
            payload["cache_prompt"] = True
            payload["messages"].insert(0, {"role": "system", "content": "Be brief."})

    with Harness([Edit()]) as harness:
        harness.chat("hi")
        _, _, sent = harness.backend.requests[-1]
        assert sent["cache_prompt"] is True and sent["messages"][0]["role"] == "system"


def test_hook_response():
    class Strip:
        @hookimpl
        def response(self, ctx, body):
            self.usage = ctx.usage
            body["choices"][0]["message"]["content"] = "edited"

    strip = Strip()
    with Harness([strip]) as harness:
        result = harness.chat("hi")
        assert result.text == "edited" and strip.usage["total_tokens"] == 10


def test_hook_response_event():
    class Redact:
        @hookimpl
        def response_event(self, ctx, event):
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content") == " canned":
                    return False
                if choice.get("delta", {}).get("content"):
                    choice["delta"]["content"] = choice["delta"]["content"].upper()

    with Harness([Redact()]) as harness:
        result = harness.chat("hi", stream=True)
        assert result.done and result.text == "HELLO FROM THE BACKEND"


def test_hook_complete():
    class Meter:
        def __init__(self):
            self.seen = []

        @hookimpl
        def complete(self, ctx, outcome):
            self.seen.append((outcome, ctx.status, (ctx.usage or {}).get("total_tokens")))

    meter = Meter()
    with Harness([meter]) as harness:
        harness.chat("hi", stream=True)
        harness.backend.script({"status": 500, "json": {"error": {"code": 500, "message": "boom"}}})
        harness.chat("hi")
    assert meter.seen == [("ok", 200, 10), ("error", 500, None)]
