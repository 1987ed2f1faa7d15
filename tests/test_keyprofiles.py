"""The key-type table: each row describes the keys `profile_of` assigns to it."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from server.keyprofiles import EC_P256, EC_P384, ED25519, PROFILES, RSA, KeyProfile, find_profile, profile_of
from server.policy import KEY_TYPES

PRIVATE_KEYS: dict[str, Any] = {
    "EC-P256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EC-P384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "RSA": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
}


def test_the_settings_name_every_row_in_order() -> None:
    assert KEY_TYPES == tuple(p.name for p in PROFILES) == ("EC-P256", "EC-P384", "RSA", "Ed25519")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_a_key_of_each_type_gets_its_row_and_its_jwk_and_signature_match_it(profile: KeyProfile) -> None:
    private = PRIVATE_KEYS[profile.name]()
    public = private.public_key()
    assert profile_of(public) is profile
    jwk = profile.jwk(public)
    assert (jwk["kty"], jwk.get("crv")) == (profile.kty, profile.crv)
    signature = profile.sign(private, b"data")
    # The signature verifies with the row's own hash and padding: nothing else is assumed.
    if profile is ED25519:
        public.verify(signature, b"data")
    elif profile is RSA:
        public.verify(signature, b"data", padding.PKCS1v15(), profile.hash)
    else:
        assert profile.hash is not None
        public.verify(signature, b"data", ec.ECDSA(profile.hash))
    assert profile.jwks_alg in profile.jws_algs <= profile.jwk_algs


def test_the_rows_differ_where_the_types_do() -> None:
    assert EC_P256.hash is not None
    assert EC_P256.hash.name == "sha256"
    assert EC_P384.hash is not None
    assert EC_P384.hash.name == "sha384"
    assert ED25519.hash is None
    assert RSA.jws_algs == {"RS256", "PS256"}


def test_a_curve_outside_the_table_has_no_profile() -> None:
    public = ec.generate_private_key(ec.SECP521R1()).public_key()
    assert find_profile(public) is None
    assert find_profile("not a key") is None
    with pytest.raises(TypeError, match="unsupported key type"):
        profile_of(public)
