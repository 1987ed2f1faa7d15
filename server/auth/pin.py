"""PIN: six digits set at enrolment, stored only as an HSM-keyed HMAC bound to the individual."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from server.auth.base import FAILED, PASSED, Attempt, AuthContext, Verdict
from server.ports import KeyedHasher

NAME = "PIN"
FORMAT = "number"
PIN_LENGTH = 6
#: MAC purpose of a stored PIN.
MAC_PIN = "pin"
_SHAPE = re.compile(rf"[0-9]{{{PIN_LENGTH}}}")


def pin_hmac(hasher: KeyedHasher, id_hmac: bytes, pin: str) -> bytes:
    """The stored form of ``pin`` (enrolment and verification alike)."""
    return hasher.mac(MAC_PIN, id_hmac, pin)


@dataclass(frozen=True, slots=True)
class PinFactor:
    hasher: KeyedHasher
    name: str = NAME
    format: str = FORMAT

    def well_formed(self, challenge: str) -> bool:
        return _SHAPE.fullmatch(challenge) is not None

    def verify(self, attempt: Attempt, challenge: str) -> Verdict:
        # The MAC is computed for unknown individuals too, so both cost the same.
        given = pin_hmac(self.hasher, attempt.id_hmac, challenge)
        stored = attempt.identity.pin_hmac if attempt.identity is not None else None
        if stored is None or not hmac.compare_digest(stored, given):
            return FAILED
        return PASSED


def build(ctx: AuthContext) -> PinFactor:
    return PinFactor(ctx.hasher)
