"""gateway.answers is a package of small modules, one job each, behind one public face:
the names docs/plugins.md documents under "Answers" (which plugins import from
``gateway.plugin``) are ``gateway.answers``' own, as documented."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import gateway.answers

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway" / "answers"
# The bound for a module of the core, with room under it: a module that grows past
# it has taken on a second job.
MAX_LINES = 400


def _documented() -> list[str]:
    """The names (with their call forms) that docs/plugins.md's "Answers" list names."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("\nAnswers: "):]
    section = section[:section.index("\n\n", section.index("\n- "))]
    forms = []
    for line in section.splitlines():
        if line.startswith("- `"):
            forms += re.findall(r"`(\w+(?:\([^)]*\))?)`", line[:line.index("`:") + 1])
    return forms


def _call_form(name: str, obj: object) -> str:
    parameters = inspect.signature(obj).parameters.values()
    return f"{name}({', '.join(p.name if p.default is p.empty else f'{p.name}={p.default!r}' for p in parameters)})"


def test_every_documented_answers_name_is_exported_as_documented():
    forms = _documented()
    assert len(forms) >= 12, forms
    exported = set(gateway.answers.__all__)
    for form in forms:
        name = form.split("(")[0]
        assert name in exported, f"docs/plugins.md documents gateway.answers.{name}, not in its __all__"
        if "(" in form:
            assert _call_form(name, getattr(gateway.answers, name)) == form
    for name in exported:
        assert getattr(gateway.answers, name) is not None


def test_the_answers_modules_are_small_and_import_one_way():
    modules = {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}
    assert {"shapes", "assembly", "usage", "budgets"} <= modules.keys()
    imports = {}
    for name, path in modules.items():
        source = path.read_text()
        assert source.count("\n") <= MAX_LINES, f"gateway/answers/{path.name} has over {MAX_LINES} lines"
        imports[name] = {node.module for node in ast.walk(ast.parse(source))
                         if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        if name not in done:
            for imported in imports.get(name, ()):
                visit(imported, path + (name,))
            done.add(name)

    for name in modules:
        visit(name, ())
