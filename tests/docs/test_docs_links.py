"""The README and docs/*.md stand on their own: every relative link resolves inside the
repository (file and anchor), and every test they name as ``tests/FILE.py::test_name`` exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ")".
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: ...
_TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers; code spans blanked out."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, _CODE_SPAN.sub(lambda m: " " * len(m.group()), line)))
    return lines


def links(text: str) -> list[tuple[int, str]]:
    """Every link target in the prose of a Markdown text, with its line number."""
    found = []
    for number, line in prose_lines(text):
        found += [(number, m.group(1)) for m in _INLINE_LINK.finditer(line)]
        if m := _REFERENCE.match(line):
            found.append((number, m.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped
    (letters, digits, '-' and '_' stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a Markdown text offers: heading slugs (a repeated one gets -1, -2 ...) and
    explicit ``<a id="...">`` / ``<a name="...">``."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        found.update(_HTML_ANCHOR.findall(line))
        if m := _HEADING.match(line):
            base = slug(m.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_problem(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a link in ``source`` does not resolve inside ``root``, or None when it does."""
    if _EXTERNAL.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    if path_part.startswith("/"):
        return "an absolute path: it resolves on the web server, not in the repository"
    destination = (source.parent / path_part).resolve() if path_part else source
    if not destination.is_relative_to(root):
        return "points outside the repository"
    if not destination.exists():
        return "no such file in the repository"
    if anchor:
        if not destination.is_file() or destination.suffix != ".md":
            return "an anchor into something that is not a Markdown file"
        if unquote(anchor) not in anchors(destination.read_text(encoding="utf-8")):
            return f"no heading or anchor '{anchor}' in {destination.relative_to(root)}"
    return None


def test_slugs_follow_github() -> None:
    """Headings turn into the anchors GitHub gives them."""
    assert slug("Rule 3: local lease deadline") == "rule-3-local-lease-deadline"
    assert slug("Living with ThinLinc: two ways to run the VSM server") == \
        "living-with-thinlinc-two-ways-to-run-the-vsm-server"
    assert slug("Failback, switchover, health, hooks") == "failback-switchover-health-hooks"
    assert slug("`vsm-sidecar` and **etcd**") == "vsm-sidecar-and-etcd"
    assert slug("The [design](docs/DESIGN.md) (v1.0)") == "the-design-v10"
    assert slug("session_writers & TLS") == "session_writers--tls"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n<a id=\"x\"></a>\n") == \
        {"a", "a-1", "x"}


def test_links_are_found_outside_code_only() -> None:
    """Inline, image and reference links count; links inside code spans or fences do not."""
    text = ("See [a](docs/A.md#x) and ![i](docs/i.png \"title\") and `[no](skip.md)`.\n"
            "```\n[no](fenced.md)\n```\n[ref]: ../outside.md\n")
    assert links(text) == [(1, "docs/A.md#x"), (1, "docs/i.png"), (5, "../outside.md")]


def test_link_problems_are_named(tmp_path: Path) -> None:
    """A link out of the repository, to a missing file, or to a missing anchor is a problem;
    a good file, a good anchor and an external URL are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "D.md").write_text("# Title\n## Rule 1: x\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("", encoding="utf-8")
    assert link_problem(readme, "docs/D.md#rule-1-x", tmp_path) is None
    assert link_problem(readme, "#", tmp_path) is None
    assert link_problem(readme, "https://example.org/x#y", tmp_path) is None
    assert link_problem(readme, "../shared/DESIGN.md", tmp_path) == \
        "points outside the repository"
    assert link_problem(tmp_path / "docs" / "D.md", "../../x.md", tmp_path) == \
        "points outside the repository"
    assert link_problem(readme, "docs/NONE.md", tmp_path) == "no such file in the repository"
    assert link_problem(readme, "docs/D.md#rule-2", tmp_path) == \
        "no heading or anchor 'rule-2' in docs/D.md"
    assert link_problem(readme, "/etc/passwd", tmp_path) is not None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    """Each relative link of README.md and docs/*.md names a file of this repository, and an
    anchor that file has: a clone reads without anything beside it."""
    problems = [f"{doc.relative_to(ROOT)}:{line}: ({target}) {problem}"
                for line, target in links(doc.read_text(encoding="utf-8"))
                if (problem := link_problem(doc, target)) is not None]
    assert problems == []


def outside_paths(text: str) -> list[tuple[int, str]]:
    """Paths out of the repository named in code spans of the prose (``../shared/X.md``):
    not links, but just as unreachable from a clone."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            found += [(number, m.group(2).strip()) for m in _CODE_SPAN.finditer(line)
                      if m.group(2).strip().startswith("../")]
    return found


def test_paths_outside_the_repository_are_found() -> None:
    text = "See `../shared/DESIGN.md` and `./dev test`.\n```\ncd ../x\n```\n"
    assert outside_paths(text) == [(1, "../shared/DESIGN.md")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_outside_the_repository_is_named(doc: Path) -> None:
    """No doc sends its reader to a file beside the repository rather than in it."""
    assert outside_paths(doc.read_text(encoding="utf-8")) == []


def test_design_links_from_the_readme() -> None:
    """The README links the design (and does so in its first screen, the first 40 lines)."""
    first_screen = "\n".join(ROOT.joinpath("README.md").read_text(encoding="utf-8")
                             .splitlines()[:40])
    assert "docs/DESIGN.md" in [target.partition("#")[0] for _, target in links(first_screen)]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_tests_named_in_the_docs_exist() -> None:
    """Every ``tests/FILE.py::test_name`` that the docs give as a guard is a real test."""
    missing = []
    for doc in DOCS:
        for name, test in _TEST_REFERENCE.findall(doc.read_text(encoding="utf-8")):
            path = ROOT / name
            if not path.is_file() or test not in _test_names(path):
                missing.append(f"{doc.relative_to(ROOT)}: {name}::{test}")
    assert missing == []
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    assert len(_TEST_REFERENCE.findall(design)) >= 6  # at least one guard per safety rule
