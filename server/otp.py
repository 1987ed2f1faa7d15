"""One-time codes: the alphabets an OTP is drawn from, and drawing one."""

from __future__ import annotations

import secrets
import string

from server.policy import DEFAULT_OTP_ALPHABET, DEFAULT_OTP_LENGTH

#: ``digits`` is what a person can type into Inji's OTP box (a numeric keyboard that strips everything
#: else) and what MOSIP IDA and eSignet's mock send; ``alphanumeric`` keeps KeyBinder's earlier codes.
OTP_ALPHABETS: dict[str, str] = {
    "digits": string.digits,
    "alphanumeric": string.ascii_uppercase + string.digits,
}
MIN_OTP_LENGTH = 4
MAX_OTP_LENGTH = 10

__all__ = ["DEFAULT_OTP_ALPHABET", "DEFAULT_OTP_LENGTH", "MAX_OTP_LENGTH", "MIN_OTP_LENGTH", "OTP_ALPHABETS", "new_otp"]


def new_otp(alphabet: str, length: int) -> str:
    """A uniformly random code of ``length`` characters from the named alphabet."""
    chars = OTP_ALPHABETS[alphabet]  # a KeyError is a bug: the settings admit only these names
    if not MIN_OTP_LENGTH <= length <= MAX_OTP_LENGTH:
        raise ValueError(f"an OTP is {MIN_OTP_LENGTH} to {MAX_OTP_LENGTH} characters")
    return "".join(secrets.choice(chars) for _ in range(length))
