"""Issuer key administration (docs/rotation.md): `keys rotate`, `keys import-cert`, `keys csr`, `keys list`
and `issuer show`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsm import Pkcs11KeyManager
from server.audit import admin_event
from server.certs import (
    IssuerCertificateError,
    build_issuer_certificate,
    build_issuer_csr,
    check_issuer_certificate,
    to_pem,
)
from server.config import DEFAULT_ISSUER_LABEL, Settings
from server.domain import IssuerRecord, PendingIssuer
from server.issuers import IssuerState, IssuerStatus, issuer_statuses, new_issuer_label, published_certificates
from server.stores import Store, open_store

log = logging.getLogger(__name__)


def issuer_chain_pem(store: Store, *, rotation_window_days: int = 60) -> str:
    """What GetIssuerCertificates serves, as one PEM bundle: the active issuer first, then the next and
    retiring ones, then the CA certificates above them."""
    certs = published_certificates(store.issuers(), datetime.now(UTC), timedelta(days=rotation_window_days))
    return "".join(to_pem(c) for c in certs)


# -- issuer key lifecycle (docs/rotation.md) -------------------------------------------------------


class IssuerKeyError(RuntimeError):
    """`keys rotate` or `keys import-cert` refused; nothing was installed. The message says why."""


@dataclass(frozen=True, slots=True)
class RotationReport:
    key_label: str
    state: IssuerState
    not_before: datetime | None
    not_after: datetime | None


def fresh_label(keys: Pkcs11KeyManager, known: set[str], base: str, now: datetime) -> str:
    """A label no issuer row and no HSM object has: labels are primary keys and are never reused."""
    for _ in range(10):
        label = new_issuer_label(base, now)
        if label not in known and not keys.exists(label, "private") and not keys.exists(label, "public"):
            return label
    raise IssuerKeyError("could not find an unused key label")  # 24 random bits, ten tries: not in practice


def rotate_issuer(
    settings: Settings, *, csr_path: Path | None = None, not_before: datetime | None = None
) -> RotationReport:
    """Generate a new issuer key on the HSM under a fresh label, and either its self-signed certificate
    (valid from ``not_before``, default now: from then on it signs new wallet certificates) or, with
    ``csr_path``, a CSR for an external CA (the key stays pending until `import_issuer_certificate`).

    Other replicas pick the new key up from the database within ``issuer_cache_seconds``.
    """
    now = datetime.now(UTC)
    if not_before is not None and not_before.tzinfo is None:
        raise IssuerKeyError("--not-before needs a time zone, e.g. 2027-01-01T00:00:00Z")
    if csr_path is not None:
        if not_before is not None:
            raise IssuerKeyError("--not-before applies to a self-signed certificate; an external CA sets notBefore")
        if csr_path.exists():
            raise IssuerKeyError(f"{csr_path} exists; choose a new file for the CSR")
        if not csr_path.parent.is_dir():
            raise IssuerKeyError(f"{csr_path.parent} is not a directory")
    start = not_before or now
    validity = timedelta(days=settings.issuer_validity_days)
    if start + validity <= now:
        raise IssuerKeyError("--not-before is so far back that the certificate would already have expired")
    settings.apply_environment()
    keys = Pkcs11KeyManager(settings.pkcs11_uri)
    store = open_store(settings.database)
    try:
        known = {r.key_label for r in store.issuers()} | {p.key_label for p in store.pending_issuers()}
        base = settings.pkcs11_uri.object or DEFAULT_ISSUER_LABEL
        label = fresh_label(keys, known, base, now)
        kind = settings.issuer_key_type
        keys.create_key(label, kind)
        signer = keys.create_signer(label)
        # Unique per key (date and random suffix), so no two issuers share a subject name.
        common_name = f"KeyBinder Issuer {label.removeprefix(base + '-')}"
        if csr_path is not None:
            csr = build_issuer_csr(signer, common_name=common_name)
            csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
            # The row first: if writing the file fails, `keys csr LABEL` prints it again.
            store.add_pending_issuer(PendingIssuer(label, str(kind), csr_pem, now))
            store.append_audit(admin_event(now, "keys_rotate", subject=f"{label} pending (CSR)"))
            csr_path.write_text(csr_pem)
            log.info("issuer key %r created; its CSR is in %s", label, csr_path)
            return RotationReport(label, IssuerState.PENDING, None, None)
        cert = build_issuer_certificate(signer, common_name=common_name, now=start, validity=validity)
        record = IssuerRecord(
            label, str(kind), to_pem(cert), cert.not_valid_after_utc, now, not_before=cert.not_valid_before_utc
        )
        store.add_issuer(record)
        store.append_audit(admin_event(now, "keys_rotate", subject=f"{label} self-signed"))
        state = IssuerState.NEXT if record.not_before and record.not_before > now else IssuerState.ACTIVE
        log.info("issuer key %r installed (%s)", label, state)
        return RotationReport(label, state, record.not_before, record.not_after)
    finally:
        store.close()
        keys.close()


def pending_csr(settings: Settings, label: str) -> str:
    """The CSR of a pending key, to hand to the CA again."""
    store = open_store(settings.database)
    try:
        for p in store.pending_issuers():
            if p.key_label == label:
                return p.csr_pem
    finally:
        store.close()
    raise IssuerKeyError(f"no pending issuer key {label!r}")


def _read_certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IssuerKeyError(f"cannot read the {what} {path}: {err.strerror}") from err
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise IssuerKeyError(f"the {what} {path} holds no PEM or DER certificate") from None
    return certs


def import_issuer_certificate(
    settings: Settings, cert_path: Path, *, chain_path: Path | None = None, label: str | None = None
) -> RotationReport:
    """Install the CA-signed certificate of a pending key (found by ``label``, else by public key).

    ``cert_path`` holds the issuer certificate, optionally followed by the CA chain above it; ``chain_path``
    adds more of the chain (intermediates first, the root optional). Refused unless the certificate is for
    the pending key held on the HSM, is a CA certificate with keyCertSign, has not expired, and the chain
    certifies it. The key signs from the certificate's notBefore on.
    """
    now = datetime.now(UTC)
    certs = _read_certificates(cert_path, "certificate file")
    if chain_path is not None:
        certs += _read_certificates(chain_path, "chain file")
    cert, chain = certs[0], certs[1:]
    settings.apply_environment()
    keys = Pkcs11KeyManager(settings.pkcs11_uri)
    store = open_store(settings.database)
    try:
        pending = list(store.pending_issuers())
        if label is not None:
            pending = [p for p in pending if p.key_label == label]
            if not pending:
                raise IssuerKeyError(f"no pending issuer key {label!r} (see `keybinder keys list`)")
        matching = [p for p in pending if x509.load_pem_x509_csr(p.csr_pem.encode()).public_key() == cert.public_key()]
        if not matching:
            raise IssuerKeyError("the certificate's public key is not the key of any pending CSR")
        chosen = matching[0]
        try:
            check_issuer_certificate(cert, keys.get_public_key(chosen.key_label), chain=chain, now=now)
        except IssuerCertificateError as err:
            raise IssuerKeyError(str(err)) from err
        record = IssuerRecord(
            chosen.key_label,
            chosen.key_kind,
            to_pem(cert),
            min(c.not_valid_after_utc for c in certs),
            chosen.created_at,
            not_before=cert.not_valid_before_utc,
            chain_pem="".join(to_pem(c) for c in chain),
        )
        if not store.install_issuer(record):
            raise IssuerKeyError(f"issuer key {chosen.key_label!r} is no longer pending (installed meanwhile?)")
        store.append_audit(admin_event(now, "keys_import_cert", subject=chosen.key_label))
        state = IssuerState.NEXT if cert.not_valid_before_utc > now else IssuerState.ACTIVE
        log.info("issuer certificate for %r installed (%s)", chosen.key_label, state)
        return RotationReport(chosen.key_label, state, record.not_before, record.not_after)
    finally:
        store.close()
        keys.close()


def issuer_key_statuses(settings: Settings) -> list[IssuerStatus]:
    """Every issuer key with its state now (`keybinder keys list`); needs the database only."""
    store = open_store(settings.database)
    try:
        return issuer_statuses(
            store.issuers(),
            store.pending_issuers(),
            datetime.now(UTC),
            timedelta(days=settings.issuer_rotation_window_days),
        )
    finally:
        store.close()
