"""The documentation: every relative link resolves (files, and headings of Markdown files), the README stays a
newcomer's page, and the docs state what is true now rather than a history (no issue numbers, no commit hashes)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_there_are_docs_by_topic():
    names = {p.name for p in DOCS}
    assert {"statistics.md", "study.md", "models.md", "speed.md", "cluster.md", "choices.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    bad = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            bad.append(f"{target}: no such file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            bad.append(f"{target}: no heading #{fragment} in {path.relative_to(REPO)}")
    assert not bad, f"{doc.relative_to(REPO)}: " + "; ".join(bad)


def test_the_link_check_finds_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n[ok](#title) [missing](b.md) [bad anchor](#nope)\n")
    assert links(doc) == ["#title", "b.md", "#nope"] and "title" in anchors(doc) and "nope" not in anchors(doc)


def test_the_readme_is_a_newcomers_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; reference goes in docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 200]
    assert not long, f"README.md: lines over 200 characters: {long}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_numbers_or_commit_hashes(doc):
    text = doc.read_text()
    issues = re.findall(r"\bissues? #?\d+\b|\(#\d+\)", text, re.I)
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not issues, f"{doc.relative_to(REPO)}: issue numbers {issues}"
    assert not hashes, f"{doc.relative_to(REPO)}: commit hashes {hashes}"
