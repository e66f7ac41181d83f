"""The documentation cannot drift silently: every config field of every built-in plugin
is described in docs/builtin-plugins.md (in that plugin's own section), and every
relative link (or image) of README.md and docs/*.md points to a file that exists, and to a heading
that exists when it names one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DOC = ROOT / "docs" / "builtin-plugins.md"
SCHEMAS = sorted((ROOT / "plugins").glob("*/schema.json"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without its fenced code blocks (a link in code is not a link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, title in HEADING.findall(prose(path.read_text())):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def sections(text: str) -> dict[str, str]:
    """``## name`` -> the text up to the next ``## ``."""
    parts = re.split(r"^## +(.+?)\s*$", prose(text), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_checks_see_every_plugin_and_page():
    assert len(SCHEMAS) >= 8, SCHEMAS
    assert ROOT / "README.md" in PAGES and len(PAGES) > 1


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda path: path.parent.name)
def test_every_builtin_plugin_field_is_documented(schema):
    name = schema.parent.name
    doc = sections(BUILTIN_DOC.read_text())
    assert name in doc, f"docs/builtin-plugins.md has no section '## {name}'"
    fields = json.loads(schema.read_text()).get("properties", {})
    missing = [field for field in fields if f"`{field}`" not in doc[name]]
    assert not missing, f"docs/builtin-plugins.md, section {name}, does not describe: {', '.join(missing)}"


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                continue  # http:, https:, mailto:: not ours to check
            found.append((page, target))
    return found


@pytest.mark.parametrize("page, target", links(), ids=lambda value: getattr(value, "name", value))
def test_every_relative_link_resolves(page, target):
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / unquote(path_part)).resolve() if path_part else page
    where = f"{page.relative_to(ROOT)}: link {target}"
    assert dest.exists(), f"{where}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    assert dest.is_relative_to(ROOT), f"{where}: points outside the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
        assert unquote(anchor) in anchors(dest), f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}"


def test_the_link_checker_finds_links():
    text = "See [a](docs/a.md#x), [b [c]](b.md), ![img](i.png), <x> and\n```\n[no](code.md)\n```\n"
    assert LINK.findall(prose(text)) == ["docs/a.md#x", "b.md", "i.png"]
    assert slug("The shipped `pipelines.yaml`") == "the-shipped-pipelinesyaml"
    assert slug("Admin endpoints and the status page") == "admin-endpoints-and-the-status-page"


def _pipelines_fields() -> list[str]:
    """Every field of pipelines.yaml as configuration.md names it (``backends.<name>.launch.ctx``)."""
    schema = json.loads((ROOT / "schemas" / "pipelines.schema.json").read_text())
    defs = schema["$defs"]
    fields = [name for name in schema["properties"]]
    fields += [f"backends.<name>.{name}" for name in defs["backend"]["properties"]]
    fields += [f"backends.<name>.launch.{name}" for name in defs["launch"]["properties"]]
    fields += [f"models.<id>.{name}" for name in defs["model"]["properties"]]
    fleet = schema["properties"]["fleet"]["properties"]
    fields += [f"fleet.{name}" for name in fleet if name != "ports"]
    fields += [f"fleet.ports.{name}" for name in fleet["ports"]["properties"]]
    return fields


@pytest.mark.parametrize("field", _pipelines_fields())
def test_every_pipelines_field_is_documented(field):
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert f"`{field}`" in text, f"docs/configuration.md does not describe `{field}`"
