"""The idempotent `keybinder init`: token, PINs, HMAC key, the first issuer key and certificate, the schema,
and the demo partner."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hsm import KeyKind, Pkcs11KeyManager, init_token, token_exists
from server.certs import build_issuer_certificate, to_pem
from server.config import DEFAULT_ISSUER_LABEL, Settings, redact_url
from server.domain import IssuerRecord, Partner
from server.issuer_admin import fresh_label
from server.keyprofiles import find_profile
from server.partners import hash_api_key, new_api_key
from server.stores import Store, migrate, open_store


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
                label = fresh_label(keys, known, label, now)
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
