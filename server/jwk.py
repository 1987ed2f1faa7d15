"""Wallet public keys: strict validation of a JWK into a `cryptography` public key.

joserfc does the JWK parsing; the checks it leaves to the caller (private members, exact
coordinate lengths, key strength, alg/use/key_ops consistency) are made here, before the key
is used for anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import thumbprint as jwk_thumbprint

from server.errors import InvalidPublicKeyError
from server.keyprofiles import ED25519, RSA, PublicKey, profile_for_jwk

WalletPublicKey = PublicKey

MAX_JWK_BYTES = 16_384
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# Ed25519 (RFC 8032): -x^2 + y^2 = 1 + d x^2 y^2 over GF(p).
_ED_P = 2**255 - 19
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P
_ED_SQRT_M1 = pow(2, (_ED_P - 1) // 4, _ED_P)


@dataclass(frozen=True, slots=True)
class WalletKey:
    """A validated wallet public key and its identity."""

    public_key: WalletPublicKey
    kty: str
    #: SHA-256 of the SubjectPublicKeyInfo DER, hex: one value per key whatever its JWK spelling.
    fingerprint: str
    #: RFC 7638 JWK thumbprint (base64url SHA-256), as wallets know their key by it.
    jwk_thumbprint: str


def _b64(value: Any, member: str) -> bytes:
    # The stdlib decoder silently drops characters outside the alphabet; check them first.
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise InvalidPublicKeyError(f"JWK member {member!r} must be a non-empty unpadded base64url string")
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as err:
        raise InvalidPublicKeyError(f"JWK member {member!r} is not valid base64url") from err
    if not decoded:
        raise InvalidPublicKeyError(f"JWK member {member!r} is empty")
    return decoded


def _check_use(jwk: dict[str, Any], algs: frozenset[str]) -> None:
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in algs):
        # Never echo the caller's value: it may be huge, and messages carry no request data.
        raise InvalidPublicKeyError(f"JWK alg must be one of {sorted(algs)} for this key type")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise InvalidPublicKeyError("JWK use must be 'sig' for a wallet signing key")
    ops = jwk.get("key_ops")
    if ops is not None and (
        not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops) or set(ops) - {"verify"}
    ):
        raise InvalidPublicKeyError("JWK key_ops may only contain 'verify'")


_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
#: RFC 7517 section 4 members with a defined type; others are ignored, as the RFC requires.
_STRING_MEMBERS = ("kid", "x5u", "x5t", "x5t#S256")


def _check_registered_members(jwk: dict[str, Any]) -> None:
    for member in _STRING_MEMBERS:
        if member in jwk and not isinstance(jwk[member], str):
            raise InvalidPublicKeyError(f"JWK member {member!r} must be a string")
    x5c = jwk.get("x5c")
    if x5c is not None and (not isinstance(x5c, list) or not all(isinstance(c, str) for c in x5c)):
        raise InvalidPublicKeyError("JWK member 'x5c' must be an array of strings")


def parse_wallet_jwk(text: str) -> WalletKey:
    """Validate ``text`` as a public JWK of an accepted wallet key type, or raise."""
    if not text or not text.strip():
        raise InvalidPublicKeyError("the public key JWK is empty")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JWK_BYTES:
        raise InvalidPublicKeyError(f"the public key JWK exceeds {MAX_JWK_BYTES} bytes")
    try:
        jwk = json.loads(text, object_pairs_hook=_unique_members)
    except _DuplicateMember as err:
        raise InvalidPublicKeyError("the JWK names a member more than once") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, and the int digit-limit ValueError
        raise InvalidPublicKeyError("the public key is not valid JSON") from err
    if not isinstance(jwk, dict):
        raise InvalidPublicKeyError("the public key JWK must be a JSON object")
    private = sorted(_PRIVATE_MEMBERS & jwk.keys())
    if private:
        raise InvalidPublicKeyError(f"the JWK carries private key members {private}; send the public key only")
    kty = jwk.get("kty")
    public: WalletPublicKey
    if kty == "EC":
        public = _ec_key(jwk)
    elif kty == "RSA":
        public = _rsa_key(jwk)
    elif kty == "OKP":
        public = _okp_key(jwk)
    else:
        raise InvalidPublicKeyError("unsupported JWK kty; use EC (P-256, P-384), RSA or OKP (Ed25519)")
    _check_registered_members(jwk)
    # RFC 7638: the hash of the required members only (their values were checked above).
    thumbprint = jwk_thumbprint({m: jwk[m] for m in _THUMBPRINT_MEMBERS[kty]})
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return WalletKey(public, kty, hashlib.sha256(der).hexdigest(), thumbprint)


class _DuplicateMember(Exception):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated names; another parser may keep the first. One meaning only.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _DuplicateMember
    return members


def _ec_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    crv = jwk.get("crv")
    profile = profile_for_jwk("EC", crv) if isinstance(crv, str) else None
    if profile is None or profile.curve is None:
        raise InvalidPublicKeyError("unsupported EC curve; use P-256 or P-384")
    curve, size = profile.curve, profile.coordinate_bytes
    _check_use(jwk, profile.jwk_algs)
    x, y = _b64(jwk.get("x"), "x"), _b64(jwk.get("y"), "y")
    if len(x) != size or len(y) != size:
        raise InvalidPublicKeyError(f"EC {crv} coordinates must be {size} bytes each")
    try:
        # public_key() checks that the point is on the curve.
        return ec.EllipticCurvePublicKey.from_encoded_point(curve(), b"\x04" + x + y)
    except ValueError as err:
        raise InvalidPublicKeyError(f"the EC point is not on curve {crv}") from err


def _primes_below(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, limit, i)))
    return [i for i in range(limit) if sieve[i]]


#: SP 800-89 asks for no prime factor below 752; a larger table costs one gcd all the same.
SMALL_PRIME_LIMIT = 10_000
_SMALL_PRIMES = _primes_below(SMALL_PRIME_LIMIT)
_SMALL_PRIMES_PRODUCT = math.prod(_SMALL_PRIMES)


def _iroot(n: int, k: int) -> int:
    """floor(n ** (1/k)) for a large n: a float estimate good to ~50 bits, then Newton's method on integers
    from just above the root (so a few steps, each decreasing, end on the floor)."""
    shift = max(0, n.bit_length() - 64)
    log2_root = (math.log2(n >> shift) + shift) / k
    whole = int(log2_root)
    if whole < 52:
        x = int(2 ** (log2_root + 1e-9)) + 2
    else:
        x = int(2 ** (log2_root - whole + 52)) << (whole - 52)
        x += (x >> 40) + 1
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x
        x = y


def _is_perfect_power(n: int) -> bool:
    # With no factor below SMALL_PRIME_LIMIT, n = m**k needs m >= SMALL_PRIME_LIMIT: k is at most this.
    if math.isqrt(n) ** 2 == n:
        return True
    largest = n.bit_length() // (SMALL_PRIME_LIMIT.bit_length() - 1)
    return any(_iroot(n, k) ** k == n for k in _primes_below(largest + 1)[1:])


def check_rsa_modulus(n: int) -> None:
    """NIST SP 800-89 partial public-key validation of an RSA modulus (5.3.3): odd, not a perfect power, no
    prime factor below SMALL_PRIME_LIMIT. A modulus with a small factor (n = 3p) lets anyone derive the
    private key and sign as the wallet.

    Not checked: that n is composite (a Miller-Rabin round is a full modular exponentiation, 0.1 s to
    several seconds of CPU for 2048 to 8192 bits here: a lever for anyone sending keys), and ROCA-weak
    moduli (CVE-2017-15361): the only library for it on PyPI (roca-detect) has had no release since 2018.
    """
    if n % 2 == 0:
        raise InvalidPublicKeyError("RSA modulus must be odd")
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise InvalidPublicKeyError(f"RSA modulus has a prime factor below {SMALL_PRIME_LIMIT} (SP 800-89)")
    if _is_perfect_power(n):
        raise InvalidPublicKeyError("RSA modulus is a perfect power (SP 800-89)")


def _rsa_key(jwk: dict[str, Any]) -> rsa.RSAPublicKey:
    _check_use(jwk, RSA.jwk_algs)
    n_bytes, e_bytes = _b64(jwk.get("n"), "n"), _b64(jwk.get("e"), "e")
    if n_bytes[0] == 0 or e_bytes[0] == 0:
        raise InvalidPublicKeyError("RSA n and e must be minimal big-endian integers")
    n, e = int.from_bytes(n_bytes, "big"), int.from_bytes(e_bytes, "big")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise InvalidPublicKeyError(f"RSA modulus must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    if e < 65537 or e % 2 == 0 or e.bit_length() > 256:
        raise InvalidPublicKeyError("RSA public exponent must be odd and at least 65537")
    check_rsa_modulus(n)
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise InvalidPublicKeyError("invalid RSA public key") from err


def _okp_key(jwk: dict[str, Any]) -> ed25519.Ed25519PublicKey:
    if jwk.get("crv") != "Ed25519":
        raise InvalidPublicKeyError("unsupported OKP curve; use Ed25519")
    _check_use(jwk, ED25519.jwk_algs)
    x = _b64(jwk.get("x"), "x")
    if len(x) != 32:
        raise InvalidPublicKeyError("Ed25519 x must be 32 bytes")
    # OpenSSL takes any 32 bytes as an Ed25519 key and only fails when verifying: check the point here.
    point = _ed25519_point(x)
    if point is None:
        raise InvalidPublicKeyError("the Ed25519 key is not a canonically encoded point on the curve")
    if _ed25519_small_order(*point):
        # A small-order key lets one signature verify for many messages: no key of a wallet.
        raise InvalidPublicKeyError("the Ed25519 key is a point of small order")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(x)
    except ValueError as err:
        raise InvalidPublicKeyError("invalid Ed25519 public key") from err


def _ed25519_point(encoded: bytes) -> tuple[int, int] | None:
    """Decode an Ed25519 point (RFC 8032, 5.1.3); None when it is not canonical or not on the curve."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    sign = encoded[31] >> 7
    if y >= _ED_P:
        return None
    u, v = (y * y - 1) % _ED_P, (_ED_D * y * y + 1) % _ED_P
    x2 = u * pow(v, -1, _ED_P) % _ED_P
    x = pow(x2, (_ED_P + 3) // 8, _ED_P)
    if (x * x - x2) % _ED_P:
        x = x * _ED_SQRT_M1 % _ED_P
        if (x * x - x2) % _ED_P:
            return None
    if x == 0 and sign:
        return None
    return (_ED_P - x if x & 1 != sign else x), y


def _ed25519_small_order(x: int, y: int) -> bool:
    """Whether 8 * (x, y) is the neutral element: the eight torsion points, whose keys are worthless."""
    p, d = _ED_P, _ED_D
    px, py, pz = x, y, 1
    for _ in range(3):  # doubling in projective coordinates (the complete addition law, a = -1)
        a = pz * pz % p
        b = a * a % p
        c, e = px * px % p, py * py % p
        f, g = (b - d * c * e) % p, (b + d * c * e) % p
        px, py, pz = a * f * ((px + py) * (px + py) - c - e) % p, a * g * (e + c) % p, f * g % p
    return px == 0 and py == pz
