"""Issuer key lifecycle: which installed key signs at a given time, and the state of each key."""

from __future__ import annotations

import base64
import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.certs import Issuer, to_pem, x5t_s256
from server.domain import IssuerRecord, PendingIssuer
from server.errors import KeyBindingFailedError
from server.keyprofiles import profile_of
from server.ports import IssuerKeys, IssuerStore

log = logging.getLogger(__name__)

#: Random hex digits in a new key label: labels are primary keys and are never reused.
LABEL_SUFFIX_BYTES = 3


class IssuerState(enum.StrEnum):
    """What a key does at a given time. Only ``pending`` is stored; the rest follow from the clock,
    so every replica derives the same state from the same rows without anyone updating them."""

    #: A CSR is out, no certificate is installed: never signs, never published.
    PENDING = "pending"
    #: Installed, but its not_before is still ahead: published (relying parties can fetch it early).
    NEXT = "next"
    #: Signs new wallet certificates.
    ACTIVE = "active"
    #: No longer signs; published until its notAfter, which bounds every certificate it signed.
    RETIRING = "retiring"
    #: Past its notAfter: no certificate it signed is valid any more; not published.
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class IssuerStatus:
    """One line of `keybinder keys list`."""

    key_label: str
    key_kind: str
    state: IssuerState
    not_before: datetime | None
    not_after: datetime | None
    created_at: datetime


def may_sign_from(record: IssuerRecord) -> datetime:
    return record.not_before or record.created_at


def _newest(record: IssuerRecord) -> tuple[datetime, datetime]:
    return record.created_at, may_sign_from(record)


def signing_issuer(records: Iterable[IssuerRecord], now: datetime, window: timedelta) -> IssuerRecord | None:
    """The key that signs at ``now``.

    The newest key (the one generated last: an external CA may backdate notBefore) that has
    started and is still outside its own pre-expiry window. When every started key is inside its
    window (no rotation happened in time), the one that lives longest, so wallet certificates are
    cut short as little as possible; None when no installed key is valid at ``now``.
    """
    started = [r for r in records if may_sign_from(r) <= now < r.not_after]
    fresh = [r for r in started if now < r.not_after - window]
    if fresh:
        return max(fresh, key=_newest)
    if started:
        return max(started, key=lambda r: (r.not_after, r.created_at))
    return None


def state_of(record: IssuerRecord, active: IssuerRecord | None, now: datetime) -> IssuerState:
    if active is not None and record.key_label == active.key_label:
        return IssuerState.ACTIVE
    if now >= record.not_after:
        return IssuerState.EXPIRED
    if now < may_sign_from(record):
        return IssuerState.NEXT
    return IssuerState.RETIRING


def published_issuers(records: Sequence[IssuerRecord], now: datetime, window: timedelta) -> list[IssuerRecord]:
    """The issuers GetIssuerCertificates lists: the active one first, then every other key that is
    next or retiring, newest first. Expired and pending keys are left out."""
    active = signing_issuer(records, now, window)
    rest = sorted(
        (r for r in records if r is not active and state_of(r, active, now) is not IssuerState.EXPIRED),
        key=_newest,
        reverse=True,
    )
    return ([active] if active is not None else []) + rest


def published_chains(
    records: Sequence[IssuerRecord], now: datetime, window: timedelta
) -> list[tuple[x509.Certificate, list[x509.Certificate]]]:
    """Each certificate of `published_issuers`, in that order, with the CA certificates above it (none
    for a self-signed issuer)."""
    return [
        (
            x509.load_pem_x509_certificate(r.certificate_pem.encode()),
            x509.load_pem_x509_certificates(r.chain_pem.encode()) if r.chain_pem else [],
        )
        for r in published_issuers(records, now, window)
    ]


def published_certificates(records: Sequence[IssuerRecord], now: datetime, window: timedelta) -> list[x509.Certificate]:
    """The certificates of `published_issuers`, in that order, followed by the CA certificates above
    them (when an external CA signed them), each once: enough to verify every valid wallet certificate."""
    chains = published_chains(records, now, window)
    certs = [issuer for issuer, _ in chains]
    for _, chain in chains:
        for ca in chain:
            if ca not in certs:
                certs.append(ca)
    return certs


def issuer_statuses(
    records: Sequence[IssuerRecord], pending: Sequence[PendingIssuer], now: datetime, window: timedelta
) -> list[IssuerStatus]:
    """Every key with its state at ``now``, newest first (pending keys first of all)."""
    active = signing_issuer(records, now, window)
    statuses = [IssuerStatus(p.key_label, p.key_kind, IssuerState.PENDING, None, None, p.created_at) for p in pending]
    for r in sorted(records, key=_newest, reverse=True):
        statuses.append(
            IssuerStatus(r.key_label, r.key_kind, state_of(r, active, now), may_sign_from(r), r.not_after, r.created_at)
        )
    return statuses


def rotation_due(records: Sequence[IssuerRecord], now: datetime, window: timedelta) -> str | None:
    """Why an operator should run `keybinder keys rotate` now, or None when nothing is due."""
    active = signing_issuer(records, now, window)
    if active is None:
        return "no installed issuer key is valid now: wallet certificates cannot be issued"
    if now < active.not_after - window:
        return None
    if any(state_of(r, active, now) is IssuerState.NEXT for r in records):
        return None
    return (
        f"the active issuer key {active.key_label!r} expires at {active.not_after:%Y-%m-%dT%H:%M:%SZ}, within the"
        " rotation window, and no next key is installed: wallet certificates are cut short to its notAfter"
    )


def new_issuer_label(base: str, now: datetime) -> str:
    """A fresh label for a rotated key, e.g. ``keybinder-issuer-20261129-3fa9c1``."""
    return f"{base}-{now:%Y%m%d}-{secrets.token_hex(LABEL_SUFFIX_BYTES)}"


def published_pems(chains: Sequence[tuple[x509.Certificate, Sequence[x509.Certificate]]]) -> list[str]:
    """The issuers' certificates, then the CA certificates above them, each once, as PEM."""
    certificates = [issuer for issuer, _ in chains]
    for _, chain in chains:
        certificates += [ca for ca in chain if ca not in certificates]
    return [to_pem(c) for c in certificates]


def issuer_jwks(chains: Sequence[tuple[x509.Certificate, Sequence[x509.Certificate]]]) -> dict[str, Any]:
    """A JWKS with one key per issuer: kid = x5t#S256 of its certificate, x5c = that certificate and
    the chain above it. A CA certificate above an issuer is never a key of the JWKS."""
    keys = []
    for cert, chain in chains:
        public = cert.public_key()
        profile = profile_of(public)
        jwk = profile.jwk(public)
        jwk.update(
            kid=x5t_s256(cert),
            use="sig",
            alg=profile.jwks_alg,
            x5c=[base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in [cert, *chain]],
        )
        jwk["x5t#S256"] = x5t_s256(cert)
        keys.append(jwk)
    return {"keys": keys}


#: How often a replica repeats the "rotate now" warning while it keeps re-reading the issuers.
ISSUER_WARNING_INTERVAL_SECONDS = 3600.0


class IssuerCache:
    """A replica's view of the issuers table, the choice of the key that signs, and the HSM signers of the
    keys it has used.

    The installed issuers are read at most once per ``ttl_seconds`` (monotonic time), so a binding costs no
    issuer query and a key rotated by another process is picked up within the TTL. What is published
    (`certificates`, `chains`) is read from the store on every call instead, so a rotation shows there at once.
    Times of day are passed in by the caller (its clock); the TTL runs on `monotonic`.
    """

    def __init__(self, store: IssuerStore, keys: IssuerKeys, *, window: timedelta, ttl_seconds: float) -> None:
        self._store = store
        self._keys = keys
        self._window = window
        self._ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._records: tuple[IssuerRecord, ...] | None = None
        self._loaded_at = 0.0
        self._warned_at = -ISSUER_WARNING_INTERVAL_SECONDS
        self._signers: dict[str, Issuer] = {}
        #: The TTL's clock: monotonic, so a stepped wall clock neither freezes nor floods the cache.
        self.monotonic: Callable[[], float] = time.monotonic

    def refresh(self) -> None:
        """Forget the cached issuer list: the next binding reads it again (after `keys rotate` in-process)."""
        self._records = None

    def warning(self, now: datetime) -> str | None:
        """Why the issuer keys need an operator at ``now`` (rotation due, or no valid key), else None."""
        return rotation_due(self._installed(now, force=False), now, self._window)

    def certificates(self, now: datetime) -> list[x509.Certificate]:
        """`published_certificates` of the issuers as the store has them now (uncached)."""
        return published_certificates(list(self._store.issuers()), now, self._window)

    def chains(self, now: datetime) -> list[tuple[x509.Certificate, list[x509.Certificate]]]:
        """`published_chains` of the issuers as the store has them now (uncached)."""
        return published_chains(list(self._store.issuers()), now, self._window)

    def active(self, now: datetime) -> Issuer:
        """The issuer that signs new wallet certificates at ``now``; KeyBindingFailedError when none may."""
        record = signing_issuer(self._installed(now, force=False), now, self._window)
        if record is None:  # perhaps a key was installed since the last read
            record = signing_issuer(self._installed(now, force=True), now, self._window)
        if record is None:
            log.error("no valid issuer key; run `keybinder keys rotate`")
            raise KeyBindingFailedError("key binding failed: no usable issuer")
        issuer = self._signers.get(record.key_label)
        if issuer is None:  # a label's row never changes once installed, so its Issuer is kept for good
            chain = tuple(x509.load_pem_x509_certificates(record.chain_pem.encode())) if record.chain_pem else ()
            cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
            issuer = Issuer(record.key_label, cert, self._keys.signer(record.key_label), chain)
            self._signers[record.key_label] = issuer
            log.info("issuer key %r signs new wallet certificates", record.key_label)
        return issuer

    def _installed(self, now: datetime, *, force: bool) -> tuple[IssuerRecord, ...]:
        """The installed issuers, from the cache while it is younger than the TTL (unless ``force``)."""
        records = self._records
        if not force and records is not None and self.monotonic() - self._loaded_at < self._ttl_seconds:
            return records
        with self._lock:
            if not force and self._records is not None and self._records is not records:
                return self._records  # another thread refreshed it meanwhile
            fresh = tuple(self._store.issuers())
            self._records, self._loaded_at = fresh, self.monotonic()
        warning = rotation_due(fresh, now, self._window)
        if warning is not None and self.monotonic() - self._warned_at >= ISSUER_WARNING_INTERVAL_SECONDS:
            self._warned_at = self.monotonic()
            log.warning("issuer keys: %s; run `keybinder keys rotate`", warning)
        return fresh
