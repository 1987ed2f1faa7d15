"""Tests of the PKCS#11 layer (hsm/) against real modules, no mocks.

Every test that touches a token runs on each backend (tests/hsm_backends.py): SoftHSM2 in-process,
the same SoftHSM2 token behind p11-kit remoting, and openCryptoki's software token. A key kind a
backend lacks is not skipped: `test_backend_mechanisms` proves the mechanism is missing and the
session summary reports it with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11err
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed
from cryptography.x509.oid import NameOID

from hsm import (
    HsmConfigError,
    HsmError,
    HsmUnavailableError,
    KeyExistsError,
    KeyInspector,
    KeyKind,
    KeyNotFoundError,
    MacKeyManager,
    MechanismNotSupportedError,
    PinIncorrectError,
    Pkcs11KeyManager,
    Pkcs11Uri,
    PublicKey,
    TokenNotFoundError,
)
from hsm.provision import init_token, token_exists
from hsm.session import translate
from hsm.signer import HsmEcPrivateKey, HsmEd25519PrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.uri import MODULE_ENV_ATTR, apply_module_env
from server.config import Settings
from tests.hsm_backends import (
    BACKENDS,
    HMAC_MECHANISMS,
    KIND_MECHANISMS,
    MULTI_TOKEN_BACKENDS,
    UNSUPPORTED_KINDS,
    UNSUPPORTED_REPORT,
    HsmBackend,
)

ISSUER_LABEL = "keybinder-issuer"
HMAC_LABEL = "keybinder-hmac"
REPO_ROOT = Path(__file__).resolve().parents[1]

#: The hash each kind signs with by default (None: Ed25519 hashes internally).
KIND_HASH: dict[KeyKind, hashes.HashAlgorithm | None] = {
    KeyKind.EC_P256: hashes.SHA256(),
    KeyKind.EC_P384: hashes.SHA384(),
    KeyKind.RSA_3072: hashes.SHA256(),
    KeyKind.ED25519: None,
}
KIND_KEY_TYPE = {
    KeyKind.EC_P256: "EC",
    KeyKind.EC_P384: "EC",
    KeyKind.RSA_3072: "RSA",
    KeyKind.ED25519: "EC_EDWARDS",
}
ALL_KINDS = list(KeyKind)
EC_KINDS = [KeyKind.EC_P256, KeyKind.EC_P384]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every token test on every backend, with the key kinds (``@pytest.mark.kinds``) it supports."""
    if "hsm_backend" not in metafunc.fixturenames:
        return
    backends = MULTI_TOKEN_BACKENDS if "second_token" in metafunc.fixturenames else BACKENDS
    marker = metafunc.definition.get_closest_marker("kinds")
    if marker is None:
        metafunc.parametrize("hsm_backend", backends, indirect=True, scope="module")
        return
    pairs = [(b, k) for b in backends for k in marker.args if k not in UNSUPPORTED_KINDS.get(b, {})]
    metafunc.parametrize(
        ("hsm_backend", "kind"), pairs, indirect=["hsm_backend"], scope="module", ids=[f"{b}-{k}" for b, k in pairs]
    )


# -- helpers ------------------------------------------------------------------------------


def der(public: PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(signer: HsmPrivateKey, data: bytes, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    """Sign with the natural scheme of the signer's key type."""
    if isinstance(signer, HsmEcPrivateKey):
        return signer.sign(data, ec.ECDSA(algorithm or hashes.SHA256()))
    if isinstance(signer, HsmRsaPrivateKey):
        return signer.sign(data, padding.PKCS1v15(), algorithm or hashes.SHA256())
    return signer.sign(data)


def verify(public: PublicKey, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None = None) -> None:
    """Verify with `cryptography`; raises InvalidSignature on mismatch."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(algorithm or hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), algorithm or hashes.SHA256())
    else:
        public.verify(signature, data)


def self_signed(signer: HsmPrivateKey, algorithm: hashes.HashAlgorithm | None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KeyBinder HSM test")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if algorithm is None:
        return builder.sign(signer, None)
    assert isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512)
    return builder.sign(signer, algorithm)


def assert_no_secret(err: BaseException, *secrets_: str) -> None:
    """Neither the error nor anything in its cause chain mentions a secret."""
    seen: BaseException | None = err
    while seen is not None:
        text = f"{seen!s} {seen!r}"
        for secret in secrets_:
            assert secret not in text, f"secret leaked into {type(seen).__name__}: {text}"
        seen = seen.__cause__ or seen.__context__


@dataclass(frozen=True)
class GeneratedKey:
    label: str
    kind: KeyKind
    public: PublicKey


@dataclass(frozen=True)
class SecondToken:
    """An extra token with a known user PIN, for PIN and cross-token tests."""

    label: str
    pin: str
    uri: Pkcs11Uri
    key_label: str
    tmp: Path

    def uri_with_pin(self, pin: str) -> Pkcs11Uri:
        path = self.tmp / f"pin-{secrets.token_hex(4)}"
        path.write_text(pin + "\n")
        return Pkcs11Uri(
            token=self.label,
            module_path=self.uri.module_path,
            pin_source=f"file:{path}",
            module_env=self.uri.module_env,
        )


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_pin(settings: Settings) -> str:
    return settings.pin_file.read_text().strip()


@pytest.fixture
def manager(hsm_backend: HsmBackend) -> Iterator[Pkcs11KeyManager]:
    m = Pkcs11KeyManager(hsm_backend.uri)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def generated(hsm_backend: HsmBackend) -> Iterator[dict[KeyKind, GeneratedKey]]:
    """One fresh key of every kind the backend supports on its main token, with unique labels."""
    m = Pkcs11KeyManager(hsm_backend.uri)
    suffix = secrets.token_hex(4)
    try:
        keys = {}
        for kind in hsm_backend.kinds:
            label = f"test-{kind}-{suffix}"
            keys[kind] = GeneratedKey(label, kind, m.create_key(label, kind))
        yield keys
    finally:
        m.close()


@pytest.fixture(scope="module")
def second_token(hsm_backend: HsmBackend, tmp_path_factory: pytest.TempPathFactory) -> SecondToken:
    label = f"kb-wrongpin-{secrets.token_hex(4)}"
    pin = secrets.token_hex(8)
    assert hsm_backend.so_pin is not None
    init_token(hsm_backend.uri, label, so_pin=hsm_backend.so_pin, user_pin=pin)
    tmp = tmp_path_factory.mktemp("second-token")
    pin_file = tmp / "pin"
    pin_file.write_text(pin + "\n")
    uri = hsm_backend.token_uri(label, f"file:{pin_file}")
    m = Pkcs11KeyManager(uri)
    try:
        m.create_key("second-p256", KeyKind.EC_P256)
    finally:
        m.close()
    return SecondToken(label, pin, uri, "second-p256", tmp)


# -- 1. URIs and PIN sources ----------------------------------------------------------------


def test_parse_full_uri_with_file_pin_source() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=keybinder;object=keybinder-issuer"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/hsm-pin"
    )
    assert uri == Pkcs11Uri(
        token="keybinder",
        module_path="/usr/lib/softhsm/libsofthsm2.so",
        object="keybinder-issuer",
        pin_source="file:/run/secrets/hsm-pin",
    )
    assert uri.id is None


def test_parse_env_pin_source_and_optional_object() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t?module-path=/m.so&pin-source=env:KB_PIN")
    assert (uri.token, uri.object, uri.module_path, uri.pin_source) == ("t", None, "/m.so", "env:KB_PIN")


def test_parse_percent_encoding() -> None:
    text = (
        "pkcs11:token=My%20Token;object=issuer%3Bkey%2Fv%C3%A9"
        "?module-path=/opt/hsm%20lib/p11.so&pin-source=file:/tmp/a%26b%3Fc"
    )
    uri = Pkcs11Uri.parse(text)
    assert uri.token == "My Token"
    assert uri.object == "issuer;key/vé"
    assert uri.module_path == "/opt/hsm lib/p11.so"
    assert uri.pin_source == "file:/tmp/a&b?c"
    assert str(uri) == text
    assert Pkcs11Uri.parse(str(uri)) == uri


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:token=keybinder?module-path=/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11:token=keybinder;object=k?module-path=/m.so&pin-source=env:PIN",
        "pkcs11:token=a%20b;object=%3B%26%3F%3D?module-path=/x%20y/m.so&pin-source=file:/p%20q",
    ],
)
def test_str_round_trips(text: str) -> None:
    uri = Pkcs11Uri.parse(text)
    assert str(uri) == text
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_settings_uri_round_trips_and_with_object(settings: Settings) -> None:
    uri = settings.pkcs11_uri
    assert uri.object == ISSUER_LABEL
    assert Pkcs11Uri.parse(str(uri)) == uri
    other = uri.with_object("another key")
    assert (other.token, other.module_path, other.pin_source) == (uri.token, uri.module_path, uri.pin_source)
    assert other.object == "another key"
    assert "object=another%20key" in str(other)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("pkcs11:token=t;object=k?module-path=/m.so&pin-value=SECRET1234", "pin-value"),
        ("pkcs11:token=t?pin-value=SECRET1234&module-path=/m.so", "pin-value"),
        ("pkcs11:object=k?module-path=/m.so", "token"),
        ("pkcs11:?module-path=/m.so", "token"),
        ("pkcs11:token=t;object=k", "module-path"),
        ("pkcs11:token=t?pin-source=env:X", "module-path"),
        ("pkcs11:token=t;slot-id=3?module-path=/m.so", "slot-id"),
        ("pkcs11:token=t?module-path=/m.so&pin-hint=x", "pin-hint"),
        ("pkcs11:token?module-path=/m.so", "token"),
        ("pkcs11:token=t?module-path", "module-path"),
        ("pkcs12:token=t?module-path=/m.so", "pkcs11:"),
        ("https://example.org/?token=t&module-path=/m.so", "pkcs11:"),
        ("", "pkcs11:"),
    ],
)
def test_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(HsmConfigError) as info:
        Pkcs11Uri.parse(text)
    assert fragment in str(info.value)
    assert_no_secret(info.value, "SECRET1234")


def test_parse_percent_encoded_id() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=k;id=%01%02%ff?module-path=/m.so")
    assert uri.id == b"\x01\x02\xff"


def test_parse_rejects_repeated_attribute() -> None:
    with pytest.raises(HsmConfigError):
        Pkcs11Uri.parse("pkcs11:token=a;token=b?module-path=/m.so")


def test_read_pin_from_file_bare_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("  482913\n")
    assert Pkcs11Uri("t", "/m.so", pin_source=f"file:{pin_file}").read_pin() == "482913"
    assert Pkcs11Uri("t", "/m.so", pin_source=str(pin_file)).read_pin() == "482913"
    # Through the URI text too, so the percent-decoding of pin-source is exercised.
    spaced = tmp_path / "pin file"
    spaced.write_text("771100")
    uri = Pkcs11Uri.parse(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{tmp_path}/pin%20file")
    assert uri.read_pin() == "771100"
    monkeypatch.setenv("KB_TEST_HSM_PIN", "335577")
    assert Pkcs11Uri.parse("pkcs11:token=t?module-path=/m.so&pin-source=env:KB_TEST_HSM_PIN").read_pin() == "335577"


def test_read_pin_errors_do_not_leak_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main_pin: str) -> None:
    sentinel = "918273645"
    monkeypatch.setenv("KB_TEST_SENTINEL", sentinel)
    monkeypatch.delenv("KB_TEST_UNSET_PIN", raising=False)
    monkeypatch.setenv("KB_TEST_EMPTY_PIN", "")
    empty = tmp_path / "empty"
    empty.write_text(" \n\t\n")
    sources: list[str | None] = [
        f"file:{tmp_path / 'missing'}",
        str(tmp_path / "missing"),
        f"file:{empty}",
        f"file:{tmp_path}",  # a directory
        "env:KB_TEST_UNSET_PIN",
        "env:KB_TEST_EMPTY_PIN",
        None,
    ]
    for source in sources:
        with pytest.raises(HsmConfigError) as info:
            Pkcs11Uri("t", "/m.so", pin_source=source).read_pin()
        assert_no_secret(info.value, sentinel, main_pin)


# -- 2. key generation and attributes -------------------------------------------------------


@pytest.mark.kinds(*ALL_KINDS)
def test_generated_key_is_protected(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    info = manager.key_info(key.label)
    assert info.label == key.label
    assert info.key_type == KIND_KEY_TYPE[kind]
    assert info.sensitive is True
    assert info.extractable is False
    assert info.always_sensitive is True
    assert info.never_extractable is True
    assert len(info.key_id) == 16
    assert manager.exists(key.label, "private")
    assert manager.exists(key.label, "public")
    assert not manager.exists(key.label, "secret")


def test_generated_key_ids_are_unique(manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey]) -> None:
    ids = {manager.key_info(key.label).key_id for key in generated.values()}
    ids.add(manager.key_info(ISSUER_LABEL).key_id)
    assert len(ids) == len(generated) + 1


@pytest.mark.kinds(*ALL_KINDS)
def test_generated_public_key_shape(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    public = manager.get_public_key(key.label)
    assert der(public) == der(key.public)
    if kind is KeyKind.EC_P256:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        assert public.key_size == 256
    elif kind is KeyKind.EC_P384:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP384R1)
        assert public.key_size == 384
    elif kind is KeyKind.RSA_3072:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 3072
        assert public.public_numbers().e == 65537
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        assert len(public.public_bytes_raw()) == 32


@pytest.mark.kinds(*ALL_KINDS)
def test_create_existing_label_raises(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    label = generated[kind].label
    before = manager.key_info(label)
    with pytest.raises(KeyExistsError):
        manager.create_key(label, kind)
    # A different kind under the same label is refused too, and so is an HMAC key.
    other = KeyKind.ED25519 if kind is not KeyKind.ED25519 else KeyKind.EC_P256
    with pytest.raises(KeyExistsError):
        manager.create_key(label, other)
    with pytest.raises(KeyExistsError):
        manager.create_hmac_key(label)
    # Nothing was added: the label still names exactly the original key pair.
    assert manager.key_info(label) == before
    assert der(manager.get_public_key(label)) == der(generated[kind].public)


def test_init_labels_cannot_be_reused(manager: Pkcs11KeyManager) -> None:
    with pytest.raises(KeyExistsError):
        manager.create_key(ISSUER_LABEL, KeyKind.EC_P256)
    with pytest.raises(KeyExistsError):
        manager.create_key(HMAC_LABEL, KeyKind.EC_P256)
    with pytest.raises(KeyExistsError):
        manager.create_hmac_key(HMAC_LABEL)


# -- 3. the keys created by init -------------------------------------------------------------


def test_issuer_key_is_protected(manager: Pkcs11KeyManager, hsm_backend: HsmBackend) -> None:
    info = manager.key_info(ISSUER_LABEL)
    assert info.key_type == KIND_KEY_TYPE[hsm_backend.issuer_kind]
    assert (info.sensitive, info.extractable, info.always_sensitive, info.never_extractable) == (
        True,
        False,
        True,
        True,
    )
    assert len(info.key_id) == 16


def test_hmac_key_is_protected(manager: Pkcs11KeyManager) -> None:
    info = manager.key_info(HMAC_LABEL, "secret")
    assert info.key_type == "GENERIC_SECRET"
    assert (info.sensitive, info.extractable, info.always_sensitive, info.never_extractable) == (
        True,
        False,
        True,
        True,
    )
    assert len(info.key_id) == 16
    assert manager.exists(HMAC_LABEL, "secret")
    assert not manager.exists(HMAC_LABEL, "private")


def test_manager_offers_the_capabilities(manager: Pkcs11KeyManager) -> None:
    assert isinstance(manager, MacKeyManager)
    assert isinstance(manager, KeyInspector)


def test_key_info_of_a_public_key_does_not_leak_keyerror(manager: Pkcs11KeyManager) -> None:
    try:
        info = manager.key_info(ISSUER_LABEL, "public")
    except HsmError:
        return
    assert info.label == ISSUER_LABEL


# -- 4. signatures ------------------------------------------------------------------------------


@pytest.mark.kinds(*ALL_KINDS)
def test_signer_signs_and_verifies(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    signer = manager.create_signer(key.label)
    expected_class = {
        KeyKind.EC_P256: ec.EllipticCurvePrivateKey,
        KeyKind.EC_P384: ec.EllipticCurvePrivateKey,
        KeyKind.RSA_3072: rsa.RSAPrivateKey,
        KeyKind.ED25519: ed25519.Ed25519PrivateKey,
    }[kind]
    assert isinstance(signer, expected_class)
    assert der(signer.public_key()) == der(key.public)
    algorithm = KIND_HASH[kind]
    message = b"KeyBinder " + kind.encode()
    for data in (message, bytearray(message), memoryview(message)):
        if isinstance(signer, HsmEcPrivateKey):
            assert algorithm is not None
            signature = signer.sign(data, ec.ECDSA(algorithm))
        elif isinstance(signer, HsmRsaPrivateKey):
            assert algorithm is not None
            signature = signer.sign(data, padding.PKCS1v15(), algorithm)
        else:
            signature = signer.sign(data)
        verify(key.public, signature, message, algorithm)
        with pytest.raises(InvalidSignature):
            verify(key.public, signature, message + b"!", algorithm)


@pytest.mark.kinds(*ALL_KINDS)
def test_self_signed_certificate_verifies(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    signer = manager.create_signer(generated[kind].label)
    cert = self_signed(signer, KIND_HASH[kind])
    cert.verify_directly_issued_by(cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == der(generated[kind].public)
    algorithm = KIND_HASH[kind]
    if algorithm is None:
        assert cert.signature_hash_algorithm is None
    else:
        assert isinstance(cert.signature_hash_algorithm, type(algorithm))


def test_issuer_key_signs_certificates(manager: Pkcs11KeyManager, hsm_backend: HsmBackend) -> None:
    signer = manager.create_signer(ISSUER_LABEL)
    kind = hsm_backend.issuer_kind
    cert = self_signed(signer, KIND_HASH[kind])
    cert.verify_directly_issued_by(cert)
    verify(signer.public_key(), sign(signer, b"issuer", KIND_HASH[kind]), b"issuer", KIND_HASH[kind])


@pytest.mark.kinds(*EC_KINDS)
def test_ecdsa_long_message_is_hashed_first(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    signer = manager.create_signer(key.label)
    algorithm = KIND_HASH[kind]
    assert algorithm is not None
    long_a = secrets.token_bytes(10 * 1024)
    # Same first 9 KiB: a signer that truncated instead of hashing would sign both alike.
    long_b = long_a[: 9 * 1024] + secrets.token_bytes(1024)
    signature = sign(signer, long_a, algorithm)
    verify(key.public, signature, long_a, algorithm)
    with pytest.raises(InvalidSignature):
        verify(key.public, signature, long_b, algorithm)


@pytest.mark.kinds(*EC_KINDS)
def test_ecdsa_hash_variants_and_prehashed(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    public = key.public
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signer = manager.create_signer(key.label)
    assert isinstance(signer, HsmEcPrivateKey)
    assert signer.curve.name == public.curve.name
    assert signer.key_size == public.key_size
    data = b"hash variants"
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        public.verify(signer.sign(data, ec.ECDSA(algorithm)), data, ec.ECDSA(algorithm))
        digest = hashes.Hash(algorithm)
        digest.update(data)
        prehashed = ec.ECDSA(Prehashed(algorithm))
        public.verify(signer.sign(digest.finalize(), prehashed), data, ec.ECDSA(algorithm))


@pytest.mark.kinds(KeyKind.EC_P256)
def test_ecdsa_signatures_are_randomised(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    key = generated[kind]
    signer = manager.create_signer(key.label)
    first, second = sign(signer, b"same"), sign(signer, b"same")
    assert first != second
    verify(key.public, first, b"same")
    verify(key.public, second, b"same")


@pytest.mark.kinds(KeyKind.RSA_3072)
def test_rsa_hash_variants(manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind) -> None:
    key = generated[kind]
    signer = manager.create_signer(key.label)
    assert isinstance(signer, HsmRsaPrivateKey)
    for algorithm in (hashes.SHA384(), hashes.SHA512()):
        signature = sign(signer, b"rsa", algorithm)
        assert len(signature) == 3072 // 8
        verify(key.public, signature, b"rsa", algorithm)
        digest = hashes.Hash(algorithm)
        digest.update(b"rsa")
        prehashed = signer.sign(digest.finalize(), padding.PKCS1v15(), Prehashed(algorithm))
        verify(key.public, prehashed, b"rsa", algorithm)
    with pytest.raises(ValueError, match="32 bytes"):
        signer.sign(b"\x00" * 31, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


@pytest.mark.kinds(KeyKind.RSA_3072)
def test_rsa_unsupported_schemes_raise(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    signer = manager.create_signer(generated[kind].label)
    assert isinstance(signer, HsmRsaPrivateKey)
    assert signer.key_size == 3072
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    with pytest.raises(MechanismNotSupportedError):
        signer.sign(b"x", pss, hashes.SHA256())
    with pytest.raises(MechanismNotSupportedError):
        signer.sign(b"x", padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - must be refused
    with pytest.raises(MechanismNotSupportedError):
        signer.sign(b"\x00" * 32, padding.PKCS1v15(), NoDigestInfo())
    with pytest.raises(MechanismNotSupportedError):
        signer.decrypt(b"\x00" * 384, padding.PKCS1v15())
    # The refusal propagates through cryptography's certificate builder too.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pss")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    with pytest.raises(MechanismNotSupportedError):
        builder.sign(signer, hashes.SHA256(), rsa_padding=pss)


@pytest.mark.kinds(KeyKind.EC_P256)
def test_ec_exchange_is_refused(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    signer = manager.create_signer(generated[kind].label)
    assert isinstance(signer, HsmEcPrivateKey)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(MechanismNotSupportedError):
        signer.exchange(ec.ECDH(), peer)


@pytest.mark.kinds(*ALL_KINDS)
def test_private_material_is_not_extractable(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], kind: KeyKind
) -> None:
    signer = manager.create_signer(generated[kind].label)
    with pytest.raises(TypeError):
        signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    if isinstance(signer, HsmEd25519PrivateKey):
        with pytest.raises(TypeError):
            signer.private_bytes_raw()
    else:
        with pytest.raises(TypeError):
            signer.private_numbers()


def test_missing_keys_raise_key_not_found(manager: Pkcs11KeyManager) -> None:
    missing = f"no-such-key-{secrets.token_hex(4)}"
    assert not manager.exists(missing)
    with pytest.raises(KeyNotFoundError):
        manager.create_signer(missing)
    with pytest.raises(KeyNotFoundError):
        manager.get_public_key(missing)
    with pytest.raises(KeyNotFoundError):
        manager.key_info(missing)
    with pytest.raises(KeyNotFoundError):
        manager.sign_raw(missing, "ECDSA", b"\x00" * 32)
    # Lookups are by label AND class: the HMAC key has no public half to sign with.
    with pytest.raises(KeyNotFoundError):
        manager.create_signer(HMAC_LABEL)


# -- 5. HMAC ------------------------------------------------------------------------------------


def test_hmac_sha256(manager: Pkcs11KeyManager) -> None:
    mac = manager.hmac_sha256(HMAC_LABEL, b"individual-123")
    assert isinstance(mac, bytes)
    assert len(mac) == 32
    assert manager.hmac_sha256(HMAC_LABEL, b"individual-123") == mac
    assert manager.hmac_sha256(HMAC_LABEL, b"individual-124") != mac
    assert len(manager.hmac_sha256(HMAC_LABEL, b"x" * 100_000)) == 32


def test_hmac_depends_on_the_key(manager: Pkcs11KeyManager) -> None:
    label = f"test-hmac-{secrets.token_hex(4)}"
    manager.create_hmac_key(label)
    info = manager.key_info(label, "secret")
    assert (info.key_type, info.sensitive, info.extractable) == ("GENERIC_SECRET", True, False)
    assert manager.hmac_sha256(label, b"data") != manager.hmac_sha256(HMAC_LABEL, b"data")
    with pytest.raises(KeyExistsError):
        manager.create_hmac_key(label)


def test_hmac_unknown_label(manager: Pkcs11KeyManager) -> None:
    with pytest.raises(KeyNotFoundError):
        manager.hmac_sha256(f"no-such-hmac-{secrets.token_hex(4)}", b"data")
    # An asymmetric key is not a secret key, even though the label exists.
    with pytest.raises(KeyNotFoundError):
        manager.hmac_sha256(ISSUER_LABEL, b"data")


# -- 6. errors translated -------------------------------------------------------------------------


def test_wrong_pin_raises_pin_incorrect(second_token: SecondToken, main_pin: str) -> None:
    wrong = secrets.token_hex(8)
    m = Pkcs11KeyManager(second_token.uri_with_pin(wrong))
    try:
        for _ in range(2):  # a failed login is not cached as success
            with pytest.raises(PinIncorrectError) as info:
                m.exists(second_token.key_label)
            assert not info.value.retryable
            assert_no_secret(info.value, wrong, second_token.pin, main_pin)
    finally:
        m.close()
    # The second refusal came from us, not the token: a rejected PIN is not tried again.
    assert "not trying it again" in str(info.value)
    # The right PIN still works afterwards (the token was not locked).
    good = Pkcs11KeyManager(second_token.uri)
    try:
        assert good.exists(second_token.key_label)
    finally:
        good.close()


def test_corrected_pin_source_is_tried_again(second_token: SecondToken) -> None:
    """After a rejected PIN the operator fixes the PIN file; the running process picks it up."""
    uri = second_token.uri_with_pin(secrets.token_hex(8))
    pin_file = Path(str(uri.pin_source).removeprefix("file:"))
    m = Pkcs11KeyManager(uri)
    try:
        with pytest.raises(PinIncorrectError):
            m.exists(second_token.key_label)
        pin_file.write_text(second_token.pin + "\n")
        assert m.exists(second_token.key_label)
    finally:
        m.close()


def test_nonexistent_token(hsm_backend: HsmBackend, main_pin: str) -> None:
    assert hsm_backend.uri.pin_source is not None
    uri = hsm_backend.token_uri(f"no-token-{secrets.token_hex(4)}", hsm_backend.uri.pin_source)
    m = Pkcs11KeyManager(uri)
    try:
        with pytest.raises(TokenNotFoundError) as info:
            m.get_public_key(ISSUER_LABEL)
        assert info.value.retryable
        assert_no_secret(info.value, main_pin, hsm_backend.uri.read_pin())
    finally:
        m.close()


def test_unreadable_pin_source_is_a_config_error(hsm_backend: HsmBackend, tmp_path: Path) -> None:
    uri = hsm_backend.token_uri(f"no-token-{secrets.token_hex(4)}", f"file:{tmp_path / 'absent'}")
    m = Pkcs11KeyManager(uri)
    try:
        with pytest.raises(HsmConfigError):
            m.exists(ISSUER_LABEL)
    finally:
        m.close()


def _missing_module_manager(settings: Settings, tmp_path: Path) -> Pkcs11KeyManager:
    return Pkcs11KeyManager(
        Pkcs11Uri(
            token="keybinder",
            module_path=str(tmp_path / "no-such-pkcs11-module.so"),
            pin_source=settings.pkcs11_uri.pin_source,
        )
    )


def test_missing_module_is_an_hsm_error(settings: Settings, tmp_path: Path, main_pin: str) -> None:
    m = _missing_module_manager(settings, tmp_path)
    try:
        with pytest.raises(HsmError) as info:
            m.exists(ISSUER_LABEL)
        assert_no_secret(info.value, main_pin)
    finally:
        m.close()


def test_missing_module_is_unavailable(settings: Settings, tmp_path: Path) -> None:
    m = _missing_module_manager(settings, tmp_path)
    try:
        with pytest.raises(HsmUnavailableError):
            m.exists(ISSUER_LABEL)
    finally:
        m.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (p11err.PinIncorrect(), PinIncorrectError),
        (p11err.PinLocked(), PinIncorrectError),
        (p11err.PinExpired(), PinIncorrectError),
        (p11err.PinInvalid(), PinIncorrectError),
        (p11err.NoSuchToken("No token matching {'token_label': 'x'}"), TokenNotFoundError),
        (p11err.NoSuchKey(), KeyNotFoundError),
        (p11err.MechanismInvalid(), MechanismNotSupportedError),
        (p11err.FunctionNotSupported(), MechanismNotSupportedError),
        (p11err.DeviceRemoved(), HsmUnavailableError),
        (p11err.TokenNotPresent(), HsmUnavailableError),
        (p11err.SessionHandleInvalid(), HsmUnavailableError),
        (p11err.UserNotLoggedIn(), HsmUnavailableError),
        (p11err.ArgumentsBad("secret detail 4711"), HsmError),
    ],
)
def test_translate(error: p11err.PKCS11Error, expected: type[HsmError]) -> None:
    translated = translate(error, "doing something")
    assert type(translated) is expected
    assert str(translated).startswith("doing something: ")
    # The module's own message (which may echo arguments) is not copied into ours.
    assert "4711" not in str(translated)


# -- 7. concurrency and lifecycle -----------------------------------------------------------------


def run_threads(count: int, work: Callable[[int], list[tuple[bytes, bytes]]]) -> list[list[tuple[bytes, bytes]]]:
    """Run ``work(i)`` in ``count`` threads that start together; re-raise the first failure."""
    barrier = threading.Barrier(count, timeout=30)

    def task(i: int) -> list[tuple[bytes, bytes]]:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(task, i) for i in range(count)]
        return [f.result(timeout=120) for f in futures]


def test_concurrent_signing_is_serialized(
    manager: Pkcs11KeyManager, generated: dict[KeyKind, GeneratedKey], hsm_backend: HsmBackend
) -> None:
    key = generated[hsm_backend.issuer_kind]
    # RSA-3072 signs ~20x slower in software than P-256: fewer rounds give the same interleaving.
    rounds = 20 if key.kind is KeyKind.RSA_3072 else 100

    def work(i: int) -> list[tuple[bytes, bytes]]:
        signer = manager.create_signer(key.label)
        out = []
        for n in range(rounds):
            data = f"thread {i} message {n}".encode()
            out.append((data, sign(signer, data, KIND_HASH[key.kind])))
        return out

    results = run_threads(8, work)
    assert sum(len(r) for r in results) == 8 * rounds
    for per_thread in results:
        for data, signature in per_thread:
            verify(key.public, signature, data, KIND_HASH[key.kind])


def test_concurrent_mixed_operations_across_tokens(
    hsm_backend: HsmBackend, generated: dict[KeyKind, GeneratedKey], second_token: SecondToken
) -> None:
    main = Pkcs11KeyManager(hsm_backend.uri)
    other = Pkcs11KeyManager(second_token.uri)
    try:
        # One lock per module, not per token: SoftHSM is unsafe across tokens as well.
        assert main.session is not other.session
        assert main.session._lock is other.session._lock
        other_public = other.get_public_key(second_token.key_label)
        expected_mac = main.hmac_sha256(HMAC_LABEL, b"mac me")
        jobs: list[tuple[Pkcs11KeyManager, str, PublicKey]] = [
            *((main, key.label, key.public) for key in generated.values() if key.kind is not KeyKind.RSA_3072),
            (other, second_token.key_label, other_public),
            (other, second_token.key_label, other_public),
        ]

        def work(i: int) -> list[tuple[bytes, bytes]]:
            out: list[tuple[bytes, bytes]] = []
            if i >= len(jobs):  # HMAC and attribute reads interleaved with the signers
                for _ in range(50):
                    assert main.hmac_sha256(HMAC_LABEL, b"mac me") == expected_mac
                    assert main.key_info(ISSUER_LABEL).sensitive
                    assert other.exists(second_token.key_label)
                return out
            m, label, _ = jobs[i]
            signer = m.create_signer(label)
            for n in range(50):
                data = f"{i}/{n}".encode()
                out.append((data, sign(signer, data, ec_hash(signer))))
            return out

        results = run_threads(len(jobs) + 2, work)
        for i, (_, _, public) in enumerate(jobs):
            assert len(results[i]) == 50
            for data, signature in results[i]:
                verify(public, signature, data, ec_hash_for(public))
    finally:
        main.close()
        other.close()


def ec_hash(signer: HsmPrivateKey) -> hashes.HashAlgorithm | None:
    return ec_hash_for(signer.public_key())


def ec_hash_for(public: PublicKey) -> hashes.HashAlgorithm | None:
    if isinstance(public, ec.EllipticCurvePublicKey) and public.key_size == 384:
        return hashes.SHA384()
    return None


def test_concurrent_open_sign_close(second_token: SecondToken) -> None:
    """Managers opened and closed from many threads share one refcounted login correctly."""
    holder = Pkcs11KeyManager(second_token.uri)
    public = holder.get_public_key(second_token.key_label)
    holder.close()

    def work(i: int) -> list[tuple[bytes, bytes]]:
        out = []
        for n in range(20):
            m = Pkcs11KeyManager(second_token.uri)
            try:
                data = f"{i}:{n}".encode()
                out.append((data, sign(m.create_signer(second_token.key_label), data)))
            finally:
                m.close()
        return out

    results = run_threads(4, work)
    for per_thread in results:
        assert len(per_thread) == 20
        for data, signature in per_thread:
            verify(public, signature, data)


def test_close_is_idempotent_and_refcounted(second_token: SecondToken) -> None:
    first = Pkcs11KeyManager(second_token.uri)
    second = Pkcs11KeyManager(second_token.uri)
    assert first.session is second.session
    assert first.exists(second_token.key_label)
    first.close()
    first.close()
    first.close()
    # Repeated closes of one manager must not release the other manager's hold.
    assert second.exists(second_token.key_label)
    session = second.session
    second.close()
    second.close()
    # The last close logged out; the shared session refuses further use...
    with pytest.raises(HsmError):
        session.run("after close", lambda s: None)
    # ...and a new manager gets a fresh session that logs in again.
    third = Pkcs11KeyManager(second_token.uri)
    try:
        assert third.session is not session
        assert third.exists(second_token.key_label)
    finally:
        third.close()


_RECONNECT_SCRIPT = """
import json, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from hsm import HsmError, HsmUnavailableError, Pkcs11KeyManager

def check(signer, data):
    ecdsa = isinstance(signer, ec.EllipticCurvePrivateKey)
    scheme = (ec.ECDSA(hashes.SHA256()),) if ecdsa else (padding.PKCS1v15(), hashes.SHA256())
    try:
        signature = signer.sign(data, *scheme)
    except HsmUnavailableError:
        return "unavailable"
    except HsmError as err:
        return type(err).__name__
    try:
        signer.public_key().verify(signature, data, *scheme)
    except InvalidSignature:
        return "wrong-key"
    return "ok"

a = Pkcs11KeyManager(sys.argv[1])
sa = a.create_signer(sys.argv[2])
out = {"before": check(sa, b"0")}
if len(sys.argv) == 3:
    generation = a.session.generation
    a.session.reconnect()
    out["generation_bumped"] = a.session.generation == generation + 1
    out["after"] = [check(sa, b"%d" % i) for i in range(3)]
else:
    b = Pkcs11KeyManager(sys.argv[3])
    sb = b.create_signer(sys.argv[4])
    out["before_b"] = check(sb, b"0")
    b.session.reconnect()
    out["after"] = [name + ":" + check(sa if name == "a" else sb, name.encode()) for name in "baabb"]
    out["b_sees_a_key"] = b.exists(sys.argv[2])
print(json.dumps(out))
"""


def run_reconnect_script(*args: str) -> dict[str, Any]:
    """Reconnect in a child process: C_Finalize here would break the shared session of this one."""
    proc = subprocess.run(
        [sys.executable, "-c", _RECONNECT_SCRIPT, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_reconnect_logs_in_again(hsm_backend: HsmBackend, generated: dict[KeyKind, GeneratedKey]) -> None:
    out = run_reconnect_script(str(hsm_backend.uri), generated[hsm_backend.issuer_kind].label)
    assert out == {"before": "ok", "generation_bumped": True, "after": ["ok", "ok", "ok"]}


def test_reconnect_does_not_cross_tokens(
    hsm_backend: HsmBackend, generated: dict[KeyKind, GeneratedKey], second_token: SecondToken
) -> None:
    # Token A = the shared token, token B = the second one. B reconnects (as after a device
    # error); then B signs, A signs twice (first may fail once: retryable), B signs twice.
    out = run_reconnect_script(
        str(hsm_backend.uri), generated[KeyKind.EC_P256].label, str(second_token.uri), second_token.key_label
    )
    assert (out["before"], out["before_b"]) == ("ok", "ok")
    assert set(out["after"]) <= {"a:ok", "a:unavailable", "b:ok", "b:unavailable"}, out
    assert out["after"][-1] == "b:ok", out
    assert out["b_sees_a_key"] is False, out


# -- 8. provisioning ---------------------------------------------------------------------------


def test_token_exists(hsm_backend: HsmBackend, second_token: SecondToken) -> None:
    uri = hsm_backend.uri
    assert token_exists(uri, uri.token)
    assert token_exists(uri, second_token.label)
    assert not token_exists(uri, f"absent-{secrets.token_hex(6)}")


def test_provision_rejects_bad_input(settings: Settings, tmp_path: Path) -> None:
    module = settings.pkcs11_uri.module_path
    with pytest.raises(ValueError, match="32 bytes"):
        init_token(module, "x" * 33, so_pin="1", user_pin="2")
    with pytest.raises(HsmError):
        token_exists(str(tmp_path / "missing.so"), "keybinder")


# -- 9. backends: what each module offers, the module environment in the URI ---------------------


def test_backend_mechanisms(hsm_backend: HsmBackend, manager: Pkcs11KeyManager) -> None:
    """Supported kinds have their mechanisms; each unsupported kind is proven missing and reported."""
    offered = manager.mechanisms()
    assert set(HMAC_MECHANISMS) <= offered
    for kind in hsm_backend.kinds:
        assert set(KIND_MECHANISMS[kind]) <= offered, f"{hsm_backend.name} lacks mechanisms for {kind}"
    for kind, reason in hsm_backend.unsupported.items():
        missing = sorted(set(KIND_MECHANISMS[kind]) - offered)
        assert missing, f"{hsm_backend.name} now offers {kind}: take it out of UNSUPPORTED_KINDS"
        label = f"unsupported-{kind}-{secrets.token_hex(4)}"
        with pytest.raises(MechanismNotSupportedError):
            manager.create_key(label, kind)
        assert not manager.exists(label, "private")
        assert not manager.exists(label, "public")
        UNSUPPORTED_REPORT.append(f"{hsm_backend.name}: {kind}: {reason}; missing CKM_{', CKM_'.join(missing)}")


_ALREADY_LOGGED_IN_SCRIPT = """
import sys
import pkcs11
from hsm import Pkcs11KeyManager, Pkcs11Uri
from hsm.uri import apply_module_env

uri = Pkcs11Uri.parse(sys.argv[1])
apply_module_env(uri)
# Something else in the process logs in first (as a remoting server may keep a login across a
# client's reconnect): the module then answers C_Login with CKR_USER_ALREADY_LOGGED_IN.
other = pkcs11.lib(uri.module_path).get_token(token_label=uri.token).open(user_pin=uri.read_pin())
keys = Pkcs11KeyManager(uri)
print(keys.exists(sys.argv[2]), len(keys.hmac_sha256(sys.argv[3], b"x")))
"""


def test_already_logged_in_shares_the_login(hsm_backend: HsmBackend, settings: Settings) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _ALREADY_LOGGED_IN_SCRIPT, str(hsm_backend.uri), ISSUER_LABEL, settings.hmac_key_label],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "32"]


def test_parse_module_env_round_trips() -> None:
    text = (
        "pkcs11:token=keybinder?module-path=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
        f"&pin-source=file:/run/pin&{MODULE_ENV_ATTR}=P11_KIT_SERVER_ADDRESS=unix:path=/run/p11/sock"
        f"&{MODULE_ENV_ATTR}=OTHER_CONF=/etc/a%26b%3Dc"
    )
    uri = Pkcs11Uri.parse(text)
    assert uri.module_env == (("P11_KIT_SERVER_ADDRESS", "unix:path=/run/p11/sock"), ("OTHER_CONF", "/etc/a&b=c"))
    assert Pkcs11Uri.parse(str(uri)) == uri
    assert uri.with_object("issuer").module_env == uri.module_env
    assert Pkcs11Uri.parse("pkcs11:token=t?module-path=/m.so").module_env == ()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("NOVALUE", "NAME=value"),
        ("=x", "NAME=value"),
        ("1BAD=x", "NAME=value"),
        ("BAD-NAME=x", "NAME=value"),
        ("LD_PRELOAD=/tmp/x.so", "loader"),
        ("ld_library_path=/tmp", "loader"),
    ],
)
def test_parse_module_env_rejects(value: str, fragment: str) -> None:
    with pytest.raises(HsmConfigError, match=fragment):
        Pkcs11Uri.parse(f"pkcs11:token=t?module-path=/m.so&{MODULE_ENV_ATTR}={value}")


def test_parse_module_env_rejects_a_variable_twice() -> None:
    with pytest.raises(HsmConfigError, match="twice"):
        Pkcs11Uri.parse(f"pkcs11:token=t?module-path=/m.so&{MODULE_ENV_ATTR}=A=1&{MODULE_ENV_ATTR}=A=2")


def test_module_env_wins_over_inherited_and_conflicts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"KB_TEST_MODULE_ENV_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(name, "inherited")
    first = Pkcs11Uri("t", "/m.so", module_env=((name, "one"),))
    apply_module_env(first)
    assert os.environ[name] == "one"
    apply_module_env(first)  # the same value again is fine
    with pytest.raises(HsmConfigError, match=name) as info:
        apply_module_env(Pkcs11Uri("t2", "/m.so", module_env=((name, "two"),)))
    assert "two" not in str(info.value)
    assert os.environ[name] == "one"
