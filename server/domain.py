"""Domain values: frozen records passed between the service layer and its ports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

#: What signs wallet certificates: a private key object whose sign() may go to the HSM.
IssuerPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class BindingStatus(enum.StrEnum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"
    #: Never stored: reported for an active binding whose certificate has expired.
    EXPIRED = "expired"


class OtpChannel(enum.StrEnum):
    EMAIL = "email"
    PHONE = "phone"


@dataclass(frozen=True, slots=True)
class Identity:
    """A registered individual. ``id_hmac`` is the only form of the ID that is stored."""

    id_hmac: bytes
    email: str | None
    phone: str | None
    name: str | None
    pin_hmac: bytes | None


@dataclass(frozen=True, slots=True)
class OtpRecord:
    transaction_id: str
    id_hmac: bytes
    partner_id: str
    otp_hmac: bytes
    created_at: datetime
    expires_at: datetime
    max_attempts: int
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Binding:
    id_hmac: bytes
    partner_id: str
    auth_factor_type: str
    psut: str
    key_fingerprint: str
    certificate_pem: str
    cert_thumbprint: str
    serial_hex: str
    issuer_key_label: str
    created_at: datetime
    expires_at: datetime
    status: BindingStatus = BindingStatus.ACTIVE
    superseded_at: datetime | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None

    def status_at(self, now: datetime) -> BindingStatus:
        """The status a client sees: an active binding past its notAfter is expired."""
        if self.status is BindingStatus.ACTIVE and self.expires_at <= now:
            return BindingStatus.EXPIRED
        return self.status


@dataclass(frozen=True, slots=True)
class IssuerRecord:
    """An installed issuer key: its certificate (and the CA chain above it, if a CA signed it).

    ``not_before`` is when the key may start signing (the certificate's notBefore); a store given
    None records ``created_at``. ``not_after`` is the earliest notAfter of the certificate and its
    chain: no wallet certificate signed by the key may outlive it.
    """

    key_label: str
    key_kind: str
    certificate_pem: str
    not_after: datetime
    created_at: datetime
    not_before: datetime | None = None
    chain_pem: str = ""


@dataclass(frozen=True, slots=True)
class PendingIssuer:
    """A key made for an external CA: its CSR is out, no certificate is installed; it never signs."""

    key_label: str
    key_kind: str
    csr_pem: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OtpMessage:
    """One OTP to deliver on one channel."""

    channel: OtpChannel
    to: str
    transaction_id: str
    otp: str
    sent_at: datetime

    def __repr__(self) -> str:  # the OTP must not reach logs through a repr
        return f"OtpMessage(channel={self.channel!s}, transaction_id={self.transaction_id!r}, otp=******)"


@dataclass(frozen=True, slots=True)
class Partner:
    """A registered partner. Only the hash of its API key is kept; it never prints."""

    partner_id: str
    api_key_hash: bytes = field(repr=False)
    enabled: bool
    client_cert_sha256: str | None
    created_at: datetime
    updated_at: datetime
