"""Unit tests of `server.jwk.parse_wallet_jwk`: accepted wallet keys and every refusal."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519

from server.errors import InvalidPublicKeyError, Status
from server.jwk import parse_wallet_jwk

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | x25519.X25519PrivateKey
)
PublicKey = (
    ec.EllipticCurvePublicKey
    | rsa.RSAPublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
    | x25519.X25519PublicKey
)
Jwk = dict[str, Any]

# The largest JWK text accepted, in UTF-8 bytes: 16 KiB.
MAX_JWK_BYTES = 16 * 1024

_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
    "ec-secp256k1": ec.SECP256K1(),
}
_JWK_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}
# RFC 7638 §3.2: the required members of each key type, the only ones the thumbprint covers.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
# The P-256 and P-384 field primes, to move a point off its curve.
_FIELD_PRIMES = {"P-256": 2**256 - 2**224 + 2**192 + 2**96 - 1, "P-384": 2**384 - 2**128 - 2**96 + 2**32 - 1}


# -- an independent JWK encoder (no joserfc), so the parser is not checked against itself --


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def uint(value: int, length: int | None = None) -> bytes:
    """Big-endian unsigned bytes: minimal, or exactly ``length`` octets."""
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def generate(kind: str) -> PrivateKey:
    if kind in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[kind])
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind.removeprefix("rsa-")))
    factories: dict[str, Callable[[], PrivateKey]] = {
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
        "x25519": x25519.X25519PrivateKey.generate,
    }
    return factories[kind]()


@functools.cache
def private_key(kind: str) -> PrivateKey:
    """One key per kind for the whole module (RSA generation is the slow part)."""
    return generate(kind)


def public_jwk(public: PublicKey) -> Jwk:
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        nums = public.public_numbers()
        return {
            "kty": "EC",
            "crv": _JWK_CURVE_NAMES[public.curve.name],
            "x": b64u(uint(nums.x, size)),
            "y": b64u(uint(nums.y, size)),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rsa_nums = public.public_numbers()
        return {"kty": "RSA", "n": b64u(uint(rsa_nums.n)), "e": b64u(uint(rsa_nums.e))}
    crv = {
        ed25519.Ed25519PublicKey: "Ed25519",
        ed448.Ed448PublicKey: "Ed448",
        x25519.X25519PublicKey: "X25519",
    }
    name = next(v for k, v in crv.items() if isinstance(public, k))
    return {"kty": "OKP", "crv": name, "x": b64u(public.public_bytes_raw())}


def private_members(key: PrivateKey) -> Jwk:
    """The private members RFC 7518 §6 defines for ``key``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"d": b64u(uint(key.private_numbers().private_value, (key.curve.key_size + 7) // 8))}
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        return {
            "d": b64u(uint(n.d)),
            "p": b64u(uint(n.p)),
            "q": b64u(uint(n.q)),
            "dp": b64u(uint(n.dmp1)),
            "dq": b64u(uint(n.dmq1)),
            "qi": b64u(uint(n.iqmp)),
        }
    return {"d": b64u(key.private_bytes_raw())}


def jwk(kind: str, *, drop: tuple[str, ...] = (), **members: Any) -> Jwk:
    """The public JWK of the module's ``kind`` key, with ``members`` set and ``drop`` removed."""
    out = public_jwk(private_key(kind).public_key())
    out.update(members)
    for name in drop:
        out.pop(name, None)
    return out


def text(kind: str, *, drop: tuple[str, ...] = (), **members: Any) -> str:
    return json.dumps(jwk(kind, drop=drop, **members))


def rfc7638_thumbprint(key: Jwk) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace, base64url."""
    required = {name: key[name] for name in _THUMBPRINT_MEMBERS[key["kty"]]}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64u(hashlib.sha256(canonical.encode("utf-8")).digest())


def spki_der(public: PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def refuse(jwk_text: str) -> InvalidPublicKeyError:
    """Parse ``jwk_text``, which must be refused as invalid_public_key (and nothing else)."""
    with pytest.raises(InvalidPublicKeyError) as info:
        parse_wallet_jwk(jwk_text)
    err = info.value
    assert err.reason == "invalid_public_key"
    assert err.status is Status.INVALID_ARGUMENT
    assert err.message, "the error needs a human sentence"
    return err


# -- accepted keys ----------------------------------------------------------------------------


ACCEPTED = [
    pytest.param("ec-p256", {}, id="ec-p256"),
    pytest.param("ec-p384", {}, id="ec-p384"),
    pytest.param("rsa-2048", {}, id="rsa-2048"),
    pytest.param("rsa-3072", {}, id="rsa-3072"),
    pytest.param("rsa-4096", {}, id="rsa-4096"),
    pytest.param("ed25519", {}, id="ed25519"),
    pytest.param("ec-p256", {"alg": "ES256"}, id="ec-p256-alg-ES256"),
    pytest.param("ec-p384", {"alg": "ES384"}, id="ec-p384-alg-ES384"),
    pytest.param("rsa-2048", {"alg": "RS256"}, id="rsa-2048-alg-RS256"),
    pytest.param("rsa-2048", {"alg": "PS256"}, id="rsa-2048-alg-PS256"),
    pytest.param("rsa-3072", {"alg": "PS256"}, id="rsa-3072-alg-PS256"),
    pytest.param("ed25519", {"alg": "EdDSA"}, id="ed25519-alg-EdDSA"),
    pytest.param("ec-p256", {"use": "sig"}, id="ec-p256-use-sig"),
    pytest.param("rsa-2048", {"use": "sig"}, id="rsa-2048-use-sig"),
    pytest.param("ed25519", {"use": "sig"}, id="ed25519-use-sig"),
    pytest.param("ec-p384", {"key_ops": ["verify"]}, id="ec-p384-key_ops-verify"),
    pytest.param("rsa-2048", {"key_ops": ["verify"]}, id="rsa-2048-key_ops-verify"),
    pytest.param("ed25519", {"key_ops": ["verify"]}, id="ed25519-key_ops-verify"),
    pytest.param("ec-p256", {"kid": "wallet-key-1"}, id="ec-p256-kid"),
    pytest.param("rsa-2048", {"kid": "wallet-key-1"}, id="rsa-2048-kid"),
    pytest.param("ed25519", {"kid": "wallet-key-1"}, id="ed25519-kid"),
    pytest.param("ec-p256", {"alg": "ES256", "use": "sig", "kid": "k"}, id="ec-p256-alg-use-kid"),
    pytest.param("rsa-2048", {"alg": "RS256", "key_ops": ["verify"], "kid": "k"}, id="rsa-2048-alg-key_ops-kid"),
    pytest.param("ed25519", {"alg": "EdDSA", "use": "sig", "kid": "k"}, id="ed25519-alg-use-kid"),
]


@pytest.mark.parametrize(("kind", "members"), ACCEPTED)
def test_accepts_wallet_key(kind: str, members: Jwk) -> None:
    key = jwk(kind, **members)
    expected = private_key(kind).public_key()

    parsed = parse_wallet_jwk(json.dumps(key))

    assert parsed.kty == key["kty"]
    assert parsed.public_key == expected
    assert spki_der(parsed.public_key) == spki_der(expected)
    assert parsed.fingerprint == hashlib.sha256(spki_der(expected)).hexdigest()
    assert parsed.jwk_thumbprint == rfc7638_thumbprint(key)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_identity_ignores_json_spelling_and_optional_members(kind: str) -> None:
    plain = parse_wallet_jwk(text(kind))
    key = jwk(kind, kid="another-name", use="sig")
    respelled = json.dumps(dict(reversed(list(key.items()))), indent=4)

    again = parse_wallet_jwk(respelled)

    assert (again.fingerprint, again.jwk_thumbprint) == (plain.fingerprint, plain.jwk_thumbprint)


def test_thumbprint_matches_rfc7638_example() -> None:
    """The RFC 7638 §3.1 example key, to check the reference computation above as well."""
    key = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
        "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZg"
        "nYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw"
        "0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    published = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

    assert rfc7638_thumbprint(key) == published
    assert parse_wallet_jwk(json.dumps(key)).jwk_thumbprint == published


def test_accepts_jwk_of_exactly_the_size_limit() -> None:
    base = text("ec-p256")
    at_limit = base + " " * (MAX_JWK_BYTES - len(base.encode()))
    assert len(at_limit.encode()) == MAX_JWK_BYTES

    assert parse_wallet_jwk(at_limit).kty == "EC"


# -- refused: not a JWK at all ------------------------------------------------------------------


def _valid_with_nested_member(depth: int) -> str:
    base = text("ec-p256")
    return base[:-1] + ', "ext": ' + "[" * depth + "]" * depth + "}"


NOT_A_JWK = [
    pytest.param("", id="empty"),
    pytest.param("   \n\t ", id="whitespace"),
    pytest.param("not json", id="not-json"),
    pytest.param("{'kty': 'EC'}", id="python-literal"),
    pytest.param('{"kty": "EC",', id="truncated-json"),
    pytest.param("[]", id="json-array"),
    pytest.param('"EC"', id="json-string"),
    pytest.param("42", id="json-number"),
    pytest.param("null", id="json-null"),
    pytest.param("true", id="json-true"),
    pytest.param("[" * 100_000, id="nested-arrays-100000"),
    pytest.param("[" * 10_000, id="nested-arrays-10000-under-size-limit"),
    pytest.param("[" * 5_000 + "]" * 5_000, id="balanced-nested-arrays-5000"),
    pytest.param('{"a":' * 3_000, id="nested-objects-3000"),
    pytest.param(
        "{" + '"kty": "EC", "x": ' + "[" * 5_000 + "]" * 5_000 + "}",
        id="nested-member-5000",
    ),
]


@pytest.mark.parametrize("jwk_text", NOT_A_JWK)
def test_refuses_non_jwk_text(jwk_text: str) -> None:
    # A RecursionError (or any other exception) escaping here would fail the test.
    refuse(jwk_text)


def test_refuses_deeply_nested_member_of_an_otherwise_valid_jwk() -> None:
    refuse(_valid_with_nested_member(5_000))


@pytest.mark.parametrize(
    ("kid", "chars_within_limit"),
    [
        pytest.param(lambda room: "x" * (room + 1), False, id="one-byte-over"),
        pytest.param(lambda room: "x" * (4 * MAX_JWK_BYTES), False, id="far-over"),
        # Fewer characters than the limit, more UTF-8 bytes: the limit is on bytes.
        pytest.param(lambda room: "\u00e9" * (room // 2 + 1), True, id="multibyte-over-in-bytes"),
    ],
)
def test_refuses_jwk_over_size_limit(kid: Callable[[int], str], chars_within_limit: bool) -> None:
    base = jwk("ec-p256", kid="")
    room = MAX_JWK_BYTES - len(json.dumps(base, ensure_ascii=False).encode())
    oversized = json.dumps({**base, "kid": kid(room)}, ensure_ascii=False)
    assert len(oversized.encode()) > MAX_JWK_BYTES
    assert (len(oversized) <= MAX_JWK_BYTES) is chars_within_limit

    err = refuse(oversized)
    assert str(MAX_JWK_BYTES) in err.message


# -- refused: key type and curve ----------------------------------------------------------------


KTY_AND_CURVE = [
    pytest.param(lambda: text("ec-p256", drop=("kty",)), id="missing-kty"),
    pytest.param(lambda: text("ec-p256", kty=None), id="kty-null"),
    pytest.param(lambda: text("ec-p256", kty="ec"), id="kty-lowercase-ec"),
    pytest.param(lambda: text("ec-p256", kty="XYZ"), id="kty-unknown"),
    pytest.param(lambda: json.dumps({"kty": "oct", "alg": "HS256"}), id="kty-oct-without-k"),
    pytest.param(lambda: text("ec-p521"), id="ec-P-521"),
    pytest.param(lambda: text("ec-secp256k1"), id="ec-secp256k1"),
    pytest.param(lambda: text("ec-p256", drop=("crv",)), id="ec-missing-crv"),
    pytest.param(lambda: text("ec-p256", crv="p-256"), id="ec-crv-lowercase"),
    pytest.param(lambda: text("ec-p256", crv="Ed25519"), id="ec-crv-Ed25519"),
    pytest.param(lambda: text("x25519"), id="okp-X25519"),
    pytest.param(lambda: text("ed448"), id="okp-Ed448"),
    pytest.param(lambda: text("ed25519", drop=("crv",)), id="okp-missing-crv"),
    pytest.param(lambda: text("ed25519", crv="P-256"), id="okp-crv-P-256"),
    pytest.param(lambda: text("ed25519", kty="EC"), id="ed25519-key-as-kty-EC"),
]


@pytest.mark.parametrize("make", KTY_AND_CURVE)
def test_refuses_unsupported_key_type_or_curve(make: Callable[[], str]) -> None:
    refuse(make())


# -- refused: private members ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        pytest.param("ec-p256", ("d",), id="ec-p256-d"),
        pytest.param("ec-p384", ("d",), id="ec-p384-d"),
        pytest.param("ed25519", ("d",), id="ed25519-d"),
        pytest.param("rsa-2048", ("d",), id="rsa-d"),
        pytest.param("rsa-2048", ("p",), id="rsa-p"),
        pytest.param("rsa-2048", ("q",), id="rsa-q"),
        pytest.param("rsa-2048", ("dp",), id="rsa-dp"),
        pytest.param("rsa-2048", ("dq",), id="rsa-dq"),
        pytest.param("rsa-2048", ("qi",), id="rsa-qi"),
        pytest.param("rsa-2048", ("d", "p", "q", "dp", "dq", "qi"), id="rsa-full-private-jwk"),
    ],
)
def test_refuses_private_members_without_echoing_them(kind: str, names: tuple[str, ...]) -> None:
    secrets_ = private_members(private_key(kind))
    leaked = {name: secrets_[name] for name in names}

    err = refuse(text(kind, **leaked))

    shown = " ".join([str(err), repr(err), err.message, *err.metadata.values()])
    for name, value in leaked.items():
        assert value not in shown, f"the error echoes private member {name!r}"
        assert value[:16] not in shown, f"the error echoes part of private member {name!r}"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: json.dumps({"kty": "oct", "k": k}), id="oct-k"),
        pytest.param(lambda k: json.dumps({"kty": "oct", "k": k, "alg": "HS256", "use": "sig"}), id="oct-k-hs256"),
        pytest.param(lambda k: text("ec-p256", k=k), id="ec-with-k"),
        pytest.param(lambda k: text("rsa-2048", oth=[{"r": k, "d": k, "t": k}]), id="rsa-oth"),
    ],
)
def test_refuses_symmetric_key_material_without_echoing_it(make: Callable[[str], str]) -> None:
    secret = b64u(hashlib.sha256(b"a symmetric test key").digest())

    err = refuse(make(secret))

    assert secret not in f"{err} {err!r} {err.metadata}"


# -- refused: EC coordinates -----------------------------------------------------------------


def _ec_coordinate(kind: str, member: str, transform: Callable[[bytes], bytes]) -> str:
    key = jwk(kind)
    key[member] = b64u(transform(b64u_decode(key[member])))
    return json.dumps(key)


def _off_curve(kind: str) -> str:
    key = jwk(kind)
    prime = _FIELD_PRIMES[key["crv"]]
    y = b64u_decode(key["y"])
    return text(kind, y=b64u(uint((int.from_bytes(y, "big") + 1) % prime, len(y))))


def _with_urlsafe_chars(kind: str, member: str) -> Jwk:
    """A fresh key whose ``member`` encoding contains '-' or '_' (so standard base64 differs)."""
    for _ in range(200):
        key = public_jwk(generate(kind).public_key())
        if "-" in key[member] or "_" in key[member]:
            return key
    raise AssertionError(f"no {kind} key with '-' or '_' in {member}")  # pragma: no cover


def _standard_base64(kind: str, member: str) -> str:
    key = _with_urlsafe_chars(kind, member)
    key[member] = key[member].replace("-", "+").replace("_", "/")
    return json.dumps(key)


def _padded(kind: str, member: str) -> str:
    key = jwk(kind)
    raw = b64u_decode(key[member])
    key[member] = base64.urlsafe_b64encode(raw).decode("ascii")
    assert key[member].endswith("="), "pick a member whose length needs padding"
    return json.dumps(key)


def _with_inserted(kind: str, member: str, junk: str) -> str:
    key = jwk(kind)
    key[member] = key[member][:8] + junk + key[member][8:]
    return json.dumps(key)


EC_COORDINATES = [
    pytest.param(lambda: _ec_coordinate("ec-p256", "x", lambda b: b[1:]), id="p256-x-31-bytes"),
    pytest.param(lambda: _ec_coordinate("ec-p256", "x", lambda b: b"\0" + b), id="p256-x-33-bytes"),
    pytest.param(lambda: _ec_coordinate("ec-p256", "y", lambda b: b[1:]), id="p256-y-31-bytes"),
    pytest.param(lambda: _ec_coordinate("ec-p256", "y", lambda b: b"\0" + b), id="p256-y-33-bytes"),
    pytest.param(lambda: _ec_coordinate("ec-p384", "x", lambda b: b[16:]), id="p384-x-32-bytes"),
    pytest.param(lambda: _ec_coordinate("ec-p384", "y", lambda b: b"\0" + b), id="p384-y-49-bytes"),
    pytest.param(lambda: text("ec-p256", crv="P-384"), id="p256-coordinates-labelled-P-384"),
    pytest.param(lambda: text("ec-p384", crv="P-256"), id="p384-coordinates-labelled-P-256"),
    pytest.param(lambda: text("ec-p256", drop=("x",)), id="missing-x"),
    pytest.param(lambda: text("ec-p256", drop=("y",)), id="missing-y"),
    pytest.param(lambda: text("ec-p256", x=""), id="empty-x"),
    pytest.param(lambda: text("ec-p256", y=None), id="y-null"),
    pytest.param(lambda: text("ec-p256", x=12345), id="x-number"),
    pytest.param(lambda: _off_curve("ec-p256"), id="p256-point-off-curve-y-plus-1"),
    pytest.param(lambda: _off_curve("ec-p384"), id="p384-point-off-curve-y-plus-1"),
    pytest.param(lambda: text("ec-p256", x=b64u(bytes(32)), y=b64u(bytes(32))), id="p256-point-0-0"),
]


@pytest.mark.parametrize("make", EC_COORDINATES)
def test_refuses_bad_ec_point(make: Callable[[], str]) -> None:
    refuse(make())


ENCODING = [
    pytest.param(lambda: _padded("ec-p256", "x"), id="ec-x-padded"),
    pytest.param(lambda: _padded("rsa-2048", "n"), id="rsa-n-padded"),
    pytest.param(lambda: _padded("ed25519", "x"), id="ed25519-x-padded"),
    pytest.param(lambda: text("rsa-2048", e="AQAB===="), id="rsa-e-over-padded"),
    pytest.param(lambda: _standard_base64("ec-p256", "y"), id="ec-y-standard-base64"),
    pytest.param(lambda: _standard_base64("rsa-2048", "n"), id="rsa-n-standard-base64"),
    pytest.param(lambda: _standard_base64("ed25519", "x"), id="ed25519-x-standard-base64"),
    pytest.param(lambda: _with_inserted("ec-p256", "x", "."), id="ec-x-with-dot"),
    pytest.param(lambda: _with_inserted("ec-p256", "x", " "), id="ec-x-with-space"),
    pytest.param(lambda: _with_inserted("ec-p256", "x", "\n"), id="ec-x-with-newline"),
    pytest.param(lambda: _with_inserted("ec-p256", "x", "...."), id="ec-x-with-four-dots"),
    pytest.param(lambda: _with_inserted("rsa-2048", "n", "!!!!"), id="rsa-n-with-four-bangs"),
    pytest.param(lambda: _with_inserted("ed25519", "x", "$"), id="ed25519-x-with-dollar"),
]


@pytest.mark.parametrize("make", ENCODING)
def test_refuses_values_that_are_not_unpadded_base64url(make: Callable[[], str]) -> None:
    refuse(make())


# -- refused: RSA ----------------------------------------------------------------------------


def _rsa_numbers(kind: str = "rsa-2048") -> tuple[int, int]:
    key = private_key(kind).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    nums = key.public_numbers()
    return nums.n, nums.e


def _rsa(n: int | bytes | None = None, e: int | bytes | None = None) -> str:
    """The module's RSA-2048 JWK with ``n`` and/or ``e`` replaced (ints minimal, bytes verbatim)."""
    members: Jwk = {}
    for name, value in (("n", n), ("e", e)):
        if value is not None:
            members[name] = b64u(value if isinstance(value, bytes) else uint(value))
    return text("rsa-2048", **members)


def _odd_modulus(bits: int) -> int:
    """An odd integer of exactly ``bits`` bits that passes SP 800-89's partial validation (no factor below
    10,000, not a perfect power): the parser cannot tell it from a real modulus."""
    candidate = (1 << (bits - 1)) | (1 << 64) | 1
    while math.gcd(candidate, math.prod(range(3, 10_000, 2))) != 1:
        candidate += 2
    return candidate


RSA_KEYS = [
    pytest.param(lambda: text("rsa-1024"), id="modulus-1024-bits"),
    pytest.param(lambda: text("rsa-2047"), id="modulus-2047-bits"),
    pytest.param(lambda: _rsa(n=_odd_modulus(8193)), id="modulus-8193-bits"),
    pytest.param(lambda: _rsa(n=_odd_modulus(16384)), id="modulus-16384-bits"),
    pytest.param(lambda: _rsa(e=65538), id="exponent-even-65538"),
    pytest.param(lambda: _rsa(e=2**16), id="exponent-even-65536"),
    pytest.param(lambda: _rsa(e=3), id="exponent-3"),
    pytest.param(lambda: _rsa(e=1), id="exponent-1"),
    pytest.param(lambda: _rsa(e=b"\0"), id="exponent-0"),
    pytest.param(lambda: _rsa(e=2**257 + 1), id="exponent-over-256-bits"),
    pytest.param(lambda: _rsa(e=b"\0\x01\x00\x01"), id="exponent-leading-zero-byte"),
    pytest.param(lambda: _rsa(n=b"\0" + uint(_rsa_numbers()[0])), id="modulus-leading-zero-byte"),
    pytest.param(lambda: _rsa(n=_rsa_numbers()[0] - 1), id="modulus-even"),
    pytest.param(lambda: text("rsa-2048", drop=("n",)), id="missing-n"),
    pytest.param(lambda: text("rsa-2048", drop=("e",)), id="missing-e"),
    pytest.param(lambda: text("rsa-2048", e=65537), id="exponent-json-number"),
]


@pytest.mark.parametrize("make", RSA_KEYS)
def test_refuses_weak_or_malformed_rsa_key(make: Callable[[], str]) -> None:
    refuse(make())


def test_rsa_modulus_upper_bound_is_8192_bits() -> None:
    n, _ = _rsa_numbers()
    assert n.bit_length() == 2048
    assert parse_wallet_jwk(_rsa(n=_odd_modulus(8192))).kty == "RSA"
    refuse(_rsa(n=_odd_modulus(8193)))


# -- refused: OKP ----------------------------------------------------------------------------


OKP_KEYS = [
    pytest.param(lambda: text("ed25519", x=b64u(b64u_decode(jwk("ed25519")["x"])[1:])), id="ed25519-x-31-bytes"),
    pytest.param(lambda: text("ed25519", x=b64u(b64u_decode(jwk("ed25519")["x"]) + b"\0")), id="ed25519-x-33-bytes"),
    pytest.param(lambda: text("ed25519", x=b64u(bytes(64))), id="ed25519-x-64-bytes"),
    pytest.param(lambda: text("ed25519", drop=("x",)), id="ed25519-missing-x"),
    pytest.param(lambda: text("ed25519", x=""), id="ed25519-empty-x"),
]


@pytest.mark.parametrize("make", OKP_KEYS)
def test_refuses_bad_ed25519_key(make: Callable[[], str]) -> None:
    refuse(make())


# -- refused: alg / use / key_ops inconsistent with a wallet signing key -------------------------


USAGE = [
    pytest.param("ec-p384", {"alg": "ES256"}, id="ES256-on-P-384"),
    pytest.param("ec-p256", {"alg": "ES384"}, id="ES384-on-P-256"),
    pytest.param("ec-p256", {"alg": "es256"}, id="lowercase-es256-on-P-256"),
    pytest.param("ec-p256", {"alg": "RS256"}, id="RS256-on-EC"),
    pytest.param("ec-p256", {"alg": "EdDSA"}, id="EdDSA-on-EC"),
    pytest.param("rsa-2048", {"alg": "EdDSA"}, id="EdDSA-on-RSA"),
    pytest.param("rsa-2048", {"alg": "ES256"}, id="ES256-on-RSA"),
    pytest.param("rsa-2048", {"alg": "RSA-OAEP-256"}, id="RSA-OAEP-256-on-RSA"),
    pytest.param("ed25519", {"alg": "ES256"}, id="ES256-on-Ed25519"),
    pytest.param("ed25519", {"alg": "RS256"}, id="RS256-on-Ed25519"),
    pytest.param("ec-p256", {"alg": "none"}, id="none-on-EC"),
    pytest.param("rsa-2048", {"alg": "none"}, id="none-on-RSA"),
    pytest.param("ed25519", {"alg": "none"}, id="none-on-Ed25519"),
    pytest.param("ec-p256", {"alg": "HS256"}, id="HS256-on-EC"),
    pytest.param("rsa-2048", {"alg": "HS256"}, id="HS256-on-RSA"),
    pytest.param("ed25519", {"alg": "HS256"}, id="HS256-on-Ed25519"),
    pytest.param("ec-p256", {"alg": ""}, id="empty-alg"),
    pytest.param("ec-p256", {"alg": 7}, id="alg-number"),
    pytest.param("ec-p256", {"use": "enc"}, id="use-enc-on-EC"),
    pytest.param("rsa-2048", {"use": "enc"}, id="use-enc-on-RSA"),
    pytest.param("ed25519", {"use": "enc"}, id="use-enc-on-Ed25519"),
    pytest.param("ec-p256", {"use": "SIG"}, id="use-uppercase-SIG"),
    pytest.param("ec-p256", {"key_ops": ["sign"]}, id="key_ops-sign"),
    pytest.param("rsa-2048", {"key_ops": ["verify", "sign"]}, id="key_ops-verify-and-sign"),
    pytest.param("ed25519", {"key_ops": ["sign", "verify"]}, id="key_ops-sign-and-verify-ed25519"),
    pytest.param("ec-p256", {"key_ops": []}, id="key_ops-empty-list"),
    pytest.param("rsa-2048", {"key_ops": ["encrypt"]}, id="key_ops-encrypt"),
    pytest.param("rsa-2048", {"key_ops": ["verify", "wrapKey"]}, id="key_ops-verify-and-wrapKey"),
    pytest.param("ec-p256", {"key_ops": "verify"}, id="key_ops-string-not-list"),
    pytest.param("ec-p256", {"kid": 5}, id="kid-number"),
]


@pytest.mark.parametrize(("kind", "members"), USAGE)
def test_refuses_alg_use_or_key_ops_unfit_for_the_key(kind: str, members: Jwk) -> None:
    refuse(text(kind, **members))


# -- known defects: inputs that escape as a crash instead of invalid_public_key -----------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: text("ec-p256", crv=["P-256"]),
            id="ec-crv-list",
        ),
        pytest.param(
            lambda: text("ec-p256", crv={}),
            id="ec-crv-object",
        ),
        pytest.param(
            lambda: text("ec-p256", alg=["ES256"]),
            id="ec-alg-list",
        ),
        pytest.param(
            lambda: text("rsa-2048", alg={"name": "RS256"}),
            id="rsa-alg-object",
        ),
        pytest.param(
            lambda: text("ed25519", key_ops=[["verify"]]),
            id="ed25519-key_ops-nested-list",
        ),
        pytest.param(
            lambda: text("rsa-2048", n="!!!!"),
            id="rsa-n-only-non-alphabet",
        ),
        pytest.param(
            lambda: text("rsa-2048", e="...."),
            id="rsa-e-only-non-alphabet",
        ),
    ],
)
def test_refuses_wrongly_typed_members_without_crashing(make: Callable[[], str]) -> None:
    refuse(make())


# -- NIST SP 800-89 partial public-key validation of RSA moduli (issue 13, item 5) ------------------


@functools.cache
def _prime(bits: int) -> int:
    """A random prime of exactly ``bits`` bits (one factor of a fresh RSA key of twice the size)."""
    key = rsa.generate_private_key(65537, 2 * bits)
    p = key.private_numbers().p
    assert p.bit_length() == bits
    return p


def _rsa_jwk(n: int) -> str:
    return json.dumps({"kty": "RSA", "n": b64u(uint(n)), "e": b64u(uint(65537))})


WEAK_MODULI = {
    "3-times-a-prime": lambda: 3 * _prime(2047),
    "751-times-a-prime": lambda: 751 * _prime(2044),
    "a-small-prime-times-a-prime": lambda: 9973 * _prime(2040),
    "a-prime-squared": lambda: _prime(1152) ** 2,
    "a-prime-cubed": lambda: _prime(768) ** 3,
}


@pytest.mark.parametrize("case", sorted(WEAK_MODULI))
def test_rsa_modulus_failing_sp800_89_partial_validation_is_refused(case: str) -> None:
    n = WEAK_MODULI[case]()
    assert 2048 <= n.bit_length() <= 8192
    err = refuse(_rsa_jwk(n))
    assert "modulus" in str(err)


def test_a_sound_rsa_modulus_still_passes() -> None:
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    assert parse_wallet_jwk(_rsa_jwk(n)).kty == "RSA"
