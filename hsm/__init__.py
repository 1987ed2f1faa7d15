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
from hsm.provision import init_token, token_exists
from hsm.session import SessionObserver, set_observer
from hsm.signer import HsmPrivateKey, signer_for
from hsm.uri import Pkcs11Uri

__all__ = [
    "HsmConfigError",
    "HsmError",
    "HsmPrivateKey",
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
    "SessionObserver",
    "TokenNotFoundError",
    "init_token",
    "set_observer",
    "signer_for",
    "token_exists",
]
