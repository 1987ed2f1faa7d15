"""Challenge rules: which factors and formats exist, and the shape each challenge must have."""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from server.errors import (
    InvalidAuthFactorTypeError,
    InvalidChallengeError,
    InvalidChallengeFormatError,
    InvalidNoOfChallengesError,
)

MAX_CHALLENGES = 5
#: The default `otp_length`; the OTP shape follows the configured length (server/otp.py).
OTP_LENGTH = 6
PIN_LENGTH = 6
WLA_MIN_CHARS = 100
WLA_MAX_CHARS = 8192

#: The format of each auth factor, as eSignet's reference binders name them.
FACTOR_FORMATS: dict[str, str] = {
    "OTP": "alpha-numeric",
    "PIN": "number",
    "WLA": "jwt",
    "BIO": "encoded-json",
}

_SHAPES: dict[str, re.Pattern[str]] = {
    "PIN": re.compile(rf"[0-9]{{{PIN_LENGTH}}}"),
    "WLA": re.compile(rf"(?=.{{{WLA_MIN_CHARS},{WLA_MAX_CHARS}}}$)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"),
}


@dataclass(frozen=True, slots=True)
class Challenge:
    auth_factor_type: str
    format: str
    challenge: str

    def __repr__(self) -> str:  # the answer itself (an OTP, a PIN) must never reach a log
        return f"Challenge({self.auth_factor_type}, {self.format}, <{len(self.challenge)} chars>)"


def supported_formats(factor: str, enabled: Collection[str]) -> list[str]:
    """Formats for ``factor`` if the server can verify it, else an empty list."""
    fmt = FACTOR_FORMATS.get(factor)
    return [fmt] if fmt is not None and factor in enabled else []


@functools.cache
def _otp_shape(length: int) -> re.Pattern[str]:
    # Letters stay well-formed whatever the alphabet: the format is eSignet's alpha-numeric, and a wrong
    # character is a wrong OTP (auth_failed), not a malformed request.
    return re.compile(rf"[A-Za-z0-9]{{{length}}}")


def validate_challenges(
    challenges: Sequence[Challenge], enabled: Collection[str], *, otp_length: int = OTP_LENGTH
) -> None:
    """Check count, factor, format and shape of every challenge before any is verified."""
    if not 1 <= len(challenges) <= MAX_CHALLENGES:
        raise InvalidNoOfChallengesError(f"between 1 and {MAX_CHALLENGES} challenges are required")
    seen: set[str] = set()
    for index, ch in enumerate(challenges):
        where = {"challenge_index": str(index)}
        if not supported_formats(ch.auth_factor_type, enabled):
            raise InvalidAuthFactorTypeError(
                f"challenge {index}: unsupported auth factor type; supported: {sorted(enabled)}", metadata=where
            )
        if ch.format != FACTOR_FORMATS[ch.auth_factor_type]:
            raise InvalidChallengeFormatError(
                f"challenge {index}: format for {ch.auth_factor_type} must be {FACTOR_FORMATS[ch.auth_factor_type]!r}",
                metadata=where,
            )
        shape = _otp_shape(otp_length) if ch.auth_factor_type == "OTP" else _SHAPES.get(ch.auth_factor_type)
        if shape is None or not shape.fullmatch(ch.challenge):
            raise InvalidChallengeError(f"challenge {index}: malformed {ch.auth_factor_type} challenge", metadata=where)
        if ch.auth_factor_type in seen:
            raise InvalidChallengeError(
                f"challenge {index}: {ch.auth_factor_type} given more than once", metadata=where
            )
        seen.add(ch.auth_factor_type)
