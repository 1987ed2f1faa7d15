"""Wiring: builds the service and its backends from settings, and the idempotent `init`."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsm import KeyKind, Pkcs11KeyManager, init_token, token_exists
from server.audit import admin_event
from server.auth.kbi import enrolment_values
from server.certs import (
    IssuerCertificateError,
    build_issuer_certificate,
    build_issuer_csr,
    check_issuer_certificate,
    to_pem,
)
from server.config import DEFAULT_ISSUER_LABEL, Settings, redact_url
from server.domain import Identity, IssuerRecord, OtpChannel, Partner, PendingIssuer
from server.hsm_backend import HsmHasher, HsmIssuerKeys
from server.issuers import IssuerState, IssuerStatus, issuer_statuses, new_issuer_label, published_certificates
from server.keyprofiles import find_profile, profile_of
from server.notifiers import ChannelRouter, DeadlineNotifier, read_secret
from server.notifiers.outbox import OutboxNotifier
from server.notifiers.smtp import SmtpConfig, SmtpNotifier
from server.notifiers.webhook import WebhookConfig, WebhookNotifier
from server.partners import PartnerAuthenticator, hash_api_key, new_api_key
from server.pin_policy import check_pin
from server.ports import Notifier
from server.service import KeyBinderService
from server.stores import Store, migrate, open_store
from server.sweeper import Sweeper

log = logging.getLogger(__name__)


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class App:
    """Everything one process owns; `close` releases it (HSM logout, DB connections)."""

    settings: Settings
    keys: Pkcs11KeyManager
    store: Store
    service: KeyBinderService
    partners: PartnerAuthenticator
    notifier: Notifier | None = None

    def probe(self) -> None:
        """A database write (rolled back) and one signature with the active issuer key in the HSM.

        The write shows what a read cannot: a database that is read-only or whose disk is full. Its outcome
        feeds the circuit breaker, so requests are refused at once while the database is known down."""
        try:
            self.store.check_writable()
        except Exception as err:
            self.service.breaker.failed(f"{type(err).__name__}: {err}")
            raise
        self.service.breaker.succeeded()
        signer = self.service.active_issuer().signer
        profile_of(signer.public_key()).sign(signer, b"keybinder health probe")

    def sweeper(self) -> Sweeper:
        """Periodic maintenance (expired rows, signed audit heads) for this process."""
        return Sweeper(self.store, self.service.hasher, self.settings.limits(), batch=self.settings.sweep_batch_rows)

    def close(self) -> None:
        if isinstance(self.notifier, DeadlineNotifier):
            self.notifier.close()
        self.store.close()
        self.keys.close()


def build_notifier(settings: Settings) -> Notifier:
    """The OTP notifier per channel; reads the SMTP password and webhook secret from their sources."""
    backends: dict[str, Notifier] = {}

    def backend(name: str) -> Notifier:
        if name in backends:
            return backends[name]
        notifier: Notifier
        if name == "smtp":
            notifier = SmtpNotifier(
                SmtpConfig(
                    host=settings.smtp_host,
                    port=settings.smtp_port,
                    from_address=settings.smtp_from,
                    starttls=settings.smtp_starttls,
                    username=settings.smtp_username,
                    password=read_secret(settings.smtp_password_source, "SMTP password")
                    if settings.smtp_username
                    else "",
                    timeout_seconds=settings.smtp_timeout_seconds,
                    ca_file=settings.smtp_ca_file,
                    otp_ttl_seconds=settings.otp_ttl_seconds,
                )
            )
        elif name == "webhook":
            notifier = WebhookNotifier(
                WebhookConfig(
                    url=settings.webhook_url,
                    secret=read_secret(settings.webhook_secret_source, "webhook HMAC secret").encode(),
                    timeout_seconds=settings.webhook_timeout_seconds,
                    retries=settings.webhook_retries,
                    deadline_seconds=settings.notifier_deadline_seconds,
                    ca_file=settings.webhook_ca_file,
                    otp_ttl_seconds=settings.otp_ttl_seconds,
                )
            )
        else:
            notifier = OutboxNotifier(settings.outbox)
        backends[name] = notifier
        return notifier

    router = ChannelRouter(
        {OtpChannel.EMAIL: backend(settings.email_notifier), OtpChannel.PHONE: backend(settings.phone_notifier)}
    )
    # Every backend may meet a slow or hostile peer: each delivery gets a total deadline and a bounded pool.
    return DeadlineNotifier(router, settings.notifier_deadline_seconds)


def build_app(settings: Settings) -> App:
    """Connect to the token (this process logs in itself) and the database."""
    notifier = build_notifier(settings)  # first: a missing secret must not leave a session open
    settings.apply_environment()
    keys = Pkcs11KeyManager(settings.pkcs11_uri)
    keys.session.open()
    store = open_store(settings.database)
    service = KeyBinderService(
        policy=settings.policy(),
        clock=SystemClock(),
        hasher=HsmHasher(keys, settings.hmac_key_label),
        issuer_keys=HsmIssuerKeys(keys),
        identities=store,
        otps=store,
        bindings=store,
        issuers=store,
        notifier=notifier,
        replay=store,
        nonces=store,
        limit_store=store,
        audit_log=store,
        kbi=store,
        aliases=store,
    )
    partners = PartnerAuthenticator(store, cache_seconds=settings.partner_cache_seconds)
    return App(settings, keys, store, service, partners, notifier)


def _write_secret(path: Path) -> None:
    """Create a random PIN file readable by the owner only (never shown, never on argv)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(18) + "\n")


#: The partner `make run` registers for the example client (`keybinder demo`).
DEMO_PARTNER = "demo-wallet"


def ensure_demo_partner(settings: Settings, store: Store, now: datetime) -> bool:
    """Register the demo partner once, its key in ``demo-partner.key`` (0600); True when something was created.

    Idempotent: a second run changes nothing. If the database was recreated but the key file survived,
    the partner is registered again with the key from the file; if the file was deleted, the demo
    partner gets a new key (the only case in which its key changes).
    """
    path = settings.demo_partner_key_file
    existing = store.get_partner(DEMO_PARTNER)
    if path.exists():
        if existing is not None:
            return False
        key = path.read_text().strip()
    else:
        key = new_api_key()
        # O_EXCL: never overwrite a key someone else wrote meanwhile; 0600 from the start, never wider.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        if existing is not None:
            store.set_partner_key(DEMO_PARTNER, hash_api_key(key), now)
            return True
    store.add_partner(Partner(DEMO_PARTNER, hash_api_key(key), True, None, now, now))
    return True


@dataclass(frozen=True, slots=True)
class InitReport:
    created: list[str]
    reused: list[str]


def initialise(settings: Settings, *, demo_partner: bool = False) -> InitReport:
    """Create whatever is missing: token, PINs, HMAC key, issuer key and certificate, schema, and
    (with ``demo_partner``) the demo partner whose API key goes to ``<data_dir>/demo-partner.key``."""
    created: list[str] = []
    reused: list[str] = []
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    uri = settings.pkcs11_uri
    managed_token = not settings.hsm_uri

    if managed_token:
        conf = settings.softhsm_conf_path
        if not conf.exists() and "SOFTHSM2_CONF" not in os.environ:
            tokens = data_dir / "tokens"
            tokens.mkdir(exist_ok=True, mode=0o700)
            conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
            created.append(f"SoftHSM config {conf}")
        for pin_file in (settings.pin_file, settings.so_pin_file):
            if not pin_file.exists():
                _write_secret(pin_file)
    settings.apply_environment()

    # Token initialisation goes through raw PKCS#11 before python-pkcs11 loads the module; the
    # URI (not its bare module path) is passed so that the module's environment is applied first.
    if token_exists(uri, uri.token):
        reused.append(f"token {uri.token!r}")
    else:
        if not managed_token:
            raise RuntimeError(f"token {uri.token!r} not found; create it on the HSM first")
        init_token(
            uri,
            uri.token,
            so_pin=settings.so_pin_file.read_text().strip(),
            user_pin=uri.read_pin(),
        )
        created.append(f"token {uri.token!r}")

    applied = migrate(settings.database)
    (created if applied else reused).append(f"database {redact_url(settings.database)}")

    keys = Pkcs11KeyManager(uri)
    store = open_store(settings.database)
    try:
        if keys.exists(settings.hmac_key_label, "secret"):
            reused.append(f"HMAC key {settings.hmac_key_label!r}")
        else:
            keys.create_hmac_key(settings.hmac_key_label)
            created.append(f"HMAC key {settings.hmac_key_label!r}")

        label = uri.object or DEFAULT_ISSUER_LABEL
        now = datetime.now(UTC)
        installed = store.issuers()
        valid = [r for r in installed if r.not_after > now]
        if valid:
            reused.append(f"issuer {valid[0].key_label!r}")
        else:
            known = {r.key_label for r in installed} | {p.key_label for p in store.pending_issuers()}
            if label in known:  # every issuer has expired: a key label is never reused
                label = _fresh_label(keys, known, label, now)
            if keys.exists(label, "private"):
                reused.append(f"issuer key {label!r}")
                kind = _kind_of(keys, label, settings.issuer_key_type)
            else:
                keys.create_key(label, settings.issuer_key_type)
                kind = settings.issuer_key_type
                created.append(f"issuer key {label!r} ({kind})")
            cert = build_issuer_certificate(
                keys.create_signer(label),
                common_name=f"KeyBinder Issuer {now:%Y-%m-%d}",
                now=now,
                validity=timedelta(days=settings.issuer_validity_days),
            )
            store.add_issuer(
                IssuerRecord(
                    label,
                    str(kind),
                    to_pem(cert),
                    cert.not_valid_after_utc,
                    now,
                    not_before=cert.not_valid_before_utc,
                )
            )
            created.append(f"issuer certificate for {label!r}")
        if demo_partner:
            (created if ensure_demo_partner(settings, store, now) else reused).append(f"demo partner {DEMO_PARTNER!r}")
    finally:
        store.close()
        keys.close()
    return InitReport(created, reused)


def _kind_of(keys: Pkcs11KeyManager, label: str, fallback: KeyKind) -> KeyKind:
    profile = find_profile(keys.get_public_key(label))
    return KeyKind(profile.key_kind) if profile is not None else fallback


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


def _fresh_label(keys: Pkcs11KeyManager, known: set[str], base: str, now: datetime) -> str:
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
        label = _fresh_label(keys, known, base, now)
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


def check_identity(
    service: KeyBinderService, *, individual_id: str, pin: str | None, kbi: Mapping[str, str] | None = None
) -> None:
    """Validate an identity before anything is written (KeyBinderError or ValueError, a guessable PIN too)."""
    service.check_individual_id(individual_id)
    if pin is not None:
        check_pin(pin)
    if kbi:
        enrolment_values(service.policy.kbi_fields, kbi, id_field=service.policy.kbi_individual_id_field)


def identity_record(
    service: KeyBinderService,
    *,
    individual_id: str,
    email: str | None,
    phone: str | None,
    name: str | None,
    pin: str | None,
    kbi: Mapping[str, str] | None = None,
) -> Identity:
    """The row to store for an individual (checked first, its KBI answers too): only HMACs of the ID and PIN."""
    check_identity(service, individual_id=individual_id, pin=pin, kbi=kbi)
    id_hmac = service.id_hmac(individual_id)
    pin_hmac = service.pin_hmac(id_hmac, pin) if pin is not None else None
    return Identity(id_hmac, email or None, phone or None, name or None, pin_hmac)


def register_identity(
    service: KeyBinderService,
    store: Store,
    *,
    individual_id: str,
    email: str | None,
    phone: str | None,
    name: str | None,
    pin: str | None,
    kbi: Mapping[str, str] | None = None,
) -> bool:
    """Add or update an individual (replacing its PIN and KBI attributes); only HMACs of the ID, the PIN and the
    normalised KBI attributes are stored."""
    check_identity(service, individual_id=individual_id, pin=pin, kbi=kbi)
    id_hmac = service.id_hmac(individual_id)
    if service.resolve(individual_id) != id_hmac:
        raise ValueError("this ID is an alias of a registered individual; revoke the alias first")
    pin_hmac = service.pin_hmac(id_hmac, pin) if pin is not None else None
    kbi_hmacs = service.kbi_hmacs(id_hmac, kbi) if kbi else None
    return store.upsert_identity(Identity(id_hmac, email or None, phone or None, name or None, pin_hmac), kbi=kbi_hmacs)
