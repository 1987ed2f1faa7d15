"""The service layer's ports: small Protocols that each backend module implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from server.audit import AuditEvent, AuditRow
from server.domain import (
    Binding,
    Identity,
    IssuerPrivateKey,
    IssuerRecord,
    OtpMessage,
    OtpRecord,
    Partner,
    PendingIssuer,
)
from server.limits import FailureState, Limits, RateRule, Reservation, Window


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, tz-aware UTC."""
        ...


class KeyedHasher(Protocol):
    """HMAC-SHA-256 under a secret key that never leaves the HSM.

    ``purpose`` separates domains (ID, PSUT, OTP, PIN, KBI) so that one key never yields the same
    MAC for two meanings; the parts are length-prefixed so that no two tuples collide.
    """

    def mac(self, purpose: str, *parts: str | bytes) -> bytes: ...


class IssuerKeys(Protocol):
    """Access to issuer signing keys held in the HSM."""

    def signer(self, key_label: str) -> IssuerPrivateKey: ...


class IdentityStore(Protocol):
    def upsert_identity(self, identity: Identity, *, kbi: Mapping[str, bytes] | None = None) -> bool:
        """Insert or replace, in one transaction with the individual's KBI attributes (field id → HMAC), which
        ``kbi`` replaces (None or empty: none enrolled); True when the identity is new."""
        ...

    def get_identity(self, id_hmac: bytes) -> Identity | None: ...


class KbiStore(Protocol):
    """An individual's enrolled KBI attributes, as HMACs keyed by field id (see server/auth/kbi.py)."""

    def kbi_answers(self, id_hmac: bytes) -> Mapping[str, bytes]:
        """Field id → stored HMAC; empty when the individual has none enrolled (or is unknown)."""
        ...


class OtpAttempts(Protocol):
    """What the OTP factor needs of the OTP store (server/auth/otp.py)."""

    def claim_otp_attempt(self, id_hmac: bytes, partner_id: str, now: datetime) -> OtpRecord | None:
        """Atomically count one verification attempt against the latest usable OTP.

        Returns the OTP (with the attempt counted) or None when there is none that is unused,
        unexpired and under its attempt limit.
        """
        ...


class OtpStore(OtpAttempts, Protocol):
    def replace_otp(
        self, otp: OtpRecord, *, send_limit: RateRule | None = None, audit: AuditEvent | None = None
    ) -> None:
        """Store ``otp`` and invalidate every other outstanding OTP of that individual and partner.

        With ``send_limit``, count the send against the individual's limit in the same transaction and
        raise ``RateLimited`` (writing nothing) when it is reached; ``audit`` is appended with the OTP."""
        ...

    def discard_otp(self, transaction_id: str, id_hmac: bytes) -> None: ...


class BindingLookup(Protocol):
    """What the WLA factor needs of the binding store (server/auth/wla.py)."""

    def active_binding(self, id_hmac: bytes, partner_id: str, factor: str) -> Binding | None: ...

    def binding_of(self, id_hmac: bytes, thumbprint: str) -> Binding | None:
        """The individual's binding with this certificate thumbprint (keyed by the individual)."""
        ...


class BindingStore(BindingLookup, Protocol):
    def claim_key(self, key_fingerprint: str, id_hmac: bytes, now: datetime) -> None:
        """Record that the wallet key belongs to this individual, atomically and for good; raises
        ``KeyOwnedByOther`` when another individual claimed it first. Claiming one's own key again is a
        no-op. Its own single-row transaction, on the key's row (a distributed database keeps it on the
        key's shard), so the binding transaction itself stays on the individual's shard."""
        ...

    def commit_binding(
        self,
        binding: Binding,
        *,
        consume_otp: str | None,
        now: datetime,
        consume_nonce: str | None = None,
        audit: AuditEvent | None = None,
        release: Reservation | None = None,
    ) -> None:
        """In one transaction: mark the OTP (and PoP nonce) used if given, supersede the active
        binding for (individual, partner, factor), insert ``binding``, append ``audit`` and give back the
        attempt's ``release`` reservation (see LimitStore.reserve_attempt). Raises ``OtpAlreadyUsed`` and
        writes nothing when a check fails. The caller has claimed the key (``claim_key``) first."""
        ...

    def bindings_for(self, id_hmac: bytes, partner_id: str) -> Sequence[Binding]: ...

    def binding_by_thumbprint(self, thumbprint: str) -> Binding | None:
        """Any binding with this certificate thumbprint (GetBinding: the caller knows no individual)."""
        ...

    def latest_binding_by_psut(self, psut: str, partner_id: str, factor: str) -> Binding | None:
        """The active binding, else the most recent one."""
        ...

    def revoke_binding(
        self,
        id_hmac: bytes,
        partner_id: str,
        factor: str,
        *,
        reason: str,
        now: datetime,
        consume_otp: str | None,
        audit: AuditEvent | None = None,
    ) -> Binding | None:
        """In one transaction: mark the OTP used (if given), revoke the active binding and append ``audit``.
        Returns the revoked binding, or None (writing nothing) when there is no active one."""
        ...


class ReplayCache(Protocol):
    def claim_jti(
        self, id_hmac: bytes, jti: str, expires_at: datetime, now: datetime, *, audit: AuditEvent | None = None
    ) -> bool:
        """Record ``jti`` until ``expires_at`` (appending ``audit`` with it); False, writing nothing, when it
        is already recorded and unexpired."""
        ...


class NonceStore(Protocol):
    def create_nonce(
        self,
        nonce: str,
        id_hmac: bytes,
        partner_id: str,
        expires_at: datetime,
        *,
        now: datetime | None = None,
        limit: RateRule | None = None,
    ) -> None:
        """Store a nonce; with ``limit`` (and ``now``), count it against the individual's nonce limit in the
        same transaction and raise ``RateLimited`` (writing nothing) when it is reached."""
        ...

    def nonce_usable(self, nonce: str, id_hmac: bytes, partner_id: str, now: datetime) -> bool: ...


class IssuerStore(Protocol):
    def add_issuer(self, issuer: IssuerRecord) -> None:
        """Record an installed issuer; a label already recorded (pending or not) is an IntegrityError."""
        ...

    def issuers(self) -> Sequence[IssuerRecord]:
        """Every installed issuer (never a pending one), newest first."""
        ...

    def add_pending_issuer(self, pending: PendingIssuer) -> None:
        """Record a key whose CSR went to an external CA; a label already recorded is an IntegrityError."""
        ...

    def pending_issuers(self) -> Sequence[PendingIssuer]:
        """Keys waiting for their certificate, newest first."""
        ...

    def install_issuer(self, issuer: IssuerRecord) -> bool:
        """Install the certificate of a pending key, atomically; False (writing nothing) when no key of
        that label is pending (never made, or installed meanwhile by another operator)."""
        ...


class LimitStore(Protocol):
    """Abuse-limit counters, shared by every replica through the database."""

    def identity_and_lock(self, id_hmac: bytes) -> tuple[Identity | None, datetime | None]:
        """The identity (None when unknown) and the end of the individual's last lockout (None: never locked).

        One query for a known individual: the lockout check costs the binding path no extra round trip."""
        ...

    def count_partner_otp_send(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        """Count one OTP request of the partner: 0 when within ``rule``, else the seconds until it may retry."""
        ...

    def reserve_attempt(self, id_hmac: bytes, now: datetime, limits: Limits) -> tuple[Identity | None, Reservation]:
        """In one transaction under the individual's lock: read the identity, check the lockout and count the
        attempt as a failure before it is evaluated (``server.limits.reserve``)."""
        ...

    def release_attempt(self, id_hmac: bytes, reservation: Reservation) -> None:
        """Give a successful (or undecided) attempt's reservation back."""
        ...

    def record_auth_failure(
        self,
        id_hmac: bytes,
        now: datetime,
        limits: Limits,
        *,
        audit: AuditEvent,
        lockout_audit: AuditEvent,
        reservation: Reservation | None = None,
    ) -> FailureState:
        """In one transaction: count a failed challenge (already counted when ``reservation`` is given), append
        ``audit``, and ``lockout_audit`` too when this failure starts a lockout. Returns the new state."""
        ...

    def failure_budget(self, partner_id: str) -> tuple[Window, Window]:
        """The failed-challenge windows of the partner and of every partner together."""
        ...

    def count_failure_budget(self, partner_id: str, now: datetime, limits: Limits) -> None:
        """Count one failed challenge against the partner's budget and the global one."""
        ...

    def count_partner_nonce(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        """Count one GetBindingNonce of the partner: 0 when within ``rule``, else the seconds to wait."""
        ...


class AuditLog(Protocol):
    def append_audit(self, event: AuditEvent) -> None:
        """Append ``event`` to its chain in a transaction of its own (for events with no state change)."""
        ...

    def audit_rows(self, after: tuple[bytes, int] | None, limit: int) -> Sequence[AuditRow]:
        """Up to ``limit`` entries after (chain_key, seq), ordered by chain_key then seq: every chain, paged."""
        ...


class Notifier(Protocol):
    def send(self, message: OtpMessage) -> None:
        """Deliver or raise ``DeliveryFailed``."""
        ...


class StoreConflict(Exception):
    """Base of the checks a store transaction makes atomically."""


class OtpAlreadyUsed(StoreConflict):
    """The OTP (or PoP nonce) was consumed (or replaced) by a concurrent request."""


class RateLimited(StoreConflict):
    """A limit was reached; nothing was written."""

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(f"limit reached; retry after {retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class KeyOwnedByOther(StoreConflict):
    """The wallet key is bound to another individual."""


class DeliveryFailed(Exception):
    """A notifier could not deliver a message."""


class BackendUnavailable(Exception):
    """The HSM or the database cannot be reached right now: retryable, nothing was written."""


class StoreUnavailable(BackendUnavailable):
    """The database cannot be reached or is locked beyond the timeout."""


class BackendFailure(Exception):
    """A backend failed in a way retrying will not fix (misconfiguration, missing key)."""


class PartnerCertificateInUse(StoreConflict):
    """The client certificate is already mapped to another partner."""


class PartnerStore(Protocol):
    """Where partners live (the database: every replica sees the same partners)."""

    def add_partner(self, partner: Partner) -> bool:
        """Insert; False (writing nothing) when the id exists. ``PartnerCertificateInUse`` on a taken cert."""
        ...

    def get_partner(self, partner_id: str) -> Partner | None: ...

    def partner_by_certificate(self, fingerprint: str) -> Partner | None: ...

    def list_partners(self) -> Sequence[Partner]: ...

    def set_partner_enabled(self, partner_id: str, enabled: bool, now: datetime) -> bool:
        """False when there is no such partner."""
        ...

    def set_partner_key(self, partner_id: str, api_key_hash: bytes, now: datetime) -> bool: ...

    def set_partner_certificate(self, partner_id: str, fingerprint: str | None, now: datetime) -> bool: ...
