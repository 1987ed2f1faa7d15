"""Wallet key types by name, as operators restrict them per partner (`allowed_key_types`)."""

from __future__ import annotations

from collections.abc import Collection

from server.errors import InvalidPublicKeyError
from server.jwk import WalletPublicKey
from server.keyprofiles import profile_of
from server.policy import KEY_TYPES


def key_type_of(public: WalletPublicKey) -> str:
    """The settings' name of a validated wallet key's type."""
    return profile_of(public).name


def check_key_type(public: WalletPublicKey, allowed: Collection[str]) -> None:
    """Refuse a key whose type the partner may not bind; the message names the types it may."""
    if key_type_of(public) not in allowed:
        names = ", ".join(t for t in KEY_TYPES if t in allowed)
        raise InvalidPublicKeyError(f"this partner may bind only these key types: {names}")
