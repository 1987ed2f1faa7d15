"""One table of the key types KeyBinder knows: a row per type, and the one place that asks a key its type.

A wallet key (bound by a partner) and the issuer key (in the HSM) are each one of these four types. Every
module that needs to know something per type — the JWS algorithms a wallet token may use, the hash to pair
with a signature, the JWK kty/crv, the joserfc key class, the name operators use in settings, the HSM key
kind that generates such a key — reads it from the row that `profile_of` returns, instead of asking
``isinstance`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from joserfc.jwk import ECKey, OKPKey, RSAKey

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
SignatureHash = hashes.SHA256 | hashes.SHA384


def _sign_ecdsa(key: Any, data: bytes, algorithm: SignatureHash | None) -> bytes:
    return bytes(key.sign(data, ec.ECDSA(cast(hashes.HashAlgorithm, algorithm))))


def _sign_pkcs1v15(key: Any, data: bytes, algorithm: SignatureHash | None) -> bytes:
    return bytes(key.sign(data, padding.PKCS1v15(), algorithm))


def _sign_pure(key: Any, data: bytes, algorithm: SignatureHash | None) -> bytes:
    return bytes(key.sign(data))


@dataclass(frozen=True, slots=True)
class KeyProfile:
    """What KeyBinder does with keys of one type."""

    #: The name in settings (`allowed_key_types`, `issuer_key_type` spells the HSM kind instead).
    name: str
    #: JWK ``kty`` and ``crv`` (no crv for RSA).
    kty: str
    crv: str | None
    #: Algorithms a wallet token or proof of possession signed by such a key may name.
    jws_algs: frozenset[str]
    #: Algorithms a wallet JWK of this type may name in its ``alg`` member (RSA: any RSA hash, as JWKs say).
    jwk_algs: frozenset[str]
    #: The ``alg`` a published JWKS names for an issuer key of this type.
    jwks_alg: str
    #: The hash paired with a signature by such a key (none: Ed25519 signs the message itself).
    hash: SignatureHash | None
    #: The HSM key kind (`hsm.KeyKind` value) that generates an issuer key of this type.
    key_kind: str
    #: The joserfc key class that imports such a key.
    jose_key: type[ECKey] | type[RSAKey] | type[OKPKey]
    #: One signature by a private key of this type with this profile's hash and padding.
    sign_with: Callable[[Any, bytes, SignatureHash | None], bytes]
    #: The elliptic curve, for EC types: its class and the byte length of one coordinate.
    curve: type[ec.EllipticCurve] | None = None
    coordinate_bytes: int = 0

    def jwk(self, public: object) -> dict[str, Any]:
        """The public JWK of ``public`` (a key of this type), as joserfc writes it."""
        # Each joserfc class types its own key class only; the row pairs them.
        return dict(self.jose_key.import_key(cast(Any, public)).as_dict())

    def import_jose(self, public: object) -> ECKey | RSAKey | OKPKey:
        """``public`` (a key of this type) as the joserfc key that verifies its signatures."""
        return self.jose_key.import_key(cast(Any, public))

    def sign(self, key: Any, data: bytes) -> bytes:
        """Sign ``data`` with ``key`` (a private key of this type) the way this profile pairs hash and padding."""
        return self.sign_with(key, data, self.hash)


EC_P256: Final = KeyProfile(
    name="EC-P256",
    kty="EC",
    crv="P-256",
    jws_algs=frozenset({"ES256"}),
    jwk_algs=frozenset({"ES256"}),
    jwks_alg="ES256",
    hash=hashes.SHA256(),
    key_kind="ec-p256",
    jose_key=ECKey,
    sign_with=_sign_ecdsa,
    curve=ec.SECP256R1,
    coordinate_bytes=32,
)
EC_P384: Final = KeyProfile(
    name="EC-P384",
    kty="EC",
    crv="P-384",
    jws_algs=frozenset({"ES384"}),
    jwk_algs=frozenset({"ES384"}),
    jwks_alg="ES384",
    hash=hashes.SHA384(),
    key_kind="ec-p384",
    jose_key=ECKey,
    sign_with=_sign_ecdsa,
    curve=ec.SECP384R1,
    coordinate_bytes=48,
)
RSA: Final = KeyProfile(
    name="RSA",
    kty="RSA",
    crv=None,
    jws_algs=frozenset({"RS256", "PS256"}),
    jwk_algs=frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    jwks_alg="RS256",
    hash=hashes.SHA256(),
    key_kind="rsa-3072",
    jose_key=RSAKey,
    sign_with=_sign_pkcs1v15,
)
ED25519: Final = KeyProfile(
    name="Ed25519",
    kty="OKP",
    crv="Ed25519",
    # "EdDSA" is what wallets send today; "Ed25519" is RFC 9864's fully specified name.
    jws_algs=frozenset({"EdDSA", "Ed25519"}),
    jwk_algs=frozenset({"EdDSA", "Ed25519"}),
    jwks_alg="EdDSA",
    hash=None,
    key_kind="ed25519",
    jose_key=OKPKey,
    sign_with=_sign_pure,
)

#: Every profile, in the order operators see the names (settings, error messages).
PROFILES: Final[tuple[KeyProfile, ...]] = (EC_P256, EC_P384, RSA, ED25519)

#: Every JWS algorithm some profile accepts: a token naming another is refused before any key is looked at.
ALL_JWS_ALGS: Final = frozenset().union(*(p.jws_algs for p in PROFILES))

_EC_BY_CURVE: Final[dict[type[ec.EllipticCurve], KeyProfile]] = {p.curve: p for p in PROFILES if p.curve is not None}


def find_profile(key: object) -> KeyProfile | None:
    """The profile of a public key, or None for a type or curve KeyBinder does not support.

    The one ``isinstance`` dispatch over key types; pass a private key's ``public_key()``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_BY_CURVE.get(type(key.curve))
    if isinstance(key, rsa.RSAPublicKey):
        return RSA
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ED25519
    return None


def profile_of(key: object) -> KeyProfile:
    """The profile of a public key of a supported type; TypeError otherwise (a bug: keys are validated first)."""
    profile = find_profile(key)
    if profile is None:
        raise TypeError(f"unsupported key type {type(key).__name__}")
    return profile


def profile_for_jwk(kty: str, crv: str | None) -> KeyProfile | None:
    """The profile a JWK's kty and crv name (crv ignored for RSA), or None."""
    for profile in PROFILES:
        if profile.kty == kty and (profile.crv is None or profile.crv == crv):
            return profile
    return None
