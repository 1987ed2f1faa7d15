"""The wallet certificate profile and its issuer certificate, as the real gRPC server issues them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from pkilint import loader
from pkilint.bin import lint_pkix_signer_signee_cert_chain
from pkilint.pkix import certificate, extension, name
from pkilint.validation import ValidationFindingSeverity

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.issuer_admin import issuer_chain_pem
from server.jwk import WalletPublicKey, parse_wallet_jwk
from tests.conftest import (
    PARTNER,
    Person,
    RunningServer,
    bind_request,
    failure,
    md,
    new_person,
    otp_challenge,
    require,
    send_otp,
)

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "ed25519")
OTHER_PARTNER = "other-partner"
OPENSSL = Path("/usr/bin/openssl")
LINT_PKIX_CERT = Path(sys.executable).parent / "lint_pkix_cert"
PSUT_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
EE_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}
# pkilint: findings at this severity or worse (FATAL=0 < ERROR < WARNING) fail a test.
THRESHOLD = ValidationFindingSeverity.WARNING


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def der_integer_octets(value: int) -> int:
    """Content octets of a positive DER INTEGER (a leading 0x00 when the top bit is set)."""
    return value.bit_length() // 8 + 1


def key_usage(**granted: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(granted)
    return x509.KeyUsage(**flags)


# -- binding through the server ------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """One DoKeyBinding answer and what the test knows about the request."""

    key_type: str
    person: Person
    wallet_key: WalletPublicKey
    jwk: str
    response: pb.DoKeyBindingResponse
    cert: x509.Certificate
    requested_at: datetime
    answered_at: datetime


def bind(kb: RunningServer, person: Person, key_type: str = "ec-p256", partner: str = PARTNER) -> Issued:
    """Send an OTP to ``person`` for ``partner`` and bind a fresh wallet key with it."""
    _, otp = send_otp(kb, person, partner=partner)
    private, jwk = new_wallet_key(key_type)
    requested_at = datetime.now(UTC)
    resp = kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md(partner))
    answered_at = datetime.now(UTC)
    certs = x509.load_pem_x509_certificates(resp.certificate.encode())
    assert len(certs) == 1, "`certificate` carries exactly the wallet certificate"
    return Issued(key_type, person, private.public_key(), jwk, resp, certs[0], requested_at, answered_at)


@pytest.fixture(params=KEY_TYPES)
def issued(request: pytest.FixtureRequest, kb: RunningServer, person: Person) -> Issued:
    key_type: str = request.param
    return bind(kb, person, key_type)


@pytest.fixture(scope="module")
def issuer(kb: RunningServer) -> x509.Certificate:
    """The active issuer certificate: the first (newest) of the served chain."""
    chain = x509.load_pem_x509_certificates(issuer_chain_pem(kb.app.store).encode())
    assert chain, "no valid issuer certificate"
    return chain[0]


@pytest.fixture(scope="module")
def issuer_pem(issuer: x509.Certificate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("issuer") / "issuer.pem"
    path.write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
    return path


def write_pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# -- linters -------------------------------------------------------------------------------------


def _rfc5280_validator() -> Any:
    """The validator `lint_pkix_cert lint` runs (built as in pkilint/bin/lint_pkix_cert.py)."""
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def pkix_findings(cert: x509.Certificate) -> list[str]:
    """pkilint's RFC 5280 findings of severity WARNING or worse, one readable line each."""
    document = loader.load_der_certificate(der(cert), "certificate under test")
    results = _rfc5280_validator().validate(document.root)
    return [
        f"{d.finding.severity.name} {d.finding.code} at {r.node.path}: {d.message or ''}"
        for r in results
        for d in r.finding_descriptions
        if d.finding.severity <= THRESHOLD
    ]


def chain_findings(issuer_pem: Path, subject_pem: Path) -> list[dict[str, Any]]:
    """`lint_pkix_signer_signee_cert_chain lint -s INFO -f JSON issuer subject`, run in-process.

    It checks the pair: issuer subject DN == subject's issuer DN (binary), AKI == issuer SKI, the
    subject's signature under the issuer key, policy chaining. A DN mismatch is only a NOTICE there,
    so every finding counts, not just WARNING and worse.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        count = lint_pkix_signer_signee_cert_chain.main(
            ["lint", "-s", ValidationFindingSeverity.INFO.name, "-f", "JSON", str(issuer_pem), str(subject_pem)]
        )
    results: list[dict[str, Any]] = json.loads(out.getvalue())["results"]
    assert int(count) == sum(len(r["finding_descriptions"]) for r in results)
    return results


def openssl_verify(ca_file: Path, cert_file: Path, *options: str) -> subprocess.CompletedProcess[str]:
    require(OPENSSL.exists(), f"openssl ({OPENSSL})")
    return subprocess.run(
        [str(OPENSSL), "verify", *options, "-CAfile", str(ca_file), str(cert_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- the wallet certificate, per wallet key type ------------------------------------------------


def test_version_and_serial(issued: Issued) -> None:
    cert = issued.cert
    assert cert.version is x509.Version.v3
    assert cert.serial_number > 0
    assert der_integer_octets(cert.serial_number) <= 20
    # ≥ 64 random bits: a 159-bit random serial falls below 2**63 with probability 2**-96.
    assert cert.serial_number >= 2**63


def test_issuer_name_is_the_issuer_certificate_subject(issued: Issued, issuer: x509.Certificate) -> None:
    assert issued.cert.issuer == issuer.subject
    # Name chaining compares encodings, not just values (string types included).
    assert issued.cert.issuer.public_bytes() == issuer.subject.public_bytes()


def test_subject_is_only_the_psut(issued: Issued) -> None:
    psut = issued.response.partner_specific_user_token
    subject = issued.cert.subject

    assert subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, psut)])
    assert len(subject.rdns) == 1
    assert subject.rfc4514_string() == f"CN={psut}"


def test_certificate_carries_no_personal_data(issued: Issued) -> None:
    encoded = der(issued.cert)
    person = issued.person
    for value in (person.individual_id, person.email, person.phone):
        assert value not in issued.cert.subject.rfc4514_string()
        assert value.encode() not in encoded
    with pytest.raises(x509.ExtensionNotFound):
        issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_validity_is_utc_one_policy_period_and_within_the_issuer(
    issued: Issued, issuer: x509.Certificate, kb: RunningServer
) -> None:
    cert = issued.cert
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert not_before.utcoffset() == timedelta(0)
    assert not_after.utcoffset() == timedelta(0)

    # Issued "now": X.509 times have whole seconds, so compare with the truncated request time.
    assert issued.requested_at.replace(microsecond=0) <= not_before <= issued.answered_at

    validity = timedelta(days=kb.app.settings.cert_validity_days)
    assert not_after == min(not_before + validity, issuer.not_valid_after_utc)
    assert issuer.not_valid_before_utc <= not_before
    assert not_after <= issuer.not_valid_after_utc


def test_extensions_are_exactly_the_end_entity_profile(issued: Issued, issuer: x509.Certificate) -> None:
    exts = issued.cert.extensions
    assert {e.oid for e in exts} == EE_EXTENSIONS
    assert len(exts) == len(EE_EXTENSIONS), "an extension appears twice"

    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    assert bc.value.path_length is None

    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value == key_usage(digital_signature=True)

    ski = exts.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical  # RFC 5280 §4.2.1.2: MUST NOT be critical
    assert ski.value.digest == x509.SubjectKeyIdentifier.from_public_key(issued.wallet_key).digest

    aki = exts.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical  # RFC 5280 §4.2.1.1: MUST NOT be critical
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == issuer_ski.digest
    assert aki.value.authority_cert_issuer is None
    assert aki.value.authority_cert_serial_number is None


def test_public_key_is_the_bound_wallet_key(issued: Issued) -> None:
    public = issued.cert.public_key()
    assert public == issued.wallet_key
    assert public == parse_wallet_jwk(issued.jwk).public_key


def test_response_thumbprint_and_expiry(issued: Issued) -> None:
    resp = issued.response
    assert resp.thumbprint == b64u(hashlib.sha256(der(issued.cert)).digest())
    assert "=" not in resp.thumbprint
    assert resp.expires_at.ToDatetime(tzinfo=UTC) == issued.cert.not_valid_after_utc


def test_signature_verifies_with_the_issuer_key(issued: Issued, issuer: x509.Certificate) -> None:
    issued.cert.verify_directly_issued_by(issuer)  # raises on any mismatch
    assert issued.cert.signature_algorithm_oid == issuer.signature_algorithm_oid


def test_openssl_verifies_against_the_issuer(issued: Issued, issuer_pem: Path, tmp_path: Path) -> None:
    cert_file = write_pem(issued.cert, tmp_path / f"{issued.key_type}.pem")

    plain = openssl_verify(issuer_pem, cert_file)
    strict = openssl_verify(issuer_pem, cert_file, "-x509_strict")

    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert strict.returncode == 0, strict.stdout + strict.stderr


def test_pkilint_rfc5280_has_no_warnings(issued: Issued) -> None:
    assert pkix_findings(issued.cert) == []


def test_pkilint_chain_has_no_findings(issued: Issued, issuer_pem: Path, tmp_path: Path) -> None:
    cert_file = write_pem(issued.cert, tmp_path / f"{issued.key_type}.pem")
    assert chain_findings(issuer_pem, cert_file) == []


def test_pkilint_command_line_accepts_the_certificate(kb: RunningServer, person: Person, tmp_path: Path) -> None:
    """The installed `lint_pkix_cert` console script; its exit code counts findings ≥ the threshold."""
    cert_file = write_pem(bind(kb, person).cert, tmp_path / "wallet.pem")
    run = subprocess.run(
        [str(LINT_PKIX_CERT), "lint", "-s", THRESHOLD.name, "-f", "JSON", str(cert_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout) == {"results": []}


# -- across bindings -----------------------------------------------------------------------------


def test_serials_are_distinct(kb: RunningServer, person: Person) -> None:
    serials = [bind(kb, person).cert.serial_number for _ in range(20)]

    assert len(set(serials)) == len(serials)
    assert all(s > 0 and der_integer_octets(s) <= 20 for s in serials)


def test_thumbprints_and_keys_differ_per_binding(kb: RunningServer, person: Person) -> None:
    first, second = bind(kb, person), bind(kb, person)
    assert first.response.thumbprint != second.response.thumbprint
    assert first.cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ) != second.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


# -- the partner-specific user token -------------------------------------------------------------


def assert_psut_format(psut: str) -> None:
    """base64url of 32 bytes: 43 characters, no padding, canonical."""
    assert PSUT_PATTERN.fullmatch(psut), psut
    raw = base64.urlsafe_b64decode(psut + "=")
    assert len(raw) == 32
    assert b64u(raw) == psut


def test_psut_is_base64url_of_32_bytes(issued: Issued) -> None:
    psut = issued.response.partner_specific_user_token
    assert_psut_format(psut)
    assert issued.person.individual_id not in psut


def test_psut_is_stable_for_the_same_person_and_partner(kb: RunningServer, person: Person) -> None:
    first = bind(kb, person, "ec-p256")
    second = bind(kb, person, "ed25519")

    assert first.response.partner_specific_user_token == second.response.partner_specific_user_token
    assert first.cert.subject == second.cert.subject


def test_psut_differs_between_partners(kb: RunningServer, person: Person) -> None:
    ours = bind(kb, person, partner=PARTNER)
    theirs = bind(kb, person, partner=OTHER_PARTNER)

    assert_psut_format(theirs.response.partner_specific_user_token)
    assert ours.response.partner_specific_user_token != theirs.response.partner_specific_user_token
    assert theirs.cert.subject.rfc4514_string() == f"CN={theirs.response.partner_specific_user_token}"


def test_psut_differs_between_individuals(kb: RunningServer, person: Person) -> None:
    mine = bind(kb, person)
    theirs = bind(kb, new_person(kb))

    assert mine.response.partner_specific_user_token != theirs.response.partner_specific_user_token


def test_same_key_is_not_certified_for_another_individual(kb: RunningServer, person: Person) -> None:
    first = bind(kb, person)
    other = new_person(kb)
    _, otp = send_otp(kb, other)

    refused = failure(lambda: kb.stub.DoKeyBinding(bind_request(other, first.jwk, otp_challenge(otp)), metadata=md()))

    assert (refused.code, refused.reason, refused.domain) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "duplicate_public_key",
        "keybinder",
    )


# -- the issuer certificate ----------------------------------------------------------------------


def test_issuer_is_a_ca_for_end_entities_only(issuer: x509.Certificate) -> None:
    assert issuer.version is x509.Version.v3
    assert issuer.serial_number > 0
    assert der_integer_octets(issuer.serial_number) <= 20

    bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert (bc.value.ca, bc.value.path_length) == (True, 0)

    ku = issuer.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value == key_usage(key_cert_sign=True, crl_sign=True)


def test_issuer_key_identifiers(issuer: x509.Certificate) -> None:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = issuer.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)

    assert not ski.critical
    assert not aki.critical
    assert ski.value.digest == x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
    assert aki.value.key_identifier == ski.value.digest


def test_issuer_is_self_signed(issuer: x509.Certificate) -> None:
    assert issuer.issuer == issuer.subject
    issuer.verify_directly_issued_by(issuer)  # raises on a bad signature


def test_issuer_validity_is_utc_and_current(issuer: x509.Certificate) -> None:
    now = datetime.now(UTC)
    assert issuer.not_valid_before_utc.utcoffset() == timedelta(0)
    assert issuer.not_valid_before_utc <= now < issuer.not_valid_after_utc


def test_openssl_accepts_the_issuer_as_trust_anchor(issuer_pem: Path) -> None:
    run = openssl_verify(issuer_pem, issuer_pem, "-x509_strict", "-check_ss_sig")
    assert run.returncode == 0, run.stdout + run.stderr


def test_pkilint_rfc5280_issuer_has_no_warnings(issuer: x509.Certificate) -> None:
    assert pkix_findings(issuer) == []


def test_pkilint_chain_accepts_the_issuer_as_its_own_signer(issuer_pem: Path) -> None:
    assert chain_findings(issuer_pem, issuer_pem) == []


def test_pkilint_reports_a_bad_certificate(issuer: x509.Certificate) -> None:
    """The linter as wired here does report problems, so an empty list above means something."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lint sanity")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # no SKI, no AKI, no KeyUsage

    findings = pkix_findings(bad)

    assert any("authority_key_identifier" in f for f in findings), findings
