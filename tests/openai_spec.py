"""Validators for OpenAI's own schemas, from the trimmed copy of its OpenAPI spec in
tests/openai/ (its README says from where): the integration tests' ``openai_schema``
fixture, and unit tests of answer shapes the test model cannot produce."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

OPENAI_SCHEMAS = Path(__file__).resolve().parent / "openai" / "schemas.json"


@functools.cache
def _components() -> dict[str, Any]:
    components = json.loads(OPENAI_SCHEMAS.read_text())["components"]
    allow_nullable(components)
    return components


def openai_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for the spec's component schema ``name``."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": _components()})


def allow_nullable(node: Any) -> None:
    """The spec still marks some fields with OpenAPI 3.0's ``nullable: true``; JSON Schema
    needs ``null`` in the type (and the enum) instead."""
    if isinstance(node, dict):
        if node.get("nullable") is True:
            if isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if isinstance(node.get("enum"), list) and None not in node["enum"]:
                node["enum"].append(None)
        for value in node.values():
            allow_nullable(value)
    elif isinstance(node, list):
        for value in node:
            allow_nullable(value)


def stream_event_validators() -> dict[str, jsonschema.Draft202012Validator]:
    """A validator for each Responses stream event's own schema, by its ``type``
    (ResponseStreamEvent is their anyOf)."""
    components = _components()["schemas"]
    by_type = {}
    for ref in components["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        by_type[components[name]["properties"]["type"]["enum"][0]] = openai_validator(name)
    return by_type


def assert_valid(validator: jsonschema.Draft202012Validator, instance: Any) -> None:
    """Every error at once, readable, rather than the first only."""
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:300]}" for e in errors[:5]]
