"""The README and docs/ hold together: relative links reach existing files and headings, the README
stays short, and every page is reachable from the README and the site navigation."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 270  # the per-task results tables (learned heads vs baselines and peers) live in the README

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!\!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(_CODE_SPAN.sub("", line))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (MkDocs' default agrees for the ASCII headings used here)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 … suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        targets += _LINK.findall(line) + _IMAGE.findall(line)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # drop http:, https:, mailto: …


FILES = [README, *PAGES]


def test_docs_folder_has_the_topic_pages():
    names = {p.name for p in PAGES}
    for page in ("index.md", "training.md", "own-data.md", "export-and-stations.md", "localization.md",
                 "grasp.md", "accuracy.md", "throughput.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


def test_docs_pages_link_only_inside_docs():
    """Pages render on their own and as a MkDocs site: a link out of docs/ would break the site."""
    outside = [f"{p.name}: {t}" for p in PAGES for t in relative_links(p)
               if t.partition("#")[0] and not (p.parent / t.partition("#")[0]).resolve().is_relative_to(DOCS)]
    assert not outside, outside


def test_readme_stays_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_every_page_is_linked_from_the_readme_and_the_site_nav():
    readme_targets = {t.partition("#")[0] for t in relative_links(README)}
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert f"docs/{page.name}" in readme_targets, f"README.md does not link docs/{page.name}"
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M), f"mkdocs.yml nav lacks {page.name}"


def test_slug_rules():
    assert _slug("Grasps on point clouds: export, score, station") == "grasps-on-point-clouds-export-score-station"
    assert _slug("Cross-validated ensemble (the accuracy recipe)") == "cross-validated-ensemble-the-accuracy-recipe"
    assert _slug("INT8 against `FP32`") == "int8-against-fp32"
