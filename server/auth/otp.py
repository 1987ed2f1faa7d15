"""OTP: a one-time code from SendBindingOtp, matched against the individual's latest outstanding OTP."""

from __future__ import annotations

import functools
import hmac
import re
from dataclasses import dataclass

from server.auth.base import FAILED, Attempt, AuthContext, Verdict
from server.ports import Clock, KeyedHasher, OtpAttempts

NAME = "OTP"
FORMAT = "alpha-numeric"
#: The default `otp_length`; the shape follows the configured length.
OTP_LENGTH = 6
#: MAC purpose of a stored OTP (one HSM key, one label per meaning).
MAC_OTP = "otp"


@functools.cache
def _shape(length: int) -> re.Pattern[str]:
    # Letters stay well-formed whatever the alphabet: the format is eSignet's alpha-numeric, and a wrong
    # character is a wrong OTP (auth_failed), not a malformed request.
    return re.compile(rf"[A-Za-z0-9]{{{length}}}")


@dataclass(frozen=True, slots=True)
class OtpFactor:
    hasher: KeyedHasher
    clock: Clock
    otps: OtpAttempts
    length: int = OTP_LENGTH
    name: str = NAME
    format: str = FORMAT

    def well_formed(self, challenge: str) -> bool:
        return _shape(self.length).fullmatch(challenge) is not None

    def verify(self, attempt: Attempt, challenge: str) -> Verdict:
        # Claimed for unknown individuals too: the attempt costs the same whoever is named.
        record = self.otps.claim_otp_attempt(attempt.id_hmac, attempt.partner_id, self.clock.now())
        if record is None:
            return FAILED
        given = self.hasher.mac(MAC_OTP, record.transaction_id, challenge)
        if hmac.compare_digest(record.otp_hmac, given):
            return Verdict(True, consumed_otp=record.transaction_id)
        return FAILED


def build(ctx: AuthContext) -> OtpFactor:
    return OtpFactor(ctx.hasher, ctx.clock, ctx.otps, ctx.otp_length)
