"""JSON Schema helpers, public for plugins: compile a schema once, report every
violation with its path, fill in defaults. ``SCHEMA_DIR`` holds the gateway's own
schemas, OpenAI's request bodies among them (``chat.completions.schema.json``...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def format_path(parts: Iterable[Any]) -> str:
    """``["pipelines", "default", 2, "x"]`` -> ``pipelines.default[2].x``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def schema_errors(validator: jsonschema.protocols.Validator, instance: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every schema violation as ``(path, reason)``, the path under ``prefix``."""
    problems = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        path = format_path(error.absolute_path)
        if prefix:
            path = f"{prefix}.{path}" if path and not path.startswith("[") else prefix + path
        problems.append((path, error.message))
    return problems


def compile_schema(schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for ``schema`` (its ``$schema`` dialect, else 2020-12), checked first."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def apply_defaults(schema: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each missing top-level property set to its schema default."""
    filled = dict(config)
    for name, prop in schema.get("properties", {}).items():
        if name not in filled and "default" in prop:
            filled[name] = json.loads(json.dumps(prop["default"]))
    return filled
