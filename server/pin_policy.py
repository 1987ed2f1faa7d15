"""Enrolment rules for PINs: refuse the ones an attacker tries first (`identities import/add`)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

PIN_LENGTH = 6
#: The blocklist, shipped as data with its source named in its header (server/data/common-pins-6.txt).
BLOCKLIST_PATH = Path(__file__).resolve().parent / "data" / "common-pins-6.txt"
#: The rules, as a refusal names them.
RULE_LENGTH = "exactly 6 digits"
RULE_REPEATED = "repeated digits"
RULE_ASCENDING = "ascending run"
RULE_DESCENDING = "descending run"
RULE_COMMON = "common PIN (blocklist)"


class WeakPinError(ValueError):
    """A PIN refused at enrolment; the message names the rule (never the PIN)."""

    def __init__(self, rule: str) -> None:
        super().__init__(f"the PIN is refused: {rule}; choose another")
        self.rule = rule


@functools.cache
def common_pins() -> frozenset[str]:
    """The blocklist's PINs (comment lines start with #)."""
    lines = BLOCKLIST_PATH.read_text(encoding="ascii").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _run(pin: str, step: int) -> bool:
    """Every digit is the previous one plus ``step`` (mod 10): 123456, 890123, 654321, 210987."""
    return all((int(b) - int(a)) % 10 == step % 10 for a, b in itertools.pairwise(pin))


def pin_rule_broken(pin: str) -> str | None:
    """The first rule ``pin`` breaks, or None when it is acceptable."""
    if len(pin) != PIN_LENGTH or not pin.isascii() or not pin.isdigit():
        return RULE_LENGTH
    if len(set(pin)) == 1:
        return RULE_REPEATED
    if _run(pin, 1):
        return RULE_ASCENDING
    if _run(pin, -1):
        return RULE_DESCENDING
    if pin in common_pins():
        return RULE_COMMON
    return None


def check_pin(pin: str) -> None:
    """Raise WeakPinError naming the rule ``pin`` breaks."""
    rule = pin_rule_broken(pin)
    if rule is not None:
        raise WeakPinError(rule)
