"""Copy from OpenAI's OpenAPI spec only the response schemas the tests validate against.

Run by hand when the spec is updated (the tests never run it, nor read the full spec):

    python tests/openai/trim_spec.py path/to/openapi.yaml [path/to/SOURCE.txt]

It writes tests/openai/schemas.json: the schemas below and every schema they
``$ref``, transitively, unchanged (the tests turn OpenAPI 3.0's ``nullable`` into
JSON Schema's null type when they load them), with the contents of SOURCE.txt
(default: beside the spec; where the spec came from, as one line) under
``source``. Then update the commit in tests/openai/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "schemas.json"
WANTED = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
          "CreateEmbeddingResponse", "ListModelsResponse", "ErrorResponse", "Response", "ResponseStreamEvent")
PREFIX = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    """The component schema names a node refers to."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith(PREFIX):
                raise SystemExit(f"unexpected $ref {ref}")
            found.add(ref[len(PREFIX):])
        for value in node.values():
            found |= refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= refs(value)
    return found


def trim(schemas: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = schemas[name]
        todo.extend(refs(schemas[name]) - kept.keys())
    return dict(sorted(kept.items()))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    spec_path = Path(argv[0])
    source_path = Path(argv[1]) if len(argv) > 1 else spec_path.with_name("SOURCE.txt")
    spec = yaml.load(spec_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    source = source_path.read_text().strip() if source_path.is_file() else "unknown"
    doc = {
        "source": source,
        "license": spec.get("info", {}).get("license"),
        "note": "Trimmed by tests/openai/trim_spec.py from OpenAI's OpenAPI spec: only the schemas "
                "the tests use and what they $ref. See tests/openai/README.md and LICENSE.",
        "components": {"schemas": trim(spec["components"]["schemas"], WANTED)},
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(doc['components']['schemas'])} schemas from {spec_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
