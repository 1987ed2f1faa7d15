"""The docs document what the code does: every error reason (docs/errors.md) and every setting (README)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

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
