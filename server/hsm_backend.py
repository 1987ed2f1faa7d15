"""PKCS#11 backend for the service's HSM ports (keyed hashing, issuer signing keys)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hsm import HsmError, Pkcs11KeyManager, signer_for
from server.domain import IssuerPrivateKey
from server.ports import BackendFailure, BackendUnavailable

T = TypeVar("T")


def _guard(call: Callable[[], T]) -> T:
    try:
        return call()
    except HsmError as err:
        if err.retryable:
            raise BackendUnavailable(str(err)) from err
        raise BackendFailure(str(err)) from err


class HsmHasher:
    """`KeyedHasher` using the token's HMAC-SHA-256 secret key."""

    def __init__(self, keys: Pkcs11KeyManager, key_label: str) -> None:
        self._keys = keys
        self._label = key_label

    def mac(self, purpose: str, *parts: str | bytes) -> bytes:
        message = bytearray(purpose.encode())
        for part in parts:
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
            message += len(data).to_bytes(4, "big") + data
        return _guard(lambda: self._keys.hmac_sha256(self._label, bytes(message)))


class HsmIssuerKeys:
    """`IssuerKeys` handing out `cryptography` private keys whose sign() runs in the HSM."""

    def __init__(self, keys: Pkcs11KeyManager) -> None:
        self._keys = keys

    def signer(self, key_label: str) -> IssuerPrivateKey:
        public = _guard(lambda: self._keys.get_public_key(key_label))
        # Errors inside sign() surface through cryptography's builder, so they are mapped here.
        return signer_for(
            public, lambda mechanism, data: _guard(lambda: self._keys.sign_raw(key_label, mechanism, data))
        )
