"""X.509 profiles: the self-signed issuer certificate and the RFC 5280 wallet certificate."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from server.jwk import WalletPublicKey

IssuerPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
ISSUER_ORGANIZATION = "KeyBinder"


@dataclass(frozen=True, slots=True)
class Issuer:
    """The key that signs wallet certificates and its certificate."""

    key_label: str
    certificate: x509.Certificate
    signer: IssuerPrivateKey


def signature_hash(key: IssuerPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash to pair with the issuer key: none for Ed25519, SHA-384 for P-384, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def build_issuer_certificate(
    signer: IssuerPrivateKey, *, common_name: str, now: datetime, validity: timedelta
) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only (pathLen 0)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
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
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return builder.sign(signer, signature_hash(signer))


def issue_wallet_certificate(
    issuer: Issuer, wallet_key: WalletPublicKey, *, psut: str, now: datetime, validity: timedelta
) -> x509.Certificate:
    """The end-entity certificate for a wallet key: CA=false, digitalSignature, SKI/AKI.

    notAfter never runs past the issuer's own notAfter: a relying party could not build a
    valid path for the remainder anyway.
    """
    issuer_cert = issuer.certificate
    not_after = min(now + validity, issuer_cert.not_valid_after_utc)
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
