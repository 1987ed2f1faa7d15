"""HSM-backed private keys that `cryptography` accepts wherever it takes a private key.

Each class subclasses the matching `cryptography` ABC so that ``CertificateBuilder.sign()``
and other standard code work unchanged, while ``sign()`` goes to the token. Everything that
would expose key material raises, because the token never releases it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, Self

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed, encode_dss_signature

from hsm.errors import MechanismNotSupportedError

BytesLike = bytes | bytearray | memoryview

#: Signs ``data`` with the token key under ``mechanism`` ("ECDSA", "EDDSA", "SHA256_RSA_PKCS", ...).
RawSign = Callable[[str, bytes], bytes]


def _not_extractable() -> NoReturn:
    raise TypeError("an HSM key is not extractable")


def _digest(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


class _TokenKey:
    """What every HSM key shares: no key material leaves the token, and copies are the same handle."""

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _not_extractable()

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


class HsmEcPrivateKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """ECDSA in the HSM. The message is hashed here and signed with raw CKM_ECDSA.

    SoftHSM 2.6.1 has no CKM_ECDSA_SHA256, and CKM_ECDSA silently truncates an unhashed
    message, so the hash is always computed first with the algorithm the caller named.
    """

    def __init__(self, public: ec.EllipticCurvePublicKey, raw_sign: RawSign) -> None:
        self._public = public
        self._raw_sign = raw_sign

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: BytesLike, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise MechanismNotSupportedError("only ECDSA is supported")
        algorithm = signature_algorithm.algorithm
        digest = bytes(data) if isinstance(algorithm, Prehashed) else _digest(bytes(data), algorithm)
        raw = self._raw_sign("ECDSA", digest)
        half = len(raw) // 2
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise MechanismNotSupportedError("ECDH is not offered by the HSM signer")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _not_extractable()


#: DER DigestInfo prefixes (RFC 8017 section 9.2, note 1): CKM_RSA_PKCS signs DigestInfo || hash.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


class HsmRsaPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    """RSA PKCS#1 v1.5 signatures in the HSM. The message is hashed here and signed with CKM_RSA_PKCS.

    Hash-and-sign mechanisms are not portable: openCryptoki 3.8's software token has
    CKM_RSA_PKCS but no CKM_SHA256_RSA_PKCS. Every module offers CKM_RSA_PKCS, so the DigestInfo
    is built here, as the ECDSA path builds its digest.
    """

    def __init__(self, public: rsa.RSAPublicKey, raw_sign: RawSign) -> None:
        self._public = public
        self._raw_sign = raw_sign

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: BytesLike,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo,
    ) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

        if not isinstance(padding, PKCS1v15) or isinstance(algorithm, NoDigestInfo):
            raise MechanismNotSupportedError("only PKCS#1 v1.5 with a DigestInfo is supported")
        hash_algorithm = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        prefix = _DIGEST_INFO_PREFIX.get(hash_algorithm.name)
        if prefix is None:
            raise MechanismNotSupportedError(f"hash {hash_algorithm.name} is not supported for RSA")
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
            if len(digest) != hash_algorithm.digest_size:
                raise ValueError(f"a prehashed {hash_algorithm.name} digest is {hash_algorithm.digest_size} bytes")
        else:
            digest = _digest(bytes(data), hash_algorithm)
        return self._raw_sign("RSA_PKCS", prefix + digest)

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise MechanismNotSupportedError("decryption is not offered by the HSM signer")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _not_extractable()


class HsmEd25519PrivateKey(_TokenKey, ed25519.Ed25519PrivateKey):
    """Ed25519 (pure EdDSA) signatures in the HSM."""

    def __init__(self, public: ed25519.Ed25519PublicKey, raw_sign: RawSign) -> None:
        self._public = public
        self._raw_sign = raw_sign

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def sign(self, data: BytesLike) -> bytes:
        return self._raw_sign("EDDSA", bytes(data))

    def private_bytes_raw(self) -> bytes:
        _not_extractable()


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey | HsmEd25519PrivateKey


def signer_for(
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey, raw_sign: RawSign
) -> HsmPrivateKey:
    """The HSM private key class matching ``public``."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        return HsmEcPrivateKey(public, raw_sign)
    if isinstance(public, rsa.RSAPublicKey):
        return HsmRsaPrivateKey(public, raw_sign)
    return HsmEd25519PrivateKey(public, raw_sign)
