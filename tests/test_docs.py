"""The docs document what the code does: every error reason (docs/errors.md), every setting (README), and
every link resolves inside the repository."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import server.errors as errors
from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ERRORS = (ROOT / "docs" / "errors.md").read_text()


def answerable_errors() -> set[tuple[str, str]]:
    """(reason, status) of every error class the server raises (bases only used for subclassing excluded)."""
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.KeyBinderError) and c is not errors.KeyBinderError
    ]
    # NotFoundError only gives its subclasses their status; it is never raised itself.
    return {(c.reason, c.status.value) for c in classes if c is not errors.NotFoundError}


def test_the_error_table_lists_every_reason_and_status() -> None:
    table = set(re.findall(r"^\| `([a-z0-9_]+)` \| ([A-Z_]+) \|", ERRORS, flags=re.M))
    expected = answerable_errors()
    assert expected <= table, f"missing from docs/errors.md: {sorted(expected - table)}"
    assert table <= expected, f"docs/errors.md lists reasons the code does not have: {sorted(table - expected)}"


def test_every_setting_is_in_the_configuration_reference() -> None:
    missing = [name for name in Settings.model_fields if f"`{name}`" not in README]
    assert missing == []


# -- links: every one resolves inside the repository -------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
#: [text](target) and [text](target "title"); images too. Code spans and blocks are left out first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|``.*?``|`[^`\n]*`", flags=re.S)


def links(page: Path) -> list[str]:
    return LINK.findall(CODE.sub("", page.read_text()))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", CODE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_documentation_pages_are_linked_from_the_readme() -> None:
    linked = {(ROOT / target).resolve() for target in links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS[2:] if p.resolve() not in linked]
    assert unlinked == [], "docs/ pages missing from the README's Documentation list"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_to_a_file_in_the_repository(page: Path) -> None:
    found = links(page)
    assert found or page.name != "README.md"
    for target in found:
        assert "://" not in target, f"{target}: a link leaves the repository"
        assert not target.startswith("mailto:"), f"{target}: a link leaves the repository"
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        assert resolved.is_relative_to(ROOT), f"{target}: points outside the repository"
        assert resolved.exists(), f"{target}: no such file"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{target}: no heading #{fragment} in {resolved.name}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_file_outside_the_repository(page: Path) -> None:
    """Also in plain text and code: a reader of a fresh clone has nothing above the checkout."""
    text = page.read_text()
    escaping = [
        m for m in re.findall(r"(?<![\w.])\.\./[\w./-]+", text) if not (page.parent / m).resolve().is_relative_to(ROOT)
    ]
    assert escaping == []
    assert "shared/SPEC" not in text
