"""The README and docs/ hold together: every relative link resolves to a file (and an ``#anchor`` to a heading of
its target, slugged as GitHub does), the README stays a front page of at most 250 lines, and no page speaks of how
the project was built (issues, sessions, tools). Pure file reading: ``pytest tests/test_docs.py`` takes a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250
HISTORY = re.compile(r"issue [0-9]|session|device tool", re.IGNORECASE)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"; not inside inline code.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _ and -, in any script
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    targets = []
    for line in prose_lines(page.read_text()):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, mailto:, ...


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        (
            "PARD-2: trained for a target's acceptance, and dual mode",
            "pard-2-trained-for-a-targets-acceptance-and-dual-mode",
        ),
        ("The derived pair: `make demo DEMO=demo_derived`", "the-derived-pair-make-demo-demodemo_derived"),
        ("Measure in vLLM: `engine=vllm` and `engine=both`", "measure-in-vllm-enginevllm-and-engineboth"),
        ("A — B, [linked](x.md) × 2", "a--b-linked--2"),
    ],
)
def test_the_slug_matches_github(heading: str, slug: str):
    assert github_slug(heading) == slug


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_the_docs_speak_of_the_project_not_of_how_it_was_built():
    pages = [README, *sorted(p for p in DOCS.rglob("*") if p.is_file())]
    found = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()}"
        for page in pages
        for number, line in enumerate(page.read_text(errors="replace").splitlines(), start=1)
        if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)


# In code "session" is a pytest scope and a process session; what gives history away there is a numbered work item.
CODE_HISTORY = re.compile(r"\bissue(?:'s| [0-9])|^\s*# items? [0-9]", re.IGNORECASE)


def test_the_code_comments_speak_of_the_project_not_of_how_it_was_built():
    files = [REPO / "Makefile", REPO / ".ci" / "run"]
    for folder in ("pard_train", "scripts", "tests", "configs", "data_recipes"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".sh", ".sbatch", ".yaml", ".md"}]
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if CODE_HISTORY.search(line)
    ]
    assert not found, "\n".join(found)
