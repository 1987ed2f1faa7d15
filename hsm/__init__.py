"""PKCS#11 abstraction: keys named by RFC 7512 URIs, one serialized session per process.

Knows nothing of gRPC or bindings.
"""

from hsm.errors import (
    HsmConfigError,
    HsmError,
    HsmUnavailableError,
    KeyExistsError,
    KeyNotFoundError,
    MechanismNotSupportedError,
    PinIncorrectError,
    TokenNotFoundError,
)
from hsm.keys import KeyInfo, KeyInspector, KeyKind, KeyManager, MacKeyManager, Pkcs11KeyManager, PublicKey
from hsm.uri import Pkcs11Uri

__all__ = [
    "HsmConfigError",
    "HsmError",
    "HsmUnavailableError",
    "KeyExistsError",
    "KeyInfo",
    "KeyInspector",
    "KeyKind",
    "KeyManager",
    "KeyNotFoundError",
    "MacKeyManager",
    "MechanismNotSupportedError",
    "PinIncorrectError",
    "Pkcs11KeyManager",
    "Pkcs11Uri",
    "PublicKey",
    "TokenNotFoundError",
]
