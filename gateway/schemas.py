"""JSON Schema helpers, public for plugins: compile a schema once (as a validator
that explains, and as a fast yes/no for the request path), report every violation
with its path, fill in defaults. ``SCHEMA_DIR`` holds the gateway's own
schemas, OpenAI's request bodies among them (``chat.completions.schema.json``...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import fastjsonschema
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


# Keywords draft 7 lacks: a schema that uses one is checked by jsonschema alone.
_AFTER_DRAFT7 = frozenset({"prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired",
                           "dependentSchemas", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "minContains",
                           "maxContains", "$anchor"})


def compile_check(schema: Mapping[str, Any]) -> Callable[[Any], bool]:
    """A fast yes/no for ``schema``, for the request path: the schema compiled to
    Python code (fastjsonschema, ~20x faster than walking it) when it keeps to draft 7's
    keywords, else :func:`compile_schema`'s ``is_valid``. It never fills in defaults
    or checks ``format``, like jsonschema. Ask it first; on a no, ask
    :func:`compile_schema`'s validator why (it is the judge: where the two disagree,
    its verdict stands).
    """
    validator = compile_schema(schema)
    if _keywords(schema) & _AFTER_DRAFT7:
        return validator.is_valid
    draft7 = dict(schema, **{"$schema": "http://json-schema.org/draft-07/schema#"})
    fast = fastjsonschema.compile(draft7, use_default=False, use_formats=False)

    def check(instance: Any) -> bool:
        try:
            fast(instance)
        except fastjsonschema.JsonSchemaException:
            return validator.is_valid(instance)
        return True

    return check


def _keywords(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keywords(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_keywords(value) for value in node))
    return set()


def apply_defaults(schema: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each missing top-level property set to its schema default."""
    filled = dict(config)
    for name, prop in schema.get("properties", {}).items():
        if name not in filled and "default" in prop:
            filled[name] = json.loads(json.dumps(prop["default"]))
    return filled
