"""The documentation: every relative link resolves (files, and headings of Markdown files by GitHub's anchors), the
README stays a newcomer's page, and the docs state what is true now rather than a history (no issue numbers, no
commit hashes). Reads text files only: no project imports."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOPICS = {"statistics.md", "study.md", "models.md", "speed.md", "cluster.md", "choices.md"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...

ISSUE_REFS = re.compile(r"\bissues?\s*#?\d+\b|\(#\d+\)|(?<![\w/&])#\d+\b", re.I)
HEX = r"[0-9a-f]{7,40}"
BACKTICKED_HASH = re.compile(rf"`({HEX})`")
BARE_HEX = re.compile(rf"(?<![\w-])({HEX})(?![\w-])")


def rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code spans (code spans become `code`, so a link whose
    text is code is still a link)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text (links as their text, no code or emphasis markers) in lower
    case, every character that is not a letter, digit, space, hyphen or underscore dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)                           # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)                # _emphasis_, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, a repeated heading's as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return [m.group(2) for m in INLINE_LINK.finditer(text)] + REFERENCE_LINK.findall(text)


def broken_links(doc: Path) -> list[str]:
    bad = []
    for target in links(doc):
        if not target or SCHEME.match(target):  # http(s):, mailto:, other schemes: not checked here
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            bad.append(f"[...]({target}): no such file {rel(path)}")
        elif fragment and path.suffix == ".md" and fragment.lower() not in anchors(path):
            bad.append(f"[...]({target}): no heading with anchor #{fragment} in {rel(path)}")
    return bad


def test_there_are_docs_by_topic():
    assert TOPICS <= {p.name for p in DOCS}, f"docs/ lacks {sorted(TOPICS - {p.name for p in DOCS})}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relative_link_resolves(doc):
    bad = broken_links(doc)
    assert not bad, f"{rel(doc)}: broken links:\n  " + "\n  ".join(bad)


def test_github_slugs():
    assert slug("What a result is computed from: run identities") == "what-a-result-is-computed-from-run-identities"
    assert slug("Tables 9, 5 (Swin) and 6 at every size") == "tables-9-5-swin-and-6-at-every-size"
    assert slug("4. DVC's queue") == "4-dvcs-queue"
    assert slug("Training throughput: `bench-train`") == "training-throughput-bench-train"
    assert slug("The `riformer_s12` *family*") == "the-riformer_s12-family"
    assert slug("Deploy speed: folded layer scale, ONNX Runtime") == "deploy-speed-folded-layer-scale-onnx-runtime"
    assert slug("Sensitivity: can the default study see T1?") == "sensitivity-can-the-default-study-see-t1"


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## Same\n## Same\n", encoding="utf-8")
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Title\n"
        "[ok](#title) [ok](other.md#other-page) [ok](other.md#same-1) [web](https://example.org/x) [m](mailto:a@b.c)\n"
        "[`code text`](other.md) `[not a link](nowhere.md)`\n"
        "```\n[not a link either](nowhere.md)\n```\n"
        "[missing](b.md) [bad anchor](#nope) [bad anchor elsewhere](other.md#nope)\n",
        encoding="utf-8")
    assert links(doc) == ["#title", "other.md#other-page", "other.md#same-1", "https://example.org/x",
                          "mailto:a@b.c", "other.md", "b.md", "#nope", "other.md#nope"]
    bad = broken_links(doc)
    assert len(bad) == 3 and "b.md" in bad[0] and "#nope" in bad[1] and "other.md" in bad[2], bad


def test_the_readme_is_a_newcomers_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250); reference goes in docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 200]
    assert not long, f"README.md: lines over 200 characters: {long}"


@pytest.mark.parametrize("doc", DOCS[1:], ids=rel)
def test_docs_lines_are_wrapped(doc):
    long = [i + 1 for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines()) if len(line) > 300]
    assert not long, f"{rel(doc)}: lines over 300 characters: {long}"


def hash_like(text: str) -> list[str]:
    """Tokens that look like commit hashes: 7-40 hex digits in backticks, or bare with both letters and digits."""
    found = BACKTICKED_HASH.findall(text)
    found += [h for h in BARE_HEX.findall(text) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    return sorted(set(found))


def test_the_history_checks_catch_history():
    assert ISSUE_REFS.findall("(issue 14) and issue 16, issues #3, see (#12) or #7") == [
        "issue 14", "issue 16", "issues #3", "(#12)", "#7"]
    upstream = "[treeverse/dvc#9021](https://github.com/treeverse/dvc/issues/9021)"
    assert not ISSUE_REFS.findall(f"{upstream}, ## 1. A heading, &#8212;")
    assert hash_like("at 11fb93e, `25fa208`, `1234567`") == ["11fb93e", "1234567", "25fa208"]
    assert not hash_like("2026-12-02, 1e-5, 3.8e-6, riformer-default-deploy, 11,915,176, decade, accede")


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_no_issue_numbers_or_commit_hashes(doc):
    text = doc.read_text(encoding="utf-8")
    issues = ISSUE_REFS.findall(text)
    hashes = hash_like(text)
    assert not issues, f"{rel(doc)}: issue references {issues}: say what is true now, not which issue changed it"
    assert not hashes, f"{rel(doc)}: commit-hash-like tokens {hashes}: state the current figure and its command"
