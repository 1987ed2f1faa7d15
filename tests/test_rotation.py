"""Issuer key rotation: the lifecycle rules, `keys rotate` / `import-cert` / `list`, and certificates issued
before and after a rotation verifying against what GetIssuerCertificates serves (openssl and cryptography)."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from yoyo import get_backend, read_migrations

from server import issuers as lifecycle
from server.app import App, build_app
from server.auth import Challenge
from server.certs import build_issuer_certificate, to_pem, x5t_s256
from server.config import Settings, load_settings
from server.domain import IssuerRecord, PendingIssuer
from server.enrolment import register_identity
from server.errors import KeyBindingFailedError
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.issuer_admin import IssuerKeyError, import_issuer_certificate, issuer_key_statuses, rotate_issuer
from server.issuers import IssuerCache, IssuerState
from server.ports import IssuerKeys, IssuerStore
from server.provisioning import initialise
from server.stores import open_store
from server.stores import postgres as pg
from server.stores import sqlite as sqlite_store
from tests.conftest import (
    Person,
    RunningServer,
    bind_request,
    fresh_database,
    md,
    pin_challenge,
    running,
)
from tests.test_cli import cli_env

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
WINDOW = timedelta(days=60)
PIN = "364158"


# -- the lifecycle rules, on records alone -------------------------------------------------------


def record(label: str, not_before: datetime, days: int) -> IssuerRecord:
    return IssuerRecord(label, "ec-p256", f"PEM {label}", not_before + days * DAY, not_before, not_before=not_before)


def test_the_newest_started_key_outside_its_window_signs() -> None:
    old = record("old", T0, 1095)
    new = record("new", T0 + 1000 * DAY, 1095)
    scheduled = record("scheduled", T0 + 1100 * DAY, 1095)
    keys = [old, new, scheduled]
    assert lifecycle.signing_issuer(keys, T0 + DAY, WINDOW) is old
    assert lifecycle.signing_issuer(keys, T0 + 1000 * DAY, WINDOW) is new  # newest wins as soon as it starts
    assert lifecycle.signing_issuer(keys, T0 + 1100 * DAY, WINDOW) is scheduled
    states = {r.key_label: lifecycle.state_of(r, old, T0 + DAY) for r in keys}
    assert states == {"old": IssuerState.ACTIVE, "new": IssuerState.NEXT, "scheduled": IssuerState.NEXT}
    at = T0 + 1050 * DAY
    states = {r.key_label: lifecycle.state_of(r, new, at) for r in keys}
    assert states == {"old": IssuerState.RETIRING, "new": IssuerState.ACTIVE, "scheduled": IssuerState.NEXT}
    assert lifecycle.state_of(old, new, T0 + 1095 * DAY) is IssuerState.EXPIRED


def test_inside_the_window_an_older_key_outside_its_own_window_is_preferred() -> None:
    long_lived = record("long", T0, 3650)
    short = record("short", T0 + 10 * DAY, 70)  # newer, but its window starts 10 days after it does
    assert lifecycle.signing_issuer([long_lived, short], T0 + 15 * DAY, WINDOW) is short
    assert lifecycle.signing_issuer([long_lived, short], T0 + 25 * DAY, WINDOW) is long_lived


def test_with_every_key_in_its_window_the_longest_lived_signs_and_rotation_is_due() -> None:
    a = record("a", T0, 100)
    b = record("b", T0 + DAY, 90)
    at = T0 + 80 * DAY  # both inside their 60-day windows
    assert lifecycle.signing_issuer([a, b], at, WINDOW) is a
    assert lifecycle.signing_issuer([a, b], T0 + 100 * DAY, WINDOW) is None  # a expired, b has too
    assert lifecycle.rotation_due([a, b], T0 + DAY, WINDOW) is None
    due = lifecycle.rotation_due([a, b], at, WINDOW)
    assert due is not None
    assert "'a'" in due
    assert "rotation window" in due
    # A next key, installed ahead of time, is the rotation: nothing to warn about.
    assert lifecycle.rotation_due([a, b, record("c", at + DAY, 1095)], at, WINDOW) is None
    assert "no installed issuer key" in (lifecycle.rotation_due([], at, WINDOW) or "")


def test_published_issuers_lead_with_the_active_key_and_leave_out_expired_ones() -> None:
    expired = record("expired", T0 - 2000 * DAY, 1095)
    old = record("old", T0, 1095)
    new = record("new", T0 + 1000 * DAY, 1095)
    scheduled = record("scheduled", T0 + 1100 * DAY, 1095)
    listed = lifecycle.published_issuers([expired, scheduled, old, new], T0 + 1050 * DAY, WINDOW)
    assert [r.key_label for r in listed] == ["new", "scheduled", "old"]
    statuses = lifecycle.issuer_statuses(
        [expired, old, new], [PendingIssuer("p", "ec-p384", "CSR", T0)], T0 + 1050 * DAY, WINDOW
    )
    assert [(s.key_label, s.state) for s in statuses] == [
        ("p", IssuerState.PENDING),
        ("new", IssuerState.ACTIVE),
        ("old", IssuerState.RETIRING),
        ("expired", IssuerState.EXPIRED),
    ]


def test_new_labels_are_fresh() -> None:
    labels = {lifecycle.new_issuer_label("keybinder-issuer", T0) for _ in range(50)}
    assert len(labels) == 50
    assert all(label.startswith("keybinder-issuer-20300101-") for label in labels)


# -- migrations -------------------------------------------------------------------------------


def test_sqlite_migration_keeps_issuers_and_makes_them_installed(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    backend = get_backend(f"sqlite:///{path}")
    try:
        early = read_migrations(sqlite_store.migrations_dir()).filter(
            lambda m: m.id in {"0001_initial", "0002_wla_revocation"}
        )
        with backend.lock():
            backend.apply_migrations(backend.to_apply(early))
    finally:
        backend.connection.close()
    rows = [
        ("keybinder-issuer", "ec-p256", "PEM 1", "2028-01-01T00:00:00.000000Z", "2025-01-01T00:00:00.000000Z"),
        ("second", "ed25519", "PEM 2", "2029-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z"),
    ]
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany("INSERT INTO issuers VALUES (?, ?, ?, ?, ?)", rows)
    assert sqlite_store.migrate(path) >= 1
    store = sqlite_store.SqliteStore(path)
    try:
        migrated = store.issuers()
        assert [(r.key_label, r.key_kind, r.certificate_pem) for r in migrated] == [r[:3] for r in rows[::-1]]
        assert all(r.not_before == r.created_at for r in migrated)
        assert store.pending_issuers() == []
        # The newest existing issuer is the active one, as it was before the migration.
        active = lifecycle.signing_issuer(migrated, datetime(2026, 6, 1, tzinfo=UTC), WINDOW)
        assert active is not None
        assert active.key_label == "second"
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO issuers (key_label, key_kind, created_at) VALUES ('x', 'ec-p256', 'now')")


def test_pg_migration_keeps_issuers_and_makes_them_installed() -> None:
    with fresh_database("kb_rot_mig") as url:
        backend = get_backend(pg.yoyo_url(url))
        try:
            early = read_migrations(pg.migrations_dir()).filter(lambda m: m.id < "0004")
            with backend.lock():
                backend.apply_migrations(backend.to_apply(early))
        finally:
            backend.connection.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO issuers VALUES ('keybinder-issuer', 'ec-p256', 'PEM 1', %s, %s)", (T0 + 1095 * DAY, T0)
            )
        assert pg.migrate(url) >= 1
        store = pg.PostgresStore(url)
        try:
            assert store.issuers() == [
                IssuerRecord("keybinder-issuer", "ec-p256", "PEM 1", T0 + 1095 * DAY, T0, not_before=T0)
            ]
        finally:
            store.close()
        with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO issuers (key_label, key_kind, created_at) VALUES ('x', 'ec-p256', now())")


# -- a KeyBinder of its own (its own database, the session's token) ------------------------------


@dataclass
class World:
    settings: Settings
    kb: RunningServer

    @property
    def app(self) -> App:
        return self.kb.app


def own_settings(settings: Settings, directory: Path, **update: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{directory / 'kb.db'}",
        "outbox_path": directory / "outbox.jsonl",
        "issuer_cache_seconds": 0.0,
    }
    values.update(update)
    return settings.model_copy(update=values)


@pytest.fixture
def world(settings: Settings, tmp_path: Path) -> Iterator[World]:
    own = own_settings(settings, tmp_path)
    initialise(own)
    with running(own) as server:
        yield World(own, server)


def bind(w: World) -> x509.Certificate:
    """Register a new individual with a PIN and bind a fresh wallet key; the wallet certificate."""
    individual = f"{secrets.randbelow(10**12):012d}"
    register_identity(w.app.service, w.app.store, individual_id=individual, email=None, phone=None, name="R", pin=PIN)
    _, jwk = new_wallet_key("ec-p256")
    person = Person(individual, "", "", PIN)
    resp = w.kb.stub.DoKeyBinding(bind_request(person, jwk, pin_challenge(PIN)), metadata=md())
    return x509.load_pem_x509_certificate(resp.certificate.encode())


def served(w: World) -> pb.GetIssuerCertificatesResponse:
    resp: pb.GetIssuerCertificatesResponse = w.kb.stub.GetIssuerCertificates(
        pb.GetIssuerCertificatesRequest(), metadata=md()
    )
    return resp


def keybinder(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's `keybinder` command against this world's database."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            *args,
            "--data-dir",
            str(w.settings.data_dir),
            "--database-url",
            w.settings.database,
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        check=False,
    )


def openssl_verify(
    tmp_path: Path, leaf: x509.Certificate, trusted: Sequence[str], untrusted: Sequence[str] = ()
) -> str:
    leaf_file = tmp_path / f"leaf-{secrets.token_hex(4)}.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    ca_file = tmp_path / "trusted.pem"
    ca_file.write_text("".join(trusted))
    args = ["openssl", "verify", "-CAfile", str(ca_file)]
    if untrusted:
        (tmp_path / "untrusted.pem").write_text("".join(untrusted))
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    result = subprocess.run([*args, str(leaf_file)], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def crypto_verify(
    leaf: x509.Certificate, trusted: Sequence[x509.Certificate], untrusted: Sequence[x509.Certificate] = ()
) -> list[x509.Certificate]:
    """Path validation with cryptography: webpki rules for the CAs; the wallet profile (no SAN, as
    eSignet's) is accepted as an end entity."""
    builder = verification.PolicyBuilder().extension_policies(
        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
        ee_policy=verification.ExtensionPolicy.permit_all(),
    )
    verifier = builder.store(verification.Store(list(trusted))).time(datetime.now(UTC)).build_client_verifier()
    return list(verifier.verify(leaf, list(untrusted)).chain)


def labels(w: World) -> dict[str, IssuerState]:
    return {s.key_label: s.state for s in issuer_key_statuses(w.settings)}


# -- rotation through the real server and the CLI ----------------------------------------------


def test_certificates_from_before_and_after_rotate_verify_with_the_served_issuers(world: World, tmp_path: Path) -> None:
    before = bind(world)
    (old_label,) = labels(world)

    result = keybinder(world, "keys", "rotate")
    assert result.returncode == 0, result.stderr
    assert "created  issuer key" in result.stdout
    assert "(active)" in result.stdout
    states = labels(world)
    (new_label,) = set(states) - {old_label}
    assert new_label.startswith("keybinder-issuer-")
    assert states == {new_label: IssuerState.ACTIVE, old_label: IssuerState.RETIRING}

    after = bind(world)
    resp = served(world)
    issuers = [x509.load_pem_x509_certificate(p.encode()) for p in resp.certificates]
    assert len(issuers) == 2
    new_issuer, old_issuer = issuers  # the active key first
    assert before.issuer == old_issuer.subject
    assert after.issuer == new_issuer.subject != old_issuer.subject
    after.verify_directly_issued_by(new_issuer)
    before.verify_directly_issued_by(old_issuer)
    assert after.not_valid_after_utc <= new_issuer.not_valid_after_utc

    for leaf, issuer in ((before, old_issuer), (after, new_issuer)):
        assert openssl_verify(tmp_path, leaf, list(resp.certificates)).strip().endswith(": OK")
        assert crypto_verify(leaf, issuers) == [leaf, issuer]
    # The JWKS names both keys too.
    assert len(json.loads(resp.jwks)["keys"]) == 2

    listing = keybinder(world, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert lines == {new_label: "active", old_label: "retiring"}


def test_a_scheduled_key_is_published_before_it_signs(world: World, tmp_path: Path) -> None:
    start = datetime.now(UTC) + timedelta(days=10)
    result = keybinder(world, "keys", "rotate", "--not-before", start.isoformat())
    assert result.returncode == 0, result.stderr
    assert "(next)" in result.stdout
    states = labels(world)
    assert sorted(states.values()) == [IssuerState.ACTIVE, IssuerState.NEXT]
    resp = served(world)
    assert len(resp.certificates) == 2
    active, scheduled = (x509.load_pem_x509_certificate(p.encode()) for p in resp.certificates)
    assert scheduled.not_valid_before_utc == start.replace(microsecond=0)
    cert = bind(world)
    assert cert.issuer == active.subject  # the next key does not sign before its time

    class Later:
        def now(self) -> datetime:
            return start + timedelta(seconds=1)

    world.app.service.clock = Later()
    later = bind(world)
    assert later.issuer == scheduled.subject
    assert later.not_valid_before_utc == start.replace(microsecond=0) + timedelta(seconds=1)


def test_rotate_refuses_bad_options_and_creates_nothing(world: World, tmp_path: Path) -> None:
    existing = tmp_path / "exists.csr"
    existing.write_text("keep me")
    before = labels(world)
    for args, message in (
        (["--csr", str(existing)], "exists"),
        (["--csr", str(tmp_path / "no-such-dir" / "x.csr")], "not a directory"),
        (["--not-before", "yesterday"], "not an ISO 8601 time"),
        (["--not-before", "2027-01-01T00:00:00"], "time zone"),
        (["--not-before", "2001-01-01T00:00:00Z"], "already have expired"),
        (["--csr", str(tmp_path / "y.csr"), "--not-before", "2030-01-01T00:00:00Z"], "external CA"),
    ):
        result = keybinder(world, "keys", "rotate", *args)
        assert result.returncode == 1, (args, result.stdout)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert labels(world) == before
    assert existing.read_text() == "keep me"


# -- the CSR path, with a CA made here ------------------------------------------------------------


@dataclass
class ExternalCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, days: int = 3650, name: str = "Test Root CA") -> ExternalCa:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + days * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ca_usage(key_cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        ca: bool = True,
        key_cert_sign: bool = True,
        days: int = 1095,
        not_before: datetime | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> x509.Certificate:
        start = not_before or datetime.now(UTC) - timedelta(minutes=1)
        public = public_key or csr.public_key()
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + days * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(ca_usage(key_cert_sign=key_cert_sign), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self.key, hashes.SHA384())
        )


def ca_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_csr_signed_by_an_external_ca_is_installed_and_chains_to_its_root(world: World, tmp_path: Path) -> None:
    before = bind(world)
    csr_path = tmp_path / "issuer.csr"
    result = keybinder(world, "keys", "rotate", "--csr", str(csr_path))
    assert result.returncode == 0, result.stderr
    assert "(pending)" in result.stdout
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid  # signed in the HSM by the new key
    states = labels(world)
    (pending_label,) = [k for k, v in states.items() if v is IssuerState.PENDING]
    again = keybinder(world, "keys", "csr", pending_label)
    assert again.returncode == 0
    assert again.stdout == csr_path.read_text()

    # A pending key never signs and is never published.
    assert bind(world).issuer == before.issuer
    assert len(served(world).certificates) == 1

    root = ExternalCa.make()
    signed = tmp_path / "signed.pem"
    signed.write_text(pem(root.sign(csr)))
    (tmp_path / "root.pem").write_text(pem(root.cert))
    result = keybinder(world, "keys", "import-cert", str(signed), "--chain", str(tmp_path / "root.pem"))
    assert result.returncode == 0, result.stderr
    assert f"installed issuer key '{pending_label}' (active)" in result.stdout
    assert labels(world)[pending_label] is IssuerState.ACTIVE

    after = bind(world)
    resp = served(world)
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in resp.certificates]
    issuer, old_issuer, served_root = certs  # active, retiring, then the CA above the active one
    assert served_root == root.cert
    assert after.issuer == issuer.subject == csr.subject
    # Relying parties that trust the external root build the path through the served issuer certificate.
    assert openssl_verify(tmp_path, after, [pem(root.cert)], list(resp.certificates)).strip().endswith(": OK")
    assert crypto_verify(after, [root.cert], [issuer]) == [after, issuer, root.cert]
    # The whole served bundle verifies both generations.
    for leaf in (before, after):
        assert openssl_verify(tmp_path, leaf, list(resp.certificates)).strip().endswith(": OK")
    assert crypto_verify(before, [old_issuer]) == [before, old_issuer]
    # The JWKS has one key per issuer (the root is not a signing key of ours); the CA-signed issuer's x5c
    # carries its chain, the self-signed one's only itself.
    keys = {k["kid"]: k for k in json.loads(resp.jwks)["keys"]}
    assert set(keys) == {x5t_s256(issuer), x5t_s256(old_issuer)}
    x5c = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in keys[x5t_s256(issuer)]["x5c"]]
    assert x5c == [issuer, root.cert]
    assert len(keys[x5t_s256(old_issuer)]["x5c"]) == 1


def test_wallet_certificates_never_outlive_the_ca_chain(world: World, tmp_path: Path) -> None:
    csr_path = tmp_path / "issuer.csr"
    rotate_issuer(world.settings, csr_path=csr_path)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    root = ExternalCa.make(days=200)  # the CA's own certificate ends before the one it grants
    (tmp_path / "bundle.pem").write_text(pem(root.sign(csr, days=400), root.cert))
    report = import_issuer_certificate(world.settings, tmp_path / "bundle.pem")  # chain in the same file
    assert report.not_after == root.cert.not_valid_after_utc
    cert = bind(world)
    assert cert.issuer == csr.subject
    assert cert.not_valid_after_utc == root.cert.not_valid_after_utc  # 365-day validity cut short


def test_import_cert_refuses_what_would_make_a_broken_issuer(world: World, tmp_path: Path) -> None:
    csr_path = tmp_path / "issuer.csr"
    pending = rotate_issuer(world.settings, csr_path=csr_path).key_label
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    root = ExternalCa.make()
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    cases: list[tuple[str, str, str | None]] = [
        ("other-key", pem(root.sign(csr, public_key=stranger)), "not the key of any pending CSR"),
        ("not-ca", pem(root.sign(csr, ca=False)), "not a CA certificate"),
        ("no-cert-sign", pem(root.sign(csr, key_cert_sign=False)), "keyCertSign"),
        (
            "expired",
            pem(root.sign(csr, not_before=datetime.now(UTC) - 20 * DAY, days=10)),
            "has expired",
        ),
        ("wrong-chain", pem(root.sign(csr), ExternalCa.make(name="Other Root").cert), "does not certify"),
        ("garbage", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", "no PEM or DER"),
    ]
    installed_before = world.app.store.issuers()
    for name, text, message in cases:
        path = tmp_path / f"{name}.pem"
        path.write_text(text)
        with pytest.raises(IssuerKeyError, match=message):
            import_issuer_certificate(world.settings, path)
    with pytest.raises(IssuerKeyError, match="no pending issuer key 'nope'"):
        import_issuer_certificate(world.settings, tmp_path / "not-ca.pem", label="nope")
    with pytest.raises(IssuerKeyError, match="cannot read"):
        import_issuer_certificate(world.settings, tmp_path / "missing.pem")
    # Nothing was installed: the key is still pending, the issuers are as they were.
    assert world.app.store.issuers() == installed_before
    assert [p.key_label for p in world.app.store.pending_issuers()] == [pending]

    # The CLI says the same, without a traceback, and exits 1.
    result = keybinder(world, "keys", "import-cert", str(tmp_path / "not-ca.pem"))
    assert result.returncode == 1
    assert "not a CA certificate" in result.stderr
    assert "Traceback" not in result.stderr

    good = tmp_path / "good.pem"
    good.write_text(pem(root.sign(csr)))
    assert import_issuer_certificate(world.settings, good, label=pending).key_label == pending
    with pytest.raises(IssuerKeyError, match="not the key of any pending CSR"):  # installed: not pending now
        import_issuer_certificate(world.settings, good)


# -- expiry, the rotation window and the warning, on a service with its own clock -----------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


@pytest.fixture
def own_app(settings: Settings, tmp_path: Path) -> Iterator[App]:
    own = own_settings(settings, tmp_path)
    initialise(own)
    app = build_app(own)
    try:
        yield app
    finally:
        app.close()


def bind_direct(app: App) -> x509.Certificate:
    individual = f"{secrets.randbelow(10**12):012d}"
    register_identity(app.service, app.store, individual_id=individual, email=None, phone=None, name="R", pin=PIN)
    _, jwk = new_wallet_key("ec-p256")
    result = app.service.do_key_binding("test-wallet", individual, [Challenge("PIN", "number", PIN)], jwk, "WLA")
    return x509.load_pem_x509_certificate(result.certificate_pem.encode())


def test_near_its_end_the_issuer_cuts_certificates_short_warns_and_hands_over_after_rotate(
    own_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    (old,) = own_app.store.issuers()
    clock = Clock(old.not_after - 30 * DAY)  # inside the 60-day window, no next key
    own_app.service.clock = clock
    with caplog.at_level(logging.WARNING, logger="server.issuers"):
        cert = bind_direct(own_app)
    assert cert.not_valid_after_utc == old.not_after  # never beyond the issuer's notAfter
    assert any("keys rotate" in r.getMessage() and old.key_label in r.getMessage() for r in caplog.records)
    assert own_app.service.issuer_warning() is not None

    report = rotate_issuer(own_app.settings, not_before=clock.at)
    clock.at += timedelta(seconds=1)
    fresh = bind_direct(own_app)
    assert fresh.not_valid_after_utc == clock.at.replace(microsecond=0) + 365 * DAY
    assert own_app.service.active_issuer().key_label == report.key_label
    assert own_app.service.issuer_warning() is None

    clock.at = old.not_after + timedelta(seconds=1)  # the old key has expired: no longer published
    published = own_app.service.issuer_certificates()
    assert len(published) == 1
    assert published[0].public_key() == own_app.service.active_issuer().signer.public_key()


def test_the_health_probe_warns_of_a_due_rotation_but_passes(own_app: App, caplog: pytest.LogCaptureFixture) -> None:
    (old,) = own_app.store.issuers()
    own_app.service.clock = Clock(old.not_after - 10 * DAY)
    with caplog.at_level(logging.WARNING, logger="server.issuers"):
        own_app.probe()  # no exception: health stays SERVING
        own_app.probe()
    warnings = [r.getMessage() for r in caplog.records if "keys rotate" in r.getMessage()]
    assert len(warnings) == 1, "warned once, not at every probe"
    assert old.key_label in warnings[0]


def test_with_no_valid_issuer_binding_fails_cleanly(own_app: App) -> None:
    (old,) = own_app.store.issuers()
    own_app.service.clock = Clock(old.not_after + DAY)
    with pytest.raises(KeyBindingFailedError):
        bind_direct(own_app)
    assert "no installed issuer key" in (own_app.service.issuer_warning() or "")


def test_init_after_every_issuer_expired_uses_a_fresh_label(settings: Settings, tmp_path: Path) -> None:
    own = own_settings(settings, tmp_path)
    sqlite_store.migrate(own.database_path)
    store = open_store(own.database)
    try:
        store.add_issuer(record("keybinder-issuer", datetime.now(UTC) - 2000 * DAY, 1095))
    finally:
        store.close()
    report = initialise(own)
    assert any("issuer certificate for 'keybinder-issuer-" in item for item in report.created), report
    states = {s.key_label: s.state for s in issuer_key_statuses(own)}
    assert states["keybinder-issuer"] is IssuerState.EXPIRED
    assert sorted(states.values()) == [IssuerState.ACTIVE, IssuerState.EXPIRED]


class CountingIssuers:
    """The one IssuerStore method the cache reads, counting the reads (a unit test above the port)."""

    def __init__(self, records: Sequence[IssuerRecord]) -> None:
        self.records = list(records)
        self.reads = 0

    def issuers(self) -> Sequence[IssuerRecord]:
        self.reads += 1
        return list(self.records)


def test_the_issuer_cache_reads_once_per_ttl_chooses_the_signer_and_publishes_uncached() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_issuer_certificate(key, common_name="cache test", now=T0, validity=1095 * DAY)
    installed = IssuerRecord("k1", "ec-p256", to_pem(cert), T0 + 1095 * DAY, T0, not_before=T0)
    store = CountingIssuers([installed])
    signers = SimpleNamespace(signer={"k1": key}.__getitem__)
    cache = IssuerCache(cast(IssuerStore, store), cast(IssuerKeys, signers), window=WINDOW, ttl_seconds=30.0)
    ticks = [0.0]
    cache.monotonic = lambda: ticks[0]
    at = T0 + DAY

    first = cache.active(at)
    assert (first.key_label, first.certificate, first.signer) == ("k1", cert, key)
    assert cache.active(at) is first
    ticks[0] = 29.0
    assert cache.warning(at) is None
    assert store.reads == 1, "one read within the TTL, whatever asks"
    ticks[0] = 31.0
    assert cache.active(at) is first  # re-read after the TTL; the Issuer of a label is kept
    assert store.reads == 2
    cache.refresh()
    cache.active(at)
    assert store.reads == 3
    assert cache.certificates(at) == [cert]
    assert cache.chains(at) == [(cert, [])]
    assert store.reads == 5, "what is published is read on every call"
    with pytest.raises(KeyBindingFailedError):
        cache.active(T0 + 2000 * DAY)  # none valid: one forced re-read, then a clean refusal
    assert store.reads == 6
    assert "no installed issuer key" in (cache.warning(T0 + 2000 * DAY) or "")


# -- replicas on PostgreSQL: a rotation reaches each within the cache TTL, at no per-binding cost ---


def test_replicas_pick_up_a_rotation_within_the_cache_ttl(settings: Settings, tmp_path: Path) -> None:
    with fresh_database("kb_rot") as url:
        own = own_settings(settings, tmp_path, database_url=url, issuer_cache_seconds=30.0)
        initialise(own)
        replicas = [build_app(own), build_app(own)]
        try:
            ticks = [1000.0]
            reads = [0]
            for app in replicas:
                app.service.issuer_cache.monotonic = lambda: ticks[0]
                original = app.store.issuers

                def counted(original=original):  # type: ignore[no-untyped-def]
                    reads[0] += 1
                    return original()

                app.store.issuers = counted  # type: ignore[method-assign]
            first = [bind_direct(app).issuer for app in replicas]
            for _ in range(5):
                bind_direct(replicas[0])
            assert reads[0] == 2, "one issuer read per replica, none per binding"

            report = rotate_issuer(own)
            ticks[0] += 29.0
            assert [bind_direct(app).issuer for app in replicas] == first  # still cached
            ticks[0] += 2.0
            after = [bind_direct(app) for app in replicas]
            expected = [
                r for r in replicas[0].store.issuers() if r.key_label == report.key_label
            ]  # the new key's certificate
            new_subject = x509.load_pem_x509_certificate(expected[0].certificate_pem.encode()).subject
            assert [c.issuer for c in after] == [new_subject, new_subject]
            assert reads[0] == 5  # + one re-read per replica after the TTL (+ the lookup above)
        finally:
            for app in replicas:
                app.close()


# -- settings ---------------------------------------------------------------------------------


def test_lifecycle_settings_reach_the_policy_and_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEYBINDER_ISSUER_ROTATION_WINDOW_DAYS", "90")
    monkeypatch.setenv("KEYBINDER_ISSUER_CACHE_SECONDS", "5")
    settings = load_settings(data_dir=tmp_path)
    assert (settings.issuer_validity_days, settings.issuer_rotation_window_days) == (1095, 90)
    policy = settings.policy()
    assert (policy.issuer_rotation_window_days, policy.issuer_cache_seconds) == (90, 5.0)
    monkeypatch.delenv("KEYBINDER_ISSUER_ROTATION_WINDOW_DAYS")
    monkeypatch.delenv("KEYBINDER_ISSUER_CACHE_SECONDS")
    defaults = load_settings(data_dir=tmp_path)
    assert (defaults.issuer_rotation_window_days, defaults.issuer_cache_seconds) == (60, 30.0)
    with pytest.raises(ValueError, match="shorter than issuer_validity_days"):
        load_settings(data_dir=tmp_path, issuer_validity_days=30, issuer_rotation_window_days=30)
    with pytest.raises(ValueError, match="issuer_cache_seconds"):
        load_settings(data_dir=tmp_path, issuer_cache_seconds=-1)
