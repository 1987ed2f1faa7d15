"""X.509 profiles: the issuer certificate (self-signed, or a CSR for an external CA) and the wallet certificate."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from server.domain import IssuerPrivateKey
from server.jwk import WalletPublicKey
from server.keyprofiles import profile_of

ISSUER_ORGANIZATION = "KeyBinder"


@dataclass(frozen=True, slots=True)
class Issuer:
    """The key that signs wallet certificates, its certificate and the CA chain above it (if any)."""

    key_label: str
    certificate: x509.Certificate
    signer: IssuerPrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def not_after(self) -> datetime:
        """The earliest notAfter on the path: no wallet certificate may outlive any certificate above it."""
        return min(c.not_valid_after_utc for c in (self.certificate, *self.chain))


#: What an issuer key may do: sign certificates (and CRLs), nothing else. The self-signed certificate and
#: the CSR for an external CA ask for the same.
ISSUER_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def signature_hash(key: IssuerPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash to pair with the issuer key: none for Ed25519, SHA-384 for P-384, else SHA-256."""
    return profile_of(key.public_key()).hash


def issuer_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_issuer_certificate(
    signer: IssuerPrivateKey, *, common_name: str, now: datetime, validity: timedelta
) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only (pathLen 0), valid from ``now``."""
    name = issuer_name(common_name)
    public = signer.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            ISSUER_KEY_USAGE,
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return builder.sign(signer, signature_hash(signer))


def build_issuer_csr(signer: IssuerPrivateKey, *, common_name: str) -> x509.CertificateSigningRequest:
    """A CSR for an external CA, signed by the HSM key, asking for the same CA profile as the
    self-signed certificate (the CA decides what it grants; `check_issuer_certificate` checks it)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(issuer_name(common_name))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            ISSUER_KEY_USAGE,
            critical=True,
        )
    )
    return builder.sign(signer, signature_hash(signer))


class IssuerCertificateError(ValueError):
    """A certificate offered for an issuer key cannot be installed; the message says why."""


def check_issuer_certificate(
    cert: x509.Certificate, public_key: object, *, chain: Sequence[x509.Certificate] = (), now: datetime
) -> None:
    """Refuse a certificate that would make a broken issuer: another key, not a CA fit to sign
    certificates, expired, or a chain that does not certify it. Raises IssuerCertificateError."""
    if cert.public_key() != public_key:
        raise IssuerCertificateError("the certificate's public key is not the pending key's")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise IssuerCertificateError("the certificate has no basicConstraints: it is not a CA certificate") from None
    if not constraints.ca:
        raise IssuerCertificateError("the certificate is not a CA certificate (basicConstraints CA is false)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise IssuerCertificateError("the certificate has no keyUsage; keyCertSign is required") from None
    if not usage.key_cert_sign:
        raise IssuerCertificateError("the certificate's keyUsage lacks keyCertSign")
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise IssuerCertificateError("the certificate has no subjectKeyIdentifier") from None
    for c in (cert, *chain):
        if c.not_valid_after_utc <= now:
            raise IssuerCertificateError(f"a certificate has expired: {c.subject.rfc4514_string()}")
    child = cert
    for parent in chain:
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise IssuerCertificateError(
                f"the chain does not certify {child.subject.rfc4514_string()}: {err or type(err).__name__}"
            ) from err
        child = parent


def issue_wallet_certificate(
    issuer: Issuer, wallet_key: WalletPublicKey, *, psut: str, now: datetime, validity: timedelta
) -> x509.Certificate:
    """The end-entity certificate for a wallet key: CA=false, digitalSignature, SKI/AKI.

    notAfter never runs past the issuer's own notAfter (nor its chain's): a relying party could not
    build a valid path for the remainder anyway.
    """
    issuer_cert = issuer.certificate
    not_after = min(now + validity, issuer.not_after)
    if not_after <= now:
        raise ValueError("the issuer certificate has expired")
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, psut)]))
        .issuer_name(issuer_cert.subject)
        .public_key(wallet_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(wallet_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    return builder.sign(issuer.signer, signature_hash(issuer.signer))


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def x5t_s256(cert: x509.Certificate) -> str:
    """base64url (no padding) SHA-256 of the certificate DER, as JOSE's x5t#S256."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
