"""The documentation holds together: every relative link in README.md and docs/ resolves (files and #anchors), every
docs page is linked from somewhere, the README stays short, and CI runs exactly the README's test command."""

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets and parentheses are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return frozenset(found)


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in filter(relative, links(page)):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_another_page():
    linked = {(page.parent / target.partition("#")[0]).resolve()
              for page in PAGES for target in filter(relative, links(page)) if target.partition("#")[0]}
    orphans = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p not in linked]
    assert not orphans, f"pages no other page links to: {orphans}"


def test_the_link_checker_sees_broken_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title: with `code`\n\n## Twice\n\n## Twice\n\n[ok](#a-title-with-code) [b](#twice-1) "
                    "![img](missing.png) [web](https://example.com) `[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n")
    assert links(page) == ["#a-title-with-code", "#twice-1", "missing.png", "https://example.com"]
    assert anchors(page) == {"a-title-with-code", "twice", "twice-1"}
    assert [t for t in links(page) if relative(t)] == ["#a-title-with-code", "#twice-1", "missing.png"]


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move details into docs/"


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in line.splitlines()]
    test_command = next(c for c in commands if "pytest" in c)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    assert ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m adaptive_sampler demo"
            in commands)
