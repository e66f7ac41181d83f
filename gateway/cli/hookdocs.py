"""Docs tooling: the hooks section of docs/plugins.md, generated from the hook
specifications' docstrings in :mod:`gateway.hookspecs` (``python -m gateway.cli.hookdocs``
prints it; a test keeps docs/plugins.md equal to it). Not part of the plugin contract.
"""

from __future__ import annotations

import inspect
import re
import sys

from ..hookspecs import HOOK_NAMES, GatewaySpec


def markdown() -> str:
    """The hooks section of ``docs/plugins.md``, generated from the hookspecs' docstrings."""
    out = []
    for name in HOOK_NAMES:
        function = getattr(GatewaySpec, name)
        arguments = [a for a in inspect.signature(function).parameters if a != "self"]
        sections = _sections(inspect.getdoc(function) or "")
        out.append(f"### `{name}({', '.join(arguments)})`\n")
        out.append(_rst_to_md(sections.pop("", "")) + "\n")
        args = sections.pop("Args", "")
        if args:
            out.append("\n".join(f"- `{arg}`: {_rst_to_md(text)}" for arg, text in _items(args)) + "\n")
        for title in ("Returns", "Raises"):
            if title in sections:
                out.append(f"{title}: {_rst_to_md(sections.pop(title))}\n")
        example = sections.pop("Example", "")
        if example:
            out.append("```python\n" + example.strip("\n") + "\n```\n")
    return "\n".join(out)


def _sections(doc: str) -> dict[str, str]:
    """A Google-style docstring split into its sections ("" for the summary)."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in doc.splitlines():
        header = re.fullmatch(r"(Args|Returns|Raises|Example)::?", line.strip())
        if header and not line.startswith(" "):
            current = header.group(1)
            sections[current] = []
            continue
        sections[current].append(line)
    return {name: inspect.cleandoc("\n".join(lines)) if name != "Example" else _dedent(lines)
            for name, lines in sections.items()}


def _dedent(lines: list[str]) -> str:
    code = [line for line in lines if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in code), default=0)
    return "\n".join(line[indent:] for line in lines).strip("\n")


def _items(text: str) -> list[tuple[str, str]]:
    """``name: text`` items of an Args section, continuation lines joined."""
    items: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = re.match(r"(\w+): (.*)", line)
        if match and not line.startswith(" "):
            items.append((match.group(1), match.group(2)))
        elif items:
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return items


def _rst_to_md(text: str) -> str:
    """Docstring markup to markdown: ``code`` and :class:`x` become `code`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(line.strip() for line in text.splitlines()) if "\n\n" not in text else \
        "\n\n".join(" ".join(line.strip() for line in para.splitlines()) for para in text.split("\n\n"))


if __name__ == "__main__":
    sys.stdout.write(markdown())
