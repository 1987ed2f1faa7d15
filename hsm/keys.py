"""Key manager: create, find and use keys on a PKCS#11 token (issuer key pairs and the HMAC key)."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hsm.errors import HsmError, KeyExistsError, KeyNotFoundError
from hsm.session import Pkcs11Session
from hsm.signer import HsmPrivateKey, signer_for
from hsm.uri import Pkcs11Uri

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

HMAC_KEY_BYTES = 32
ED25519_OID = "1.3.101.112"


class KeyKind(enum.StrEnum):
    """Issuer key types the token can generate."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_3072 = "rsa-3072"
    ED25519 = "ed25519"


_EC_CURVE_OIDS = {KeyKind.EC_P256: "1.2.840.10045.3.1.7", KeyKind.EC_P384: "1.3.132.0.34"}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the token says about a key (read back, not assumed)."""

    label: str
    key_id: bytes
    key_type: str
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool


class KeyManager(Protocol):
    """The smallest interface the service needs from a key store."""

    def get_public_key(self, label: str) -> PublicKey: ...

    def create_key(self, label: str, kind: KeyKind) -> PublicKey: ...

    def create_signer(self, label: str) -> HsmPrivateKey: ...

    def close(self) -> None: ...


@runtime_checkable
class MacKeyManager(Protocol):
    """Capability: keyed HMAC-SHA-256 with a secret key that never leaves the store."""

    def create_hmac_key(self, label: str) -> None: ...

    def hmac_sha256(self, label: str, data: bytes) -> bytes: ...


@runtime_checkable
class KeyInspector(Protocol):
    """Capability: read back a key's protection attributes."""

    def key_info(self, label: str, object_class: str = "private") -> KeyInfo: ...


_CLASSES = {
    "private": ObjectClass.PRIVATE_KEY,
    "public": ObjectClass.PUBLIC_KEY,
    "secret": ObjectClass.SECRET_KEY,
}


class Pkcs11KeyManager:
    """`KeyManager` on a PKCS#11 token named by an RFC 7512 URI."""

    def __init__(self, uri: Pkcs11Uri | str) -> None:
        self.uri = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        self.session = Pkcs11Session.shared(self.uri)
        self._closed = False
        # Handles are valid only for the login generation that found them.
        self._handles: dict[tuple[str, ObjectClass], tuple[int, Any]] = {}

    # -- lookup ---------------------------------------------------------------------------

    def _find(self, session: pkcs11.Session, label: str, object_class: ObjectClass) -> Any:
        cached = self._handles.get((label, object_class))
        if cached is not None and cached[0] == self.session.generation:
            return cached[1]
        # Public and private keys share a label, so the class is always part of the search.
        found = list(session.get_objects({Attribute.LABEL: label, Attribute.CLASS: object_class}))
        if not found:
            raise KeyNotFoundError(f"no {object_class.name.lower()} key labelled {label!r} on the token")
        if len(found) > 1:
            raise HsmError(f"{len(found)} keys labelled {label!r}; labels must be unique")
        self._handles[(label, object_class)] = (self.session.generation, found[0])
        return found[0]

    def exists(self, label: str, object_class: str = "private") -> bool:
        if object_class not in _CLASSES:
            raise HsmError(f"unknown object class {object_class!r}")

        def op(session: pkcs11.Session) -> bool:
            objs = session.get_objects({Attribute.LABEL: label, Attribute.CLASS: _CLASSES[object_class]})
            return any(True for _ in objs)

        return self.session.run(f"looking up key {label!r}", op)

    def mechanisms(self) -> frozenset[str]:
        """Names of the mechanisms the token's slot offers (``"ECDSA"``, ``"RSA_PKCS"``, ...).

        Values python-pkcs11 has no name for (vendor mechanisms) appear as ``"0x..."``.
        """

        def op(session: pkcs11.Session) -> frozenset[str]:
            found = session.token.slot.get_mechanisms()
            return frozenset(m.name if isinstance(m, Mechanism) else f"0x{int(m):x}" for m in found)

        return self.session.run("listing the token's mechanisms", op)

    # -- public keys ----------------------------------------------------------------------

    def get_public_key(self, label: str) -> PublicKey:
        def op(session: pkcs11.Session) -> PublicKey:
            pub = self._find(session, label, ObjectClass.PUBLIC_KEY)
            return _to_public_key(pub)

        return self.session.run(f"reading public key {label!r}", op)

    # -- generation -----------------------------------------------------------------------

    def create_key(self, label: str, kind: KeyKind) -> PublicKey:
        key_id = secrets.token_bytes(16)
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: False}

        def op(session: pkcs11.Session) -> PublicKey:
            if any(True for _ in session.get_objects({Attribute.LABEL: label})):
                raise KeyExistsError(f"a key labelled {label!r} already exists on the token")
            if kind is KeyKind.RSA_3072:
                pub, _ = session.generate_keypair(
                    KeyType.RSA,
                    3072,
                    id=key_id,
                    label=label,
                    store=True,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                if kind is KeyKind.ED25519:
                    key_type, oid, mech = KeyType.EC_EDWARDS, ED25519_OID, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
                else:
                    key_type, oid, mech = KeyType.EC, _EC_CURVE_OIDS[kind], Mechanism.EC_KEY_PAIR_GEN
                params = session.create_domain_parameters(
                    key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True
                )
                pub, _ = params.generate_keypair(
                    id=key_id,
                    label=label,
                    store=True,
                    mechanism=mech,
                    public_template=public_template,
                    private_template=private_template,
                )
            return _to_public_key(pub)

        return self.session.run(f"generating {kind} key {label!r}", op)

    def create_hmac_key(self, label: str) -> None:
        def op(session: pkcs11.Session) -> None:
            if any(True for _ in session.get_objects({Attribute.LABEL: label})):
                raise KeyExistsError(f"a key labelled {label!r} already exists on the token")
            session.generate_key(
                KeyType.GENERIC_SECRET,
                HMAC_KEY_BYTES * 8,
                id=secrets.token_bytes(16),
                label=label,
                store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template={
                    Attribute.VALUE_LEN: HMAC_KEY_BYTES,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.VERIFY: True,
                    Attribute.ENCRYPT: False,
                    Attribute.DECRYPT: False,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                },
            )

        self.session.run(f"generating HMAC key {label!r}", op)

    # -- use ------------------------------------------------------------------------------

    def hmac_sha256(self, label: str, data: bytes) -> bytes:
        def op(session: pkcs11.Session) -> bytes:
            key = self._find(session, label, ObjectClass.SECRET_KEY)
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))

        return self.session.run(f"HMAC with key {label!r}", op)

    def sign_raw(self, label: str, mechanism: str, data: bytes) -> bytes:
        """Sign ``data`` as-is with the named PKCS#11 mechanism (e.g. "ECDSA" over a digest)."""
        mech = Mechanism[mechanism]

        def op(session: pkcs11.Session) -> bytes:
            key = self._find(session, label, ObjectClass.PRIVATE_KEY)
            # Always name the mechanism: python-pkcs11's EC default is ECDSA_SHA512.
            return bytes(key.sign(data, mechanism=mech))

        return self.session.run(f"signing with key {label!r}", op)

    def create_signer(self, label: str) -> HsmPrivateKey:
        public = self.get_public_key(label)
        return signer_for(public, lambda mechanism, data: self.sign_raw(label, mechanism, data))

    def key_info(self, label: str, object_class: str = "private") -> KeyInfo:
        if object_class not in ("private", "secret"):
            raise HsmError("protection attributes exist only for private and secret keys")

        def op(session: pkcs11.Session) -> KeyInfo:
            obj = self._find(session, label, _CLASSES[object_class])
            attrs = obj.get_attributes(
                [
                    Attribute.ID,
                    Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE,
                    Attribute.ALWAYS_SENSITIVE,
                    Attribute.NEVER_EXTRACTABLE,
                ]
            )
            return KeyInfo(
                label=label,
                key_id=bytes(attrs[Attribute.ID]),
                key_type=KeyType(obj.key_type).name,
                sensitive=bool(attrs[Attribute.SENSITIVE]),
                extractable=bool(attrs[Attribute.EXTRACTABLE]),
                always_sensitive=bool(attrs[Attribute.ALWAYS_SENSITIVE]),
                never_extractable=bool(attrs[Attribute.NEVER_EXTRACTABLE]),
            )

        return self.session.run(f"reading attributes of key {label!r}", op)

    def close(self) -> None:
        """Release this manager's hold on the process session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._handles.clear()
        self.session.close()


def _to_public_key(pub: Any) -> PublicKey:
    key_type = pub.key_type
    if key_type == KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if key_type == KeyType.EC:
        key = load_der_public_key(encode_ec_public_key(pub))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise HsmError("the token returned a malformed EC public key")
        return key
    if key_type == KeyType.EC_EDWARDS:
        point = bytes(pub[Attribute.EC_POINT])
        # CKA_EC_POINT is a DER OCTET STRING (04 20 || 32 bytes) on SoftHSM; some modules give raw.
        if len(point) == 34 and point[:2] == b"\x04\x20":
            point = point[2:]
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    raise HsmError(f"unsupported key type on token: {key_type!r}")
