"""The shipped documentation stands alone: every relative link resolves inside the project, and no
document, docstring or help text points at files that do not ship with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Where the project's text lives: docs, code (docstrings and help text), configs, cluster recipes.
TEXT_DIRS = ("lambo_ray", "benchmarks", "serve", "cluster", "tune_configs", "configs")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh"}
SOURCES = [*DOCS, *sorted(p for d in TEXT_DIRS for p in (ROOT / d).rglob("*") if p.suffix in TEXT_SUFFIXES)]


def relative_links(doc: Path) -> list[str]:
    """Targets of the Markdown links of ``doc`` that point into the project (no URLs, no anchors)."""
    targets = [m.group(1) for m in LINK.finditer(doc.read_text(encoding="utf-8"))]
    return [t.split("#", 1)[0] for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def test_the_link_finder_sees_relative_links_only(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[a](docs/a.md) [b](https://x.org/y) [c](#sec) ![d](img/p.png) [e](f.md#part)\n")
    assert relative_links(doc) == ["docs/a.md", "img/p.png", "f.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    missing = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_nothing_points_outside_the_project():
    outside = re.compile(r"\.\./shared|SPEC\.md|STYLE\.md|RLLIB\.md")
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in SOURCES
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, f"references to documents that do not ship with the project: {hits}"
