"""The HSM layer's own errors: PKCS#11 return codes translated at the boundary."""

from __future__ import annotations


class HsmError(Exception):
    """Root of every error raised by the HSM layer."""

    #: True when retrying later may succeed (device gone, session lost).
    retryable: bool = False


class HsmConfigError(HsmError):
    """The HSM URI or PIN source is malformed or cannot be read."""


class PinIncorrectError(HsmError):
    """The token rejected the user PIN (wrong, locked or expired)."""


class TokenNotFoundError(HsmError):
    """No token with the configured label is present in the module."""

    retryable = True


class KeyNotFoundError(HsmError):
    """The named key does not exist on the token."""


class KeyExistsError(HsmError):
    """A key with this label already exists on the token."""


class MechanismNotSupportedError(HsmError):
    """The module does not offer a mechanism the operation needs."""


class HsmUnavailableError(HsmError):
    """Device, token or session failure: the HSM cannot be used right now."""

    retryable = True
