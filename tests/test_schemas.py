"""gateway.schemas: the fast yes/no agrees with jsonschema on the request schemas."""

from __future__ import annotations

import json

import pytest

from gateway.schemas import SCHEMA_DIR, compile_check, compile_schema

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "m", "prompt": "Hi"}
EMBEDDING = {"model": "m", "input": "Hi"}

# Each schema with bodies it should take and bodies it should refuse, field by field.
BODIES = {
    "chat.completions.schema.json": [
        CHAT, dict(CHAT, max_tokens=8, temperature=0.5, stream=True, stop=["a"], n=1, seed=3),
        dict(CHAT, messages=[{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}]),
        dict(CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        dict(CHAT, unknown_field={"passes": "through"}),
        {"messages": CHAT["messages"]}, {"model": "m"}, dict(CHAT, messages=[]), dict(CHAT, messages="Hi"),
        dict(CHAT, messages=[{"role": "robot", "content": "x"}]), dict(CHAT, messages=[{"content": "x"}]),
        dict(CHAT, messages=[{"role": "user", "content": 5}]), dict(CHAT, max_tokens="8"), dict(CHAT, max_tokens=-1),
        dict(CHAT, temperature=9), dict(CHAT, temperature="hot"), dict(CHAT, stream="yes"), dict(CHAT, n=0),
        dict(CHAT, stop=5), dict(CHAT, stop=["a"] * 50), dict(CHAT, model=""), dict(CHAT, model=5),
        dict(CHAT, tools=[{"type": "function"}]), dict(CHAT, tools="x"), dict(CHAT, logprobs="yes"),
        dict(CHAT, messages=[{"role": "user", "content": [{"type": "text"}]}]), dict(CHAT, seed=1.5),
        dict(CHAT, max_tokens=1.0), dict(CHAT, max_tokens=True), [], "body", None,
    ],
    "completions.schema.json": [
        COMPLETION, dict(COMPLETION, prompt=["a", "b"]), dict(COMPLETION, prompt=[1, 2, 3]), dict(COMPLETION, echo=True),
        {"prompt": "Hi"}, dict(COMPLETION, prompt=5), dict(COMPLETION, prompt=[]), dict(COMPLETION, n="2"),
        dict(COMPLETION, logprobs=99), dict(COMPLETION, suffix=3), dict(COMPLETION, prompt=[["a"]]),
    ],
    "embeddings.schema.json": [
        EMBEDDING, dict(EMBEDDING, input=["a", "b"]), dict(EMBEDDING, input=[1, 2]), dict(EMBEDDING, dimensions=8),
        {"input": "x"}, dict(EMBEDDING, input=""), dict(EMBEDDING, input=[]), dict(EMBEDDING, input=5),
        dict(EMBEDDING, encoding_format="jpeg"), dict(EMBEDDING, dimensions=0),
    ],
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_the_fast_check_agrees_with_jsonschema(name):
    schema = json.loads((SCHEMA_DIR / name).read_text())
    check, validator = compile_check(schema), compile_schema(schema)
    verdicts = [(json.dumps(body)[:80], check(body), validator.is_valid(body)) for body in BODIES[name]]
    assert [v for v in verdicts if v[1] != v[2]] == []
    assert any(fast for _, fast, _ in verdicts) and not all(fast for _, fast, _ in verdicts)


def test_the_fast_check_never_fills_in_defaults():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}}
    body: dict = {}
    assert compile_check(schema)(body) is True and body == {}


def test_a_schema_past_draft_7_is_checked_by_jsonschema():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "array",
              "prefixItems": [{"type": "integer"}]}
    check = compile_check(schema)
    assert check([1]) is True and check(["x"]) is False  # draft 7 would ignore prefixItems and say yes
