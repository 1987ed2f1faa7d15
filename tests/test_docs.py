"""The README documents what the code does: every error reason and every setting."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import server.errors as errors
from server.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


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
    table = set(re.findall(r"^\| `([a-z0-9_]+)` \| ([A-Z_]+) \|", README, flags=re.M))
    expected = answerable_errors()
    assert expected <= table, f"missing from README's error table: {sorted(expected - table)}"
    assert table <= expected, f"README lists reasons the code does not have: {sorted(table - expected)}"


def test_every_setting_is_in_the_configuration_reference() -> None:
    missing = [name for name in Settings.model_fields if f"`{name}`" not in README]
    assert missing == []
