"""Store contract: one suite run against SqliteStore and PostgresStore, with races, migrations and sharding."""

from __future__ import annotations

import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from yoyo import get_backend, read_migrations

from server.aliases import Alias, AliasConflict
from server.audit import (
    ADMIN_CHAIN,
    GENESIS,
    AuditEvent,
    AuditRow,
    SignedHead,
    admin_event,
    individual_event,
    partner_event,
    verify_chains,
)
from server.domain import Binding, BindingStatus, Identity, IssuerRecord, OtpRecord, Partner, PendingIssuer
from server.limits import Limits, RateRule, Reservation, Window, budget_refusal
from server.partners import hash_api_key
from server.ports import (
    KeyOwnedByOther,
    OtpAlreadyUsed,
    PartnerCertificateInUse,
    RateLimited,
    StoreConflict,
    StoreUnavailable,
)
from server.stores import postgres as pg
from server.stores import sqlite as lite
from server.stores.postgres import PostgresStore
from server.stores.sqlite import SqliteStore
from tests.conftest import PG_ADMIN_URL, require
from tests.fakes import MemoryStore

PG_URL = PG_ADMIN_URL  # one setting for every PostgreSQL test: $KEYBINDER_TEST_POSTGRES
Store = SqliteStore | PostgresStore
#: A store or the in-memory fake (tests/fakes.py): the tests taking it use only what the fake implements.
AnyStore = SqliteStore | PostgresStore | MemoryStore
R = TypeVar("R")

PARTNER = "wallet-a"
OTHER_PARTNER = "wallet-b"
T0 = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
#: Every join in the races is bounded: a deadlock fails the test instead of hanging it.
RACE_TIMEOUT_SECONDS = 30.0
TABLES = (
    *("individuals", "otps", "bindings", "wallet_keys", "issuers", "wla_jtis", "binding_nonces"),
    *("individual_limits", "partner_limits", "audit_log", "partners", "kbi_answers", "individual_aliases"),
    *("limit_windows", "audit_heads"),
)


# -- fixtures ---------------------------------------------------------------------------------


def in_schema(url: str, schema: str) -> str:
    """``url`` with every session's search_path set to ``schema``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new, empty schema on the test server, dropped afterwards; yields a URL that uses it."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        require(False, f"PostgreSQL at {PG_URL}")
        raise
    name = f"kb_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        try:
            yield in_schema(PG_URL, name)
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """One migrated schema for this module's PostgreSQL tests."""
    with fresh_schema() as url:
        assert pg.migrate(url) == len(list(Path(pg.migrations_dir()).glob("*.sql")))
        yield url


def empty_pg_store(url: str) -> PostgresStore:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
    return PostgresStore(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "sqlite":
        path = tmp_path / "keybinder.sqlite"
        lite.migrate(path)
        s = SqliteStore(path)
    else:
        s = empty_pg_store(request.getfixturevalue("pg_url"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
def port_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """The real stores and the fake that stands in for them in the auth-factor unit tests."""
    if request.param == "memory":
        yield MemoryStore()
        return
    s: Store
    if request.param == "sqlite":
        path = tmp_path / "keybinder.sqlite"
        lite.migrate(path)
        s = SqliteStore(path)
    else:
        s = empty_pg_store(request.getfixturevalue("pg_url"))
    try:
        yield s
    finally:
        s.close()


# -- test data --------------------------------------------------------------------------------


def new_id() -> bytes:
    return secrets.token_bytes(32)


def make_otp(
    id_hmac: bytes,
    partner: str = PARTNER,
    *,
    max_attempts: int = 3,
    created_at: datetime = T0,
    ttl: timedelta = timedelta(minutes=5),
) -> OtpRecord:
    return OtpRecord(
        transaction_id=secrets.token_urlsafe(24),
        id_hmac=id_hmac,
        partner_id=partner,
        otp_hmac=secrets.token_bytes(32),
        created_at=created_at,
        expires_at=created_at + ttl,
        max_attempts=max_attempts,
    )


def make_binding(
    id_hmac: bytes, *, partner: str = PARTNER, factor: str = "WLA", key: str | None = None, created_at: datetime = T0
) -> Binding:
    tag = secrets.token_hex(8)
    return Binding(
        id_hmac=id_hmac,
        partner_id=partner,
        auth_factor_type=factor,
        psut=f"psut-{id_hmac.hex()[:20]}-{partner}",
        key_fingerprint=key or f"key-{tag}",
        certificate_pem=f"-----BEGIN CERTIFICATE-----\n{tag}\n-----END CERTIFICATE-----\n",
        cert_thumbprint=f"x5t-{tag}",
        serial_hex=tag,
        issuer_key_label="issuer-1",
        created_at=created_at,
        expires_at=created_at + timedelta(days=365),
    )


def as_status(b: Binding, status: BindingStatus, **changes: Any) -> Binding:
    """``b`` as the store reports it after a status change."""
    return replace(b, status=status, **changes)


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is UTC, value


def race(n: int, fn: Callable[[int], R]) -> list[R | Exception]:
    """Run ``fn(0..n-1)`` on n threads released at once; each result or the exception it raised."""
    barrier = threading.Barrier(n)

    def run(i: int) -> R | Exception:
        barrier.wait(timeout=RACE_TIMEOUT_SECONDS)
        try:
            return fn(i)
        except Exception as err:  # collected and checked by the caller
            return err

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(run, i) for i in range(n)]
        return [f.result(timeout=RACE_TIMEOUT_SECONDS) for f in futures]


#: The contract flows, also replayed by the sharding test with every statement recorded.
CONTRACT_FLOWS: list[Callable[[Store], None]] = []


def contract(fn: Callable[[Store], None]) -> Callable[[Store], None]:
    CONTRACT_FLOWS.append(fn)
    return fn


# -- aliases (server/aliases.py) ---------------------------------------------------------------


@contract
def test_aliases_resolve_to_their_individual_until_revoked_or_expired(store: Store) -> None:
    alice, bob, unknown = new_id(), new_id(), new_id()
    for who in (alice, bob):
        store.upsert_identity(Identity(who, None, None, None, None))
    vid, uin, later = new_id(), new_id(), new_id()
    store.add_alias(Alias(vid, alice, "VID", T0))
    store.add_alias(Alias(uin, alice, "UIN", T0 + timedelta(seconds=1), expires_at=T0 + timedelta(days=1)))
    assert store.resolve_individual(alice, T0) == alice
    assert store.resolve_individual(vid, T0) == alice
    assert store.resolve_individual(uin, T0) == alice
    assert store.resolve_individual(unknown, T0) is None
    # Expired: from its expiry on it resolves to nothing.
    assert store.resolve_individual(uin, T0 + timedelta(days=1)) is None
    # The same individual may change an active alias's type and expiry; another individual may not take it.
    store.add_alias(Alias(vid, alice, "VID2", T0, expires_at=T0 + timedelta(days=30)))
    with pytest.raises(AliasConflict):
        store.add_alias(Alias(vid, bob, "VID", T0))
    assert store.resolve_individual(vid, T0) == alice
    # Revoked: for good, and never given out again (not even to the same individual).
    assert store.revoke_alias(vid, T0 + timedelta(hours=1)) is True
    assert store.revoke_alias(vid, T0 + timedelta(hours=2)) is False
    assert store.resolve_individual(vid, T0) is None
    with pytest.raises(AliasConflict):
        store.add_alias(Alias(vid, alice, "VID", T0))
    store.add_alias(Alias(later, bob, "VID", T0))
    listed = store.aliases_of(alice)
    assert [(a.alias_hmac, a.alias_type) for a in listed] == [(vid, "VID2"), (uin, "UIN")]
    assert listed[0].revoked_at == T0 + timedelta(hours=1)
    assert listed[0].expires_at == T0 + timedelta(days=30)
    assert [a.state_at(T0 + timedelta(days=2)) for a in listed] == ["revoked", "expired"]
    assert [a.alias_hmac for a in store.aliases_of(bob)] == [later]
    assert store.count_rows("individual_aliases") == 3


@contract
def test_partner_psut_is_the_first_bindings(store: Store) -> None:
    alice = new_id()
    assert store.partner_psut(alice, PARTNER) is None
    first = make_binding(alice)
    store.commit_binding(first, consume_otp=None, now=T0)
    store.commit_binding(replace(make_binding(alice), psut="another"), consume_otp=None, now=T0)
    assert store.partner_psut(alice, PARTNER) == first.psut
    assert store.partner_psut(alice, OTHER_PARTNER) is None


# -- identities -------------------------------------------------------------------------------


@contract
def test_upsert_and_get_identity(port_store: AnyStore) -> None:
    store = port_store
    id_hmac = new_id()
    assert store.get_identity(id_hmac) is None
    first = Identity(id_hmac, "a@example.org", "+4915100000000", "A", b"\x00pin\xff")
    assert store.upsert_identity(first) is True
    assert store.get_identity(id_hmac) == first
    changed = Identity(id_hmac, None, "+4915111111111", None, None)
    assert store.upsert_identity(changed) is False
    assert store.get_identity(id_hmac) == changed
    assert store.upsert_identity(Identity(new_id(), None, None, None, None)) is True
    assert store.count_identities() == 2
    assert store.count_rows("individuals") == 2


@contract
def test_kbi_answers_are_replaced_with_the_identity(port_store: AnyStore) -> None:
    store = port_store
    id_hmac, other = new_id(), new_id()
    assert store.kbi_answers(id_hmac) == {}  # unknown individual: none
    person = Identity(id_hmac, None, None, "K", None)
    answers = {"dob": b"\x01" * 32, "phone": b"\x00mac\xff" + b"\x02" * 25}
    assert store.upsert_identity(person, kbi=answers) is True
    store.upsert_identity(Identity(other, None, None, "O", None), kbi={"dob": b"\x03" * 32})
    assert store.kbi_answers(id_hmac) == answers
    # An update replaces the set: a field left out is gone, a new one is there, nothing else is touched.
    assert store.upsert_identity(person, kbi={"dob": b"\x04" * 32}) is False
    assert store.kbi_answers(id_hmac) == {"dob": b"\x04" * 32}
    assert store.upsert_identity(person) is False  # none given: none enrolled (like the PIN)
    assert store.kbi_answers(id_hmac) == {}
    assert store.kbi_answers(other) == {"dob": b"\x03" * 32}
    assert store.count_rows("kbi_answers") == 1


@contract
def test_count_rows_refuses_unknown_tables(store: Store) -> None:
    for table in TABLES:
        assert store.count_rows(table) == 0
    with pytest.raises(ValueError, match="bindings; DROP"):
        store.count_rows("bindings; DROP TABLE bindings")


@contract
def test_ping_and_reuse_after_close(store: Store) -> None:
    store.ping()
    id_hmac = new_id()
    store.upsert_identity(Identity(id_hmac, None, None, "x", None))
    store.close()
    store.ping()  # a closed store reconnects on use
    assert store.get_identity(id_hmac) is not None


# -- OTPs -------------------------------------------------------------------------------------


@contract
def test_replace_otp_invalidates_the_previous_one(store: Store) -> None:
    id_hmac = new_id()
    first, second = make_otp(id_hmac), make_otp(id_hmac)
    other_partner = make_otp(id_hmac, OTHER_PARTNER)
    store.replace_otp(first)
    store.replace_otp(other_partner)
    store.replace_otp(second)
    assert store.otp_state(first.transaction_id) == ("replaced", 0)
    assert store.otp_state(second.transaction_id) == ("pending", 0)
    assert store.otp_state(other_partner.transaction_id) == ("pending", 0)  # another partner's is kept
    claimed = store.claim_otp_attempt(id_hmac, PARTNER, T0)
    assert claimed is not None
    assert claimed.transaction_id == second.transaction_id


@contract
def test_claim_otp_attempt_counts_and_stops_at_the_limit(port_store: AnyStore) -> None:
    store = port_store
    id_hmac = new_id()
    otp = make_otp(id_hmac, max_attempts=3)
    store.replace_otp(otp)
    for n in (1, 2, 3):
        claimed = store.claim_otp_attempt(id_hmac, PARTNER, T0 + timedelta(seconds=n))
        assert claimed == OtpRecord(
            transaction_id=otp.transaction_id,
            id_hmac=id_hmac,
            partner_id=PARTNER,
            otp_hmac=otp.otp_hmac,
            created_at=otp.created_at,
            expires_at=otp.expires_at,
            max_attempts=3,
            attempts=n,
        )
    assert store.claim_otp_attempt(id_hmac, PARTNER, T0) is None
    assert store.otp_state(otp.transaction_id) == ("pending", 3)  # the limit is never exceeded
    assert store.claim_otp_attempt(id_hmac, OTHER_PARTNER, T0) is None
    assert store.claim_otp_attempt(new_id(), PARTNER, T0) is None


@contract
def test_claim_otp_attempt_ignores_expired_and_used_otps(port_store: AnyStore) -> None:
    store = port_store
    expired_for = new_id()
    otp = make_otp(expired_for, ttl=timedelta(seconds=60))
    store.replace_otp(otp)
    assert store.claim_otp_attempt(expired_for, PARTNER, otp.expires_at) is None  # expiry is exclusive
    assert store.otp_state(otp.transaction_id) == ("pending", 0)  # a refused claim counts nothing
    assert store.claim_otp_attempt(expired_for, PARTNER, otp.expires_at - timedelta(microseconds=1)) is not None

    used_by = new_id()
    used = make_otp(used_by)
    store.replace_otp(used)
    store.commit_binding(make_binding(used_by), consume_otp=used.transaction_id, now=T0)
    assert store.otp_state(used.transaction_id) == ("used", 0)
    assert store.claim_otp_attempt(used_by, PARTNER, T0) is None


@contract
def test_discard_otp(store: Store) -> None:
    id_hmac = new_id()
    otp = make_otp(id_hmac)
    store.replace_otp(otp)
    store.discard_otp(otp.transaction_id, otp.id_hmac)
    assert store.otp_state(otp.transaction_id) is None
    assert store.claim_otp_attempt(id_hmac, PARTNER, T0) is None
    store.discard_otp("no-such-transaction", id_hmac)  # nothing to do is not an error
    other = make_otp(new_id())
    store.replace_otp(other)
    store.discard_otp(other.transaction_id, id_hmac)  # another individual's OTP is out of reach
    assert store.otp_state(other.transaction_id) == ("pending", 0)
    store.replace_otp(make_otp(id_hmac))  # the slot is free for a new one
    assert store.count_rows("otps") == 2


# -- bindings ---------------------------------------------------------------------------------


@contract
def test_commit_binding_supersedes_the_active_binding(port_store: AnyStore) -> None:
    store = port_store
    id_hmac = new_id()
    first = make_binding(id_hmac)
    second = make_binding(id_hmac, created_at=T0 + timedelta(hours=1))
    other_factor = make_binding(id_hmac, factor="PIN")
    other_partner = make_binding(id_hmac, partner=OTHER_PARTNER)
    t1 = T0 + timedelta(hours=1, microseconds=7)
    store.commit_binding(first, consume_otp=None, now=T0)
    store.commit_binding(other_factor, consume_otp=None, now=T0)
    store.commit_binding(other_partner, consume_otp=None, now=T0)
    store.commit_binding(second, consume_otp=None, now=t1)

    assert store.active_binding(id_hmac, PARTNER, "WLA") == second
    assert store.active_binding(id_hmac, PARTNER, "PIN") == other_factor
    assert store.active_binding(id_hmac, OTHER_PARTNER, "WLA") == other_partner
    assert store.active_binding(id_hmac, PARTNER, "OTP") is None
    assert list(store.bindings_for(id_hmac, PARTNER)) == [
        as_status(first, BindingStatus.SUPERSEDED, superseded_at=t1),
        other_factor,
        second,
    ]
    assert list(store.bindings_for(id_hmac, OTHER_PARTNER)) == [other_partner]
    assert list(store.bindings_for(new_id(), PARTNER)) == []
    assert store.count_active_bindings() == 3  # second, other_factor, other_partner; first was superseded
    assert store.count_rows("wallet_keys") == 0  # claiming the key is claim_key's job, in its own transaction


@contract
def test_commit_binding_consumes_the_otp_exactly_once(port_store: AnyStore) -> None:
    store = port_store
    id_hmac = new_id()
    otp = make_otp(id_hmac)
    store.replace_otp(otp)
    first, second = make_binding(id_hmac), make_binding(id_hmac)
    store.commit_binding(first, consume_otp=otp.transaction_id, now=T0)
    assert store.otp_state(otp.transaction_id) == ("used", 0)
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(second, consume_otp=otp.transaction_id, now=T0)
    assert store.count_rows("bindings") == 1
    assert store.active_binding(id_hmac, PARTNER, "WLA") == first
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(id_hmac), consume_otp="no-such-transaction", now=T0)
    assert store.count_rows("bindings") == 1


@contract
def test_commit_binding_consumes_the_nonce_exactly_once(store: Store) -> None:
    id_hmac = new_id()
    nonce = secrets.token_urlsafe(24)
    store.create_nonce(nonce, id_hmac, PARTNER, T0 + timedelta(minutes=5))
    assert store.nonce_usable(nonce, id_hmac, PARTNER, T0)
    first = make_binding(id_hmac)
    store.commit_binding(first, consume_otp=None, now=T0, consume_nonce=nonce)
    assert not store.nonce_usable(nonce, id_hmac, PARTNER, T0)
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(id_hmac), consume_otp=None, now=T0, consume_nonce=nonce)
    assert store.count_rows("bindings") == 1
    assert store.active_binding(id_hmac, PARTNER, "WLA") == first

    # OTP and nonce together: a spent nonce rolls the OTP back too.
    otp = make_otp(id_hmac)
    store.replace_otp(otp)
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(id_hmac), consume_otp=otp.transaction_id, now=T0, consume_nonce=nonce)
    assert store.otp_state(otp.transaction_id) == ("pending", 0)


@contract
def test_claim_key_refuses_a_key_owned_by_another_individual(store: Store) -> None:
    owner, other = new_id(), new_id()
    key = f"key-{secrets.token_hex(8)}"
    assert store.key_owner(key) is None
    store.claim_key(key, owner, T0)
    assert store.key_owner(key) == owner
    with pytest.raises(KeyOwnedByOther):
        store.claim_key(key, other, T0)
    # Nothing written by the refused claim: the owner is unchanged, one row.
    assert store.key_owner(key) == owner
    assert store.count_rows("wallet_keys") == 1
    # The owner may claim it again (binding the same key anew); still one row.
    store.claim_key(key, owner, T0 + timedelta(hours=1))
    assert store.count_rows("wallet_keys") == 1


@pytest.mark.parametrize(
    "store",
    [
        "sqlite",
        "postgresql",
    ],
    indirect=True,
)
@contract
def test_commit_binding_cannot_spend_another_individuals_otp_or_nonce(store: Store) -> None:
    victim, attacker = new_id(), new_id()
    otp = make_otp(victim)
    store.replace_otp(otp)
    nonce = secrets.token_urlsafe(24)
    store.create_nonce(nonce, victim, PARTNER, T0 + timedelta(minutes=5))
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(attacker), consume_otp=otp.transaction_id, now=T0)
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(attacker), consume_otp=None, now=T0, consume_nonce=nonce)
    assert store.otp_state(otp.transaction_id) == ("pending", 0)
    assert store.nonce_usable(nonce, victim, PARTNER, T0)


@contract
def test_binding_of_is_the_individuals_binding_by_thumbprint_whatever_its_status(port_store: AnyStore) -> None:
    store = port_store
    id_hmac = new_id()
    old, new = make_binding(id_hmac), make_binding(id_hmac)
    store.commit_binding(old, consume_otp=None, now=T0)
    store.commit_binding(new, consume_otp=None, now=T0 + timedelta(seconds=1))
    assert store.binding_of(id_hmac, new.cert_thumbprint) == new
    assert store.binding_of(id_hmac, old.cert_thumbprint) == as_status(
        old, BindingStatus.SUPERSEDED, superseded_at=T0 + timedelta(seconds=1)
    )
    assert store.binding_of(new_id(), new.cert_thumbprint) is None  # another individual's is out of reach
    assert store.binding_of(id_hmac, "x5t-unknown") is None


@contract
def test_binding_lookups_by_thumbprint_and_psut(store: Store) -> None:
    id_hmac = new_id()
    old, new = make_binding(id_hmac), make_binding(id_hmac)
    store.commit_binding(old, consume_otp=None, now=T0)
    store.commit_binding(new, consume_otp=None, now=T0 + timedelta(seconds=1))
    superseded = as_status(old, BindingStatus.SUPERSEDED, superseded_at=T0 + timedelta(seconds=1))

    assert store.binding_by_thumbprint(new.cert_thumbprint) == new
    assert store.binding_by_thumbprint(old.cert_thumbprint) == superseded
    assert store.binding_by_thumbprint("x5t-unknown") is None
    assert store.binding_of(new.id_hmac, new.cert_thumbprint) == new
    assert store.binding_of(new.id_hmac, old.cert_thumbprint) == superseded
    assert store.binding_of(new_id(), new.cert_thumbprint) is None

    assert store.latest_binding_by_psut(new.psut, PARTNER, "WLA") == new
    assert store.latest_binding_by_psut(new.psut, OTHER_PARTNER, "WLA") is None
    assert store.latest_binding_by_psut(new.psut, PARTNER, "PIN") is None
    revoked = store.revoke_binding(id_hmac, PARTNER, "WLA", reason="lost", now=T0, consume_otp=None)
    assert revoked is not None
    # No active binding left: the most recent one, whatever its status.
    assert store.latest_binding_by_psut(new.psut, PARTNER, "WLA") == revoked


@contract
def test_revoke_binding(store: Store) -> None:
    id_hmac = new_id()
    otp = make_otp(id_hmac)
    store.replace_otp(otp)
    # No active binding: None, and the OTP stays usable.
    assert store.revoke_binding(id_hmac, PARTNER, "WLA", reason="r", now=T0, consume_otp=otp.transaction_id) is None
    assert store.otp_state(otp.transaction_id) == ("pending", 0)

    binding = make_binding(id_hmac)
    store.commit_binding(binding, consume_otp=None, now=T0)
    at = T0 + timedelta(days=2, microseconds=3)
    revoked = store.revoke_binding(
        id_hmac, PARTNER, "WLA", reason="device lost", now=at, consume_otp=otp.transaction_id
    )
    expected = as_status(binding, BindingStatus.REVOKED, revoked_at=at, revocation_reason="device lost")
    assert revoked == expected
    assert store.otp_state(otp.transaction_id) == ("used", 0)
    assert store.active_binding(id_hmac, PARTNER, "WLA") is None
    assert list(store.bindings_for(id_hmac, PARTNER)) == [expected]
    assert store.revoke_binding(id_hmac, PARTNER, "WLA", reason="r", now=at, consume_otp=None) is None

    # A spent OTP refuses the revocation and leaves the binding active.
    again = make_binding(id_hmac)
    store.commit_binding(again, consume_otp=None, now=at)
    with pytest.raises(OtpAlreadyUsed):
        store.revoke_binding(id_hmac, PARTNER, "WLA", reason="r", now=at, consume_otp=otp.transaction_id)
    assert store.active_binding(id_hmac, PARTNER, "WLA") == again


# -- replay cache, nonces, issuers --------------------------------------------------------------


@contract
def test_claim_jti_is_single_use_until_expiry(port_store: AnyStore) -> None:
    store = port_store
    id_hmac, other = new_id(), new_id()
    exp = T0 + timedelta(minutes=2)
    assert store.claim_jti(id_hmac, "jti-1", exp, T0) is True
    assert store.claim_jti(id_hmac, "jti-1", exp, T0 + timedelta(minutes=1)) is False
    assert store.claim_jti(other, "jti-1", exp, T0) is True  # per individual
    assert store.claim_jti(id_hmac, "jti-2", exp, T0) is True
    # Once the token has expired, its entry may go and the jti is accepted again.
    assert store.claim_jti(id_hmac, "jti-1", exp + timedelta(minutes=2), exp) is True
    assert store.claim_jti(id_hmac, "jti-1", exp + timedelta(minutes=2), exp) is False
    # Claiming purged this individual's other expired entry (jti-2), not the other individual's.
    assert store.count_rows("wla_jtis") == 2


@contract
def test_nonces(store: Store) -> None:
    id_hmac = new_id()
    nonce = secrets.token_urlsafe(24)
    expires = T0 + timedelta(minutes=5)
    store.create_nonce(nonce, id_hmac, PARTNER, expires)
    assert store.nonce_usable(nonce, id_hmac, PARTNER, T0)
    assert not store.nonce_usable(nonce, new_id(), PARTNER, T0)
    assert not store.nonce_usable(nonce, id_hmac, OTHER_PARTNER, T0)
    assert not store.nonce_usable(nonce, id_hmac, PARTNER, expires)
    assert not store.nonce_usable("unknown", id_hmac, PARTNER, T0)
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.create_nonce(nonce, id_hmac, PARTNER, expires)


@contract
def test_issuers_newest_first(store: Store) -> None:
    records = [
        IssuerRecord(
            f"issuer-{n}",
            "ec-p256",
            f"PEM {n}",
            T0 + timedelta(days=365),
            T0 + timedelta(days=n),
            not_before=T0 + timedelta(days=n, hours=1),
            chain_pem=f"CHAIN {n}" if n else "",
        )
        for n in (2, 0, 1)
    ]
    for r in records:
        store.add_issuer(r)
    assert list(store.issuers()) == sorted(records, key=lambda r: r.created_at, reverse=True)
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.add_issuer(records[0])
    assert len(store.issuers()) == 3
    # Without a not_before the key may sign from its creation.
    store.add_issuer(IssuerRecord("issuer-3", "ec-p256", "PEM 3", T0 + timedelta(days=9), T0 + timedelta(days=3)))
    assert store.issuers()[0].not_before == T0 + timedelta(days=3)


@contract
def test_pending_issuer_is_installed_once_and_never_listed_before(store: Store) -> None:
    store.add_issuer(IssuerRecord("old", "ec-p256", "PEM old", T0 + timedelta(days=365), T0, not_before=T0))
    pending = [PendingIssuer(f"new-{n}", "ec-p384", f"CSR {n}", T0 + timedelta(days=n)) for n in (1, 2)]
    for p in pending:
        store.add_pending_issuer(p)
    assert list(store.pending_issuers()) == pending[::-1]
    assert [r.key_label for r in store.issuers()] == ["old"]  # a pending key is never an issuer
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.add_pending_issuer(PendingIssuer("old", "ec-p256", "CSR", T0))  # a label is never reused
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.add_issuer(IssuerRecord("new-1", "ec-p256", "PEM", T0 + timedelta(days=9), T0))

    signed = IssuerRecord(
        "new-1",
        "ec-p384",
        "PEM new",
        T0 + timedelta(days=700),
        pending[0].created_at,
        not_before=T0 + timedelta(days=5),
        chain_pem="CA PEM",
    )
    assert store.install_issuer(signed)
    assert not store.install_issuer(replace(signed, certificate_pem="another"))  # installed already
    assert not store.install_issuer(replace(signed, key_label="old"))  # never pending
    assert not store.install_issuer(replace(signed, key_label="unknown"))
    assert [p.key_label for p in store.pending_issuers()] == ["new-2"]
    assert store.issuers()[0] == signed
    assert [r.key_label for r in store.issuers()] == ["new-1", "old"]


# -- partners (a reference table: not per-individual, so outside the id_hmac rule) ---------------


@contract
def test_partners(store: Store) -> None:
    first = Partner("wallet-a", hash_api_key("kb_a"), True, None, T0, T0)
    second = Partner("wallet-b", hash_api_key("kb_b"), True, "ab" * 32, T0, T0)
    assert store.add_partner(second) is True
    assert store.add_partner(first) is True
    assert store.add_partner(replace(first, api_key_hash=hash_api_key("kb_other"))) is False  # the id is taken
    assert store.get_partner("wallet-a") == first  # and was not changed
    assert store.get_partner("nobody") is None
    assert [p.partner_id for p in store.list_partners()] == ["wallet-a", "wallet-b"]
    assert store.partner_by_certificate("ab" * 32) == second
    assert store.partner_by_certificate("cd" * 32) is None

    later = T0 + timedelta(hours=1)
    assert store.set_partner_enabled("wallet-a", False, later) is True
    assert store.get_partner("wallet-a") == replace(first, enabled=False, updated_at=later)
    assert store.set_partner_key("wallet-a", hash_api_key("kb_new"), later) is True
    assert store.get_partner("wallet-a") == replace(
        first, enabled=False, api_key_hash=hash_api_key("kb_new"), updated_at=later
    )
    assert store.set_partner_certificate("wallet-a", "cd" * 32, later) is True
    assert store.partner_by_certificate("cd" * 32) is not None
    for missing in (
        store.set_partner_enabled("nobody", True, later),
        store.set_partner_key("nobody", hash_api_key("kb_x"), later),
        store.set_partner_certificate("nobody", None, later),
    ):
        assert missing is False
    # One certificate, one partner: nothing is written when it is taken.
    with pytest.raises(PartnerCertificateInUse):
        store.set_partner_certificate("wallet-a", "ab" * 32, later)
    with pytest.raises(PartnerCertificateInUse):
        store.add_partner(Partner("wallet-c", hash_api_key("kb_c"), True, "ab" * 32, T0, T0))
    assert store.get_partner("wallet-c") is None
    assert store.set_partner_certificate("wallet-b", None, later) is True
    assert store.partner_by_certificate("ab" * 32) is None
    assert store.count_rows("partners") == 2


@contract
def test_times_round_trip_as_utc_with_microseconds(store: Store) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    t = datetime(2032, 2, 29, 23, 59, 58, 999999, tzinfo=ist)
    id_hmac = new_id()
    otp = make_otp(id_hmac, created_at=t)
    store.replace_otp(otp)
    claimed = store.claim_otp_attempt(id_hmac, PARTNER, t)
    assert claimed is not None
    assert (claimed.created_at, claimed.expires_at) == (otp.created_at, otp.expires_at)
    store.commit_binding(make_binding(id_hmac, created_at=t), consume_otp=None, now=t)
    store.commit_binding(make_binding(id_hmac, created_at=t), consume_otp=None, now=t + timedelta(microseconds=1))
    store.revoke_binding(id_hmac, PARTNER, "WLA", reason="r", now=t, consume_otp=None)
    store.add_issuer(IssuerRecord("i", "ec-p256", "PEM", t, t))
    superseded, revoked = store.bindings_for(id_hmac, PARTNER)
    issuer = store.issuers()[0]
    values: list[datetime | None] = [
        claimed.created_at,
        claimed.expires_at,
        superseded.created_at,
        superseded.expires_at,
    ]
    values += [superseded.superseded_at, revoked.revoked_at, issuer.not_after, issuer.created_at]
    for v in values:
        assert_utc(v)
    assert claimed.created_at == t
    assert claimed.created_at.microsecond == 999999
    assert claimed.created_at.hour == 18  # 23:59:58+05:30 is 18:29:58Z
    assert superseded.superseded_at == t + timedelta(microseconds=1)
    assert (revoked.revoked_at, issuer.not_after, issuer.created_at) == (t, t, t)


# -- abuse limits and audit trail ---------------------------------------------------------------

LIMITS = Limits(RateRule(2, 600), RateRule(3, 60), RateRule(3, 900), lockout_seconds=300)


def all_audit_rows(store: Store) -> list[AuditRow]:
    rows: list[AuditRow] = []
    after: tuple[bytes, int] | None = None
    while page := store.audit_rows(after, 2):  # small pages: the paging itself is under test
        rows += page
        after = (page[-1].chain_key, page[-1].seq)
    return rows


def fail(store: Store, id_hmac: bytes, at: datetime) -> tuple[datetime | None, int]:
    state = store.record_auth_failure(
        id_hmac,
        at,
        LIMITS,
        audit=individual_event(id_hmac, at, PARTNER, "do_key_binding", "refused", "auth_failed"),
        lockout_audit=individual_event(id_hmac, at, PARTNER, "do_key_binding", "locked", "too_many_attempts"),
    )
    return state.locked_until, state.window.count


@contract
def test_identity_and_lock(store: Store) -> None:
    known, unknown = new_id(), new_id()
    identity = Identity(known, "a@example.org", None, "A", b"pin")
    store.upsert_identity(identity)
    assert store.identity_and_lock(known) == (identity, None)
    assert store.identity_and_lock(unknown) == (None, None)
    for n in range(3):
        fail(store, known, T0 + timedelta(seconds=n))
        fail(store, unknown, T0 + timedelta(seconds=n))
    until = T0 + timedelta(seconds=2 + 300)
    assert store.identity_and_lock(known) == (identity, until)
    assert store.identity_and_lock(unknown) == (None, until)  # unknown IDs lock out alike: nothing to enumerate
    assert_utc(store.identity_and_lock(known)[1])


@contract
def test_failures_lock_out_and_the_window_expires(store: Store) -> None:
    id_hmac = new_id()
    assert fail(store, id_hmac, T0) == (None, 1)
    assert fail(store, id_hmac, T0 + timedelta(seconds=899)) == (None, 2)
    # The window started at T0 and has ended: counting starts afresh.
    assert fail(store, id_hmac, T0 + timedelta(seconds=900)) == (None, 1)
    assert fail(store, id_hmac, T0 + timedelta(seconds=901)) == (None, 2)
    at = T0 + timedelta(seconds=902)
    assert fail(store, id_hmac, at) == (at + timedelta(seconds=300), 0)  # the third failure locks, anew
    rows = [r for r in all_audit_rows(store) if r.chain_key == id_hmac]
    assert [(r.seq, r.outcome) for r in rows] == [(n, "refused") for n in range(1, 6)] + [(6, "locked")]
    # A failure counted after the lockout (a racing request) keeps its end: success or not, nothing shortens it.
    assert fail(store, id_hmac, at + timedelta(seconds=1)) == (at + timedelta(seconds=300), 1)


@contract
def test_partner_otp_send_rate(store: Store) -> None:
    rule = RateRule(3, 60)
    assert [store.count_partner_otp_send(PARTNER, T0 + timedelta(seconds=n), rule) for n in range(4)] == [0, 0, 0, 57]
    assert store.count_partner_otp_send(PARTNER, T0 + timedelta(seconds=59, microseconds=1), rule) == 1
    assert store.count_partner_otp_send(OTHER_PARTNER, T0, rule) == 0  # per partner
    assert store.count_partner_otp_send(PARTNER, T0 + timedelta(seconds=60), rule) == 0  # a new window
    # A clock stepped back behind the window's start does not lock the partner out for it.
    assert store.count_partner_otp_send(PARTNER, T0, rule) == 0


@contract
def test_individual_otp_send_limit_refuses_and_writes_nothing(store: Store) -> None:
    id_hmac = new_id()
    rule = RateRule(2, 600)
    first, second, third = (make_otp(id_hmac, created_at=T0 + timedelta(seconds=n)) for n in range(3))
    sent = individual_event(id_hmac, T0, PARTNER, "send_binding_otp", "success")
    store.replace_otp(first, send_limit=rule, audit=sent)
    store.replace_otp(make_otp(id_hmac, OTHER_PARTNER), send_limit=rule)  # per individual, whichever partner
    with pytest.raises(RateLimited) as refused:
        store.replace_otp(second, send_limit=rule, audit=sent)
    assert refused.value.retry_after_seconds == 599
    assert store.otp_state(second.transaction_id) is None
    assert store.otp_state(first.transaction_id) == ("pending", 0)
    assert len(all_audit_rows(store)) == 1  # the refused send's entry was rolled back with it
    store.replace_otp(replace(third, created_at=T0 + timedelta(seconds=600)), send_limit=rule, audit=sent)
    assert store.otp_state(third.transaction_id) == ("pending", 0)


@contract
def test_audit_entries_chain_per_key_and_commit_with_their_state(store: Store) -> None:
    alice, bob = new_id(), new_id()
    ok = individual_event(alice, T0, PARTNER, "do_key_binding", "success", subject="psut:x")
    store.commit_binding(make_binding(alice), consume_otp=None, now=T0, audit=ok)
    # A check that fails writes no entry: the audit never says more than the state.
    with pytest.raises(OtpAlreadyUsed):
        store.commit_binding(make_binding(alice), consume_otp="spent", now=T0, audit=ok)
    store.revoke_binding(alice, PARTNER, "WLA", reason="r", now=T0, consume_otp=None, audit=ok)
    assert store.revoke_binding(alice, PARTNER, "WLA", reason="r", now=T0, consume_otp=None, audit=ok) is None
    exp = T0 + timedelta(minutes=1)
    assert store.claim_jti(bob, "j", exp, T0, audit=individual_event(bob, T0, PARTNER, "verify", "success"))
    assert not store.claim_jti(bob, "j", exp, T0, audit=individual_event(bob, T0, PARTNER, "verify", "success"))
    store.append_audit(partner_event(T0, PARTNER, "send_binding_otp", "refused", "too_many_attempts"))
    store.append_audit(individual_event(bob, T0, PARTNER, "verify", "refused", "token_replayed"))
    store.append_audit(admin_event(T0, "identities_import", subject="2 identities"))

    rows = all_audit_rows(store)
    chains = {r.chain_key: [x.seq for x in rows if x.chain_key == r.chain_key] for r in rows}
    assert chains == {alice: [1, 2], bob: [1, 2], b"partner:" + PARTNER.encode(): [1], ADMIN_CHAIN: [1]}
    assert [r.hash for r in rows if r.seq == 1 and r.prev_hash != GENESIS] == []
    report = verify_chains(rows)
    assert (report.chains, report.entries, report.broken) == (4, 6, [])
    first = next(r for r in rows if r.chain_key == alice)
    assert (first.partner_id, first.action, first.outcome, first.subject, first.at) == (
        PARTNER,
        "do_key_binding",
        "success",
        "psut:x",
        T0,
    )
    assert_utc(first.at)


def test_audit_log_is_append_only(store: Store) -> None:
    store.append_audit(admin_event(T0, "init"))
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit_log SET reason = 'x'")
    else:
        with psycopg.connect(store.url, autocommit=True) as conn, pytest.raises(psycopg.Error, match="append-only"):
            conn.execute("DELETE FROM audit_log")
    assert len(all_audit_rows(store)) == 1


def test_parallel_audit_appends_to_one_chain_keep_it_whole(store: Store) -> None:
    id_hmac = new_id()

    def append(i: int) -> None:
        if i % 2:
            store.append_audit(partner_event(T0, PARTNER, "send_binding_otp", "refused", "invalid_otp_channel"))
        else:
            fail(store, id_hmac, T0)

    results = race(8, append)
    assert [r for r in results if isinstance(r, Exception)] == []
    rows = all_audit_rows(store)
    assert len(rows) == 4 + 4 + 1  # the third failure also wrote the lockout entry
    assert verify_chains(rows).broken == []


def test_audit_event_fields_are_all_hashed() -> None:
    event = AuditEvent(b"k", T0, "p", "a", "o", "r", "s")
    variants = [
        replace(event, chain_key=b"K"),
        replace(event, at=T0 + timedelta(microseconds=1)),
        replace(event, partner_id="x"),
        replace(event, action="x"),
        replace(event, outcome="x"),
        replace(event, reason="x"),
        replace(event, subject="x"),
    ]
    payloads = {event.payload(), *(v.payload() for v in variants)}
    assert len(payloads) == 1 + len(variants)
    # Length prefixes: moving a character from one field to the next changes the payload.
    assert replace(event, partner_id="pa", action="").payload() != replace(event, partner_id="p", action="a").payload()


# -- issue 13: reservations, failure budgets, nonce limits, the sweep, signed heads, bulk import -----------

BUDGET = replace(
    LIMITS,
    auth_failures_per_partner=RateRule(3, 60),
    auth_failures_global=RateRule(5, 60),
    nonces_per_individual=RateRule(2, 600),
)


def reserve(store: Store, id_hmac: bytes, at: datetime = T0) -> Reservation:
    return store.reserve_attempt(id_hmac, at, LIMITS)[1]


@contract
def test_reservations_count_before_evaluation_and_successes_give_them_back(store: Store) -> None:
    known = new_id()
    identity = Identity(known, "a@example.org", None, "A", b"pin")
    store.upsert_identity(identity)
    assert store.reserve_attempt(known, T0, LIMITS) == (identity, Reservation(window_start=T0))
    held = [reserve(store, known), reserve(store, known)]  # three of three taken, none evaluated yet
    assert reserve(store, known) == Reservation(refused_until=T0 + timedelta(seconds=900))
    store.release_attempt(known, held[0])  # a success: its attempt is free again
    fourth = reserve(store, known)
    assert fourth.window_start == T0
    # The failure that finds the window full locks out (once), counted already by its reservation.
    at = T0 + timedelta(seconds=1)
    state = store.record_auth_failure(
        known,
        at,
        LIMITS,
        audit=individual_event(known, at, PARTNER, "do_key_binding", "refused", "auth_failed"),
        lockout_audit=individual_event(known, at, PARTNER, "do_key_binding", "locked", "too_many_attempts"),
        reservation=fourth,
    )
    assert state.locked_until == at + timedelta(seconds=300)
    assert reserve(store, known, at) == Reservation(refused_until=at + timedelta(seconds=300))
    assert store.identity_and_lock(known) == (identity, at + timedelta(seconds=300))


@contract
def test_failure_budgets_per_partner_and_for_everyone(store: Store) -> None:
    assert store.failure_budget(PARTNER) == (Window(), Window())
    for n in range(3):
        store.count_failure_budget(PARTNER, T0 + timedelta(seconds=n), BUDGET)
    store.count_failure_budget(OTHER_PARTNER, T0 + timedelta(seconds=3), BUDGET)
    partner, everyone = store.failure_budget(PARTNER)
    assert (partner, everyone) == (Window(T0, 3), Window(T0, 4))
    assert_utc(partner.start)
    assert store.failure_budget(OTHER_PARTNER) == (Window(T0 + timedelta(seconds=3), 1), Window(T0, 4))
    now = T0 + timedelta(seconds=10)
    assert budget_refusal(partner, everyone, now, BUDGET) == ("partner_auth_failures", 50)
    other, _ = store.failure_budget(OTHER_PARTNER)
    assert budget_refusal(other, everyone, now, BUDGET) is None
    store.count_failure_budget(OTHER_PARTNER, now, BUDGET)
    other, everyone = store.failure_budget(OTHER_PARTNER)
    assert budget_refusal(other, everyone, now, BUDGET) == ("global_auth_failures", 50)
    assert budget_refusal(*store.failure_budget(PARTNER), T0 + timedelta(seconds=60), BUDGET) is None


@contract
def test_nonce_limits_per_partner_and_per_individual(store: Store) -> None:
    rule = RateRule(2, 60)
    assert [store.count_partner_nonce(PARTNER, T0 + timedelta(seconds=n), rule) for n in range(3)] == [0, 0, 58]
    id_hmac = new_id()
    exp = T0 + timedelta(minutes=3)
    store.create_nonce("n1", id_hmac, PARTNER, exp, now=T0, limit=BUDGET.nonces_per_individual)
    store.create_nonce("n2", id_hmac, OTHER_PARTNER, exp, now=T0, limit=BUDGET.nonces_per_individual)
    with pytest.raises(RateLimited) as refused:
        store.create_nonce(
            "n3", id_hmac, PARTNER, exp, now=T0 + timedelta(seconds=1), limit=BUDGET.nonces_per_individual
        )
    assert refused.value.retry_after_seconds == 599
    assert not store.nonce_usable("n3", id_hmac, PARTNER, T0)  # refused: nothing stored
    assert store.nonce_usable("n1", id_hmac, PARTNER, T0)


@contract
def test_purge_expired_is_bounded_and_keeps_what_is_live(store: Store) -> None:
    who = new_id()
    for n in range(5):
        store.create_nonce(f"old{n}", who, PARTNER, T0 + timedelta(seconds=n))
        store.claim_jti(who, f"j{n}", T0 + timedelta(seconds=n), T0 - timedelta(minutes=1))
    store.create_nonce("live", who, PARTNER, T0 + timedelta(hours=1))
    old_otp = make_otp(new_id(), created_at=T0 - timedelta(hours=1))
    store.replace_otp(old_otp)
    live_otp = make_otp(new_id(), created_at=T0)
    store.replace_otp(live_otp)
    fail(store, new_id(), T0 - timedelta(days=2))  # a counter whose window ended long ago
    store.count_failure_budget(PARTNER, T0 - timedelta(days=2), BUDGET)
    store.count_partner_otp_send(PARTNER, T0 - timedelta(days=2), RateRule(3, 60))
    now = T0 + timedelta(minutes=1)
    assert store.purge_expired(now, LIMITS, 3) == {
        "otps": 1,
        "wla_jtis": 3,
        "binding_nonces": 3,
        "limit_windows": 2,
        "partner_limits": 1,
        "individual_limits": 1,
    }
    assert store.purge_expired(now, LIMITS, 3)["binding_nonces"] == 2
    assert store.purge_expired(now, LIMITS, 3) == dict.fromkeys(
        ("otps", "wla_jtis", "binding_nonces", "limit_windows", "partner_limits", "individual_limits"), 0
    )
    assert store.count_rows("binding_nonces") == 1
    assert store.nonce_usable("live", who, PARTNER, now)
    assert store.otp_state(live_otp.transaction_id) == ("pending", 0)
    assert store.otp_state(old_otp.transaction_id) is None


@contract
def test_check_writable_writes_nothing(store: Store) -> None:
    store.check_writable()
    store.check_writable()
    assert store.count_rows("limit_windows") == 0


@contract
def test_upsert_identities_in_one_transaction(store: Store) -> None:
    a, b = new_id(), new_id()
    store.upsert_identity(Identity(a, "old@example.org", None, "A", None))
    batch = [Identity(a, "a@example.org", None, "A", b"p"), Identity(b, None, "+4915100000001", "B", None)]
    assert store.upsert_identities(
        batch, audit=lambda new, changed: admin_event(T0, "import", subject=f"{new}/{changed}")
    ) == (1, 1)
    assert [store.get_identity(x) for x in (a, b)] == batch
    assert [(r.action, r.subject) for r in all_audit_rows(store)] == [("import", "1/1")]


@contract
def test_upsert_identities_writes_kbi_answers_and_aliases_with_them_or_nothing(store: Store) -> None:
    alice, bob, vid, taken = new_id(), new_id(), new_id(), new_id()
    store.upsert_identity(Identity(bob, None, None, "B", None))
    store.add_alias(Alias(taken, bob, "VID", T0))
    # An alias another individual holds: the whole import is refused, nothing of it is written.
    with pytest.raises(AliasConflict):
        store.upsert_identities(
            [Identity(alice, None, None, "A", None)],
            kbi=[{"dob": b"m1"}],
            aliases=[Alias(vid, alice, "VID", T0), Alias(taken, alice, "VID", T0)],
            audit=lambda new, changed: admin_event(T0, "import", subject=f"{new}/{changed}"),
        )
    assert store.get_identity(alice) is None
    assert store.kbi_answers(alice) == {}
    assert store.resolve_individual(vid, T0) is None
    assert store.resolve_individual(taken, T0) == bob
    # A free alias: identity, answers and alias in one go.
    assert store.upsert_identities(
        [Identity(alice, None, None, "A", None)],
        kbi=[{"dob": b"m1"}],
        aliases=[Alias(vid, alice, "VID", T0)],
        audit=lambda new, changed: admin_event(T0, "import", subject=f"{new}/{changed}"),
    ) == (1, 0)
    assert store.kbi_answers(alice) == {"dob": b"m1"}
    assert store.resolve_individual(vid, T0) == alice


@contract
def test_signed_heads_move_forward_only(store: Store) -> None:
    alice, bob = new_id(), new_id()
    for _ in range(3):
        store.append_audit(individual_event(alice, T0, PARTNER, "do_key_binding", "refused", "auth_failed"))
    store.append_audit(individual_event(bob, T0, PARTNER, "send_binding_otp", "success"))
    heads, last = store.chain_heads_after(0, 100)
    rows = all_audit_rows(store)
    newest = {r.chain_key: (r.seq, r.hash) for r in rows}
    assert sorted(heads) == sorted((k, seq, h) for k, (seq, h) in newest.items())
    assert last == max(r.id for r in rows)
    assert store.chain_heads_after(last, 100) == ([], last)
    store.save_audit_heads([SignedHead(k, seq, h, T0, b"mac") for k, seq, h in heads])
    older = next(r for r in rows if r.chain_key == alice and r.seq == 1)
    store.save_audit_heads([SignedHead(alice, 1, older.hash, T0, b"old")])  # never moves a head back
    saved = {h.chain_key: h for h in store.audit_heads()}
    assert (saved[alice].seq, saved[alice].mac, saved[bob].seq) == (3, b"mac", 1)
    assert_utc(saved[alice].signed_at)


def test_parallel_reservations_never_evaluate_more_than_the_limit(store: Store) -> None:
    """The lockout race (issue 13, item 4) at the store: 40 attempts at once, 3 allowed; one lockout entry."""
    id_hmac = new_id()

    def attempt(i: int) -> bool:
        # Each request read the clock before it queued for the lock: their times are not in lock order.
        _, reservation = store.reserve_attempt(id_hmac, T0 + timedelta(milliseconds=(i * 7919) % 40), LIMITS)
        if reservation.refused_until is not None:
            return False
        time.sleep(0.01)  # the guess being evaluated
        at = T0 + timedelta(milliseconds=i)
        store.record_auth_failure(
            id_hmac,
            at,
            LIMITS,
            audit=individual_event(id_hmac, at, PARTNER, "do_key_binding", "refused", "auth_failed"),
            lockout_audit=individual_event(id_hmac, at, PARTNER, "do_key_binding", "locked", "too_many_attempts"),
            reservation=reservation,
        )
        return True

    results = race(40, attempt)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert results.count(True) == LIMITS.auth_failures.limit
    outcomes = [r.outcome for r in all_audit_rows(store)]
    assert (outcomes.count("refused"), outcomes.count("locked")) == (3, 1)


def test_tables_stay_bounded_under_nonce_and_otp_churn(store: Store) -> None:
    """Nonce flood (item 7): rows keep coming, each expiring after a minute; a sweep every 'minute' of 200 rows
    per table keeps every table near one minute's worth, whatever the total."""
    per_minute = 150
    sizes = []
    for minute in range(8):
        base = T0 + timedelta(minutes=minute)
        for n in range(per_minute):
            who = new_id()
            at = base + timedelta(seconds=n * 60 / per_minute)
            store.create_nonce(
                secrets.token_urlsafe(12),
                who,
                PARTNER,
                at + timedelta(minutes=1),
                now=at,
                limit=LIMITS.nonces_per_individual,
            )
            store.replace_otp(make_otp(who, created_at=at, ttl=timedelta(minutes=1)))
            store.claim_jti(who, "j", at + timedelta(minutes=1), at)
        store.purge_expired(
            base + timedelta(minutes=1),
            replace(
                LIMITS,
                otp_sends_per_individual=RateRule(2, 60),
                auth_failures=RateRule(3, 60),
                lockout_seconds=60,
                auth_failures_per_partner=RateRule(3, 60),
                auth_failures_global=RateRule(3, 60),
                nonces_per_partner=RateRule(3, 60),
                nonces_per_individual=RateRule(3, 60),
            ),
            200,
        )
        sizes.append(tuple(store.count_rows(t) for t in ("binding_nonces", "otps", "wla_jtis", "individual_limits")))
    assert all(n <= per_minute + 1 for size in sizes for n in size), sizes
    assert sizes[-1][0] > 0  # live rows stay


# -- races (real threads) -------------------------------------------------------------------------


@contract
def test_parallel_otp_guesses_get_only_the_allowed_attempts(store: Store) -> None:
    id_hmac = new_id()
    otp = make_otp(id_hmac, max_attempts=3)
    store.replace_otp(otp)
    results = race(20, lambda _: store.claim_otp_attempt(id_hmac, PARTNER, T0))
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    granted = [r for r in results if isinstance(r, OtpRecord)]
    assert sorted(r.attempts for r in granted) == [1, 2, 3]
    assert store.otp_state(otp.transaction_id) == ("pending", 3)


@contract
def test_parallel_rebinds_leave_exactly_one_active_binding(store: Store) -> None:
    id_hmac = new_id()
    bindings = [make_binding(id_hmac) for _ in range(10)]
    results = race(10, lambda i: store.commit_binding(bindings[i], consume_otp=None, now=T0))
    unexpected = [r for r in results if isinstance(r, Exception) and not isinstance(r, StoreConflict)]
    assert unexpected == []
    committed = sum(r is None for r in results)
    assert committed >= 1
    rows = store.bindings_for(id_hmac, PARTNER)
    assert len(rows) == committed
    assert [b.status for b in rows].count(BindingStatus.ACTIVE) == 1
    assert [b.status for b in rows].count(BindingStatus.SUPERSEDED) == committed - 1
    active = store.active_binding(id_hmac, PARTNER, "WLA")
    assert active is not None
    assert active == rows[-1]  # the last to commit is the active one


@contract
def test_parallel_commits_with_one_otp_succeed_once(store: Store) -> None:
    id_hmac = new_id()
    otp = make_otp(id_hmac)
    store.replace_otp(otp)
    bindings = [make_binding(id_hmac) for _ in range(10)]
    results = race(10, lambda i: store.commit_binding(bindings[i], consume_otp=otp.transaction_id, now=T0))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, OtpAlreadyUsed) for r in results if r is not None)
    assert store.count_rows("bindings") == 1
    assert store.otp_state(otp.transaction_id) == ("used", 0)


@contract
def test_parallel_claims_of_one_key_by_different_individuals(store: Store) -> None:
    ids = [new_id() for _ in range(10)]
    key = f"key-{secrets.token_hex(8)}"
    results = race(10, lambda i: store.claim_key(key, ids[i], T0))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, KeyOwnedByOther) for r in results if r is not None), [repr(r) for r in results]
    winner = ids[results.index(None)]
    assert store.key_owner(key) == winner
    assert store.count_rows("wallet_keys") == 1


# -- PostgreSQL only: migrations -------------------------------------------------------------


def select_all(table: str) -> sql.Composed:
    return sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(table))


def test_pg_migrations_alter_in_place_without_losing_rows() -> None:
    with fresh_schema() as url:
        backend = get_backend(pg.yoyo_url(url))
        try:
            first = read_migrations(pg.migrations_dir()).filter(lambda m: m.id == "0001_initial")
            with backend.lock():
                backend.apply_migrations(backend.to_apply(first))
        finally:
            backend.connection.close()

        id_hmac = new_id()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO individuals VALUES (%s, 'e@example.org', NULL, 'N', %s, %s, %s)",
                (id_hmac, b"pin", T0, T0),
            )
            conn.execute(
                "INSERT INTO otps VALUES ('txn', %s, %s, %s, %s, %s, 1, 3, 'pending')",
                (id_hmac, PARTNER, b"otp", T0, T0 + timedelta(minutes=5)),
            )
            conn.execute("INSERT INTO wallet_keys VALUES ('k1', %s, %s)", (id_hmac, T0))
            conn.execute("INSERT INTO issuers VALUES ('iss', 'ec-p256', 'PEM', %s, %s)", (T0, T0))
            for n, status in ((1, "superseded"), (2, "active")):
                conn.execute(
                    "INSERT INTO bindings (id_hmac, partner_id, auth_factor_type, psut, key_fingerprint,"
                    " certificate_pem, cert_thumbprint, serial_hex, issuer_key_label, status, created_at,"
                    " expires_at, superseded_at) VALUES (%s, %s, 'WLA', 'psut', 'k1', 'PEM', %s, 'ab', 'iss', %s,"
                    " %s, %s, %s)",
                    (id_hmac, PARTNER, f"t{n}", status, T0, T0 + timedelta(days=1), T0 if n == 1 else None),
                )
            before = {t: conn.execute(select_all(t)).fetchall() for t in TABLES[:5]}

        # Every migration after 0001, in place.
        assert pg.migrate(url) == len(list(Path(pg.migrations_dir()).glob("*.sql"))) - 1
        assert pg.migrate(url) == 0

        with psycopg.connect(url, autocommit=True) as conn:
            for table, rows in before.items():
                after = conn.execute(select_all(table)).fetchall()
                if table == "bindings":  # two new, empty columns at the end
                    assert [r[:-2] for r in after] == rows
                    assert all(r[-2:] == (None, None) for r in after)
                elif table == "issuers":  # installed, signing from its creation, no CSR, no chain
                    assert [r[:-4] for r in after] == rows
                    assert [r[-4:] for r in after] == [("installed", r[4], None, "") for r in rows]
                else:
                    assert after == rows
        s = PostgresStore(url)
        try:
            assert s.claim_otp_attempt(id_hmac, PARTNER, T0) is not None
            revoked = s.revoke_binding(id_hmac, PARTNER, "WLA", reason="r", now=T0, consume_otp=None)
            assert revoked is not None
            assert revoked.cert_thumbprint == "t2"
            s.commit_binding(make_binding(id_hmac), consume_otp=None, now=T0)
            assert [b.cert_thumbprint for b in s.bindings_for(id_hmac, PARTNER)][:2] == ["t1", "t2"]
            assert s.count_rows("wla_jtis") == s.count_rows("binding_nonces") == 0
        finally:
            s.close()


def test_pg_schema_matches_sqlite(pg_url: str, tmp_path: Path) -> None:
    """Same tables, columns and named indexes after all migrations."""
    lite.migrate(tmp_path / "kb.sqlite")
    with sqlite3.connect(tmp_path / "kb.sqlite") as db:
        lite_columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in TABLES}
        lite_indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    with psycopg.connect(pg_url) as conn:
        pg_columns = {
            t: [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema AND table_name = %s ORDER BY ordinal_position",
                    (t,),
                )
            ]
            for t in TABLES
        }
        pg_indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema")}
    assert pg_columns == lite_columns
    named = {i for i in lite_indexes if not i.startswith("sqlite_autoindex")}
    assert named <= pg_indexes
    assert named >= {"otps_one_pending", "bindings_one_active", "bindings_by_psut"}


# -- PostgreSQL only: failures map to StoreUnavailable -----------------------------------------


def test_pg_unreachable_database_is_store_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "POOL_TIMEOUT_SECONDS", 0.3)
    s = PostgresStore("postgresql://postgres@127.0.0.1:9/none?connect_timeout=1")
    try:
        with pytest.raises(StoreUnavailable):
            s.ping()
        with pytest.raises(StoreUnavailable):
            s.commit_binding(make_binding(new_id()), consume_otp=None, now=T0)
    finally:
        s.close()


def test_pg_recovers_from_dropped_connections(pg_url: str) -> None:
    """Connections killed server-side (as by a restart) cost no request: the store retries on a new one."""
    s = empty_pg_store(pg_url)
    try:
        id_hmac = new_id()
        s.upsert_identity(Identity(id_hmac, None, None, "n", None))
        with psycopg.connect(pg_url, autocommit=True) as admin:
            for step in range(2):
                pool = s._get_pool()
                with pool.connection() as c1, pool.connection() as c2:
                    pids = [c1.info.backend_pid, c2.info.backend_pid]
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
                if step == 0:
                    assert s.get_identity(id_hmac) is not None
                else:
                    s.commit_binding(make_binding(id_hmac), consume_otp=None, now=T0)
        assert s.count_rows("bindings") == 1
    finally:
        s.close()


# -- PostgreSQL only: every statement on a per-individual table names the individual ----------

PER_INDIVIDUAL_TABLES = {
    *("individuals", "otps", "bindings", "wla_jtis", "binding_nonces", "individual_limits", "kbi_answers")
}
#: Keyed by chain_key, which for an individual's chain is its id_hmac (partner and admin chains have their own).
PER_CHAIN_TABLES = {"audit_log"}
#: Statements allowed to run without id_hmac; the store explains each one where it defines it.
NOT_SHARD_KEYED = {
    pg.SQL_COUNT_IDENTITIES: "admin count of every individual",
    pg.SQL_COUNT_ACTIVE_BINDINGS: "metrics: count of every active binding",
    pg.SQL_OTP_STATE: "test helper, by transaction id",
    pg.SQL_BINDING_BY_THUMBPRINT: "lookup by certificate: the thumbprint does not reveal the id_hmac",
    pg.SQL_LATEST_BINDING_BY_PSUT: "lookup by PSUT: the PSUT does not reveal the id_hmac",
    pg.SQL_AUDIT_PAGE: "admin: `audit verify` and `audit export` walk every chain",
    pg.SQL_RESOLVE_INDIVIDUAL: "alias resolution: individuals by id_hmac, individual_aliases by alias_hmac",
    pg.SQL_AUDIT_AFTER: "the sweep signs chain heads by entry id, across every chain",
    pg.SQL_PURGE_EXPIRED_OTPS: "the sweep: expired rows of every individual",
    pg.SQL_PURGE_EXPIRED_JTIS: "the sweep: expired rows of every individual",
    pg.SQL_PURGE_EXPIRED_NONCES: "the sweep: expired rows of every individual",
    pg.SQL_PURGE_INDIVIDUAL_LIMITS: "the sweep: ended windows of every individual",
    **dict.fromkeys(pg.COUNT_SQL.values(), "admin row count"),
}


def tables_of(statement: str) -> set[str]:
    return set(re.findall(r"\b(?:from|into|(?<!for )(?<!do )update|join)\s+([a-z_]+)", statement))


def keyed_by_id_hmac(statement: str, column: str = "id_hmac") -> bool:
    """An INSERT whose row carries id_hmac, or a top-level ``id_hmac = %s`` conjunct in the WHERE clause."""
    if statement.startswith("insert into "):
        columns = statement[statement.index("(") + 1 : statement.index(")")]
        return column in [c.strip() for c in columns.split(",")]
    where = statement.partition(" where ")[2]
    where = re.split(r" (?:order by|returning|limit|for update)\b", where)[0]
    if not where or re.search(r"\bor\b", where):
        return False
    return any(c.strip() == f"{column} = %s" for c in re.split(r"\band\b", where))


def test_keyed_by_id_hmac_checker() -> None:
    assert keyed_by_id_hmac("select a from otps where id_hmac = %s and b = %s order by id")
    assert keyed_by_id_hmac("insert into otps (transaction_id, id_hmac) values (%s, %s)")
    assert not keyed_by_id_hmac("insert into otps (transaction_id) values (%s) returning id_hmac")
    assert not keyed_by_id_hmac("select a from otps where id_hmac = %s or b = %s")
    assert not keyed_by_id_hmac("select id_hmac from otps where transaction_id = %s")
    assert not keyed_by_id_hmac("delete from otps where other_id_hmac = %s")


def test_pg_statements_on_per_individual_tables_filter_by_id_hmac(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = psycopg.Cursor.execute

    def recording(self: psycopg.Cursor[Any], query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        seen.append(query if isinstance(query, str) else repr(query))
        return original(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recording)
    for flow in CONTRACT_FLOWS:
        s = empty_pg_store(pg_url)
        try:
            flow(s)
        finally:
            s.close()
    monkeypatch.undo()

    issued = set(seen)
    defined = {v for k, v in vars(pg).items() if k.startswith("SQL_")} | set(pg.COUNT_SQL.values())
    assert defined - issued == set(), "the contract flows must exercise every statement the store defines"
    offending = []
    for statement in issued - NOT_SHARD_KEYED.keys():
        normal = " ".join(statement.lower().split())
        if normal.startswith("truncate"):
            continue  # the test's own reset between flows
        if tables_of(normal) & PER_INDIVIDUAL_TABLES and not keyed_by_id_hmac(normal):
            offending.append(statement)
        if tables_of(normal) & PER_CHAIN_TABLES and not keyed_by_id_hmac(normal, "chain_key"):
            offending.append(statement)
    assert offending == []


def id_hmac_params(statement: str, params: Any) -> list[Any]:
    """The values a (normalised) statement passes for id_hmac, or for chain_key (an individual's audit
    chain is keyed by its id_hmac): an INSERT's column, or each ``column = %s`` / ``%(name)s`` comparison."""
    if not params:
        return []
    if isinstance(params, dict):
        names = set(re.findall(r"\b(?:id_hmac|chain_key) = %\((\w+)\)s", statement))
        if statement.startswith("insert into ") and "chain_key" in statement.split("(", 2)[1]:
            names.add("key")  # INSERT ... SELECT %(key)s, ...: the first selected value is the chain key
        return [params[n] for n in names]
    if statement.startswith("insert into "):
        columns = [c.strip() for c in statement[statement.index("(") + 1 : statement.index(")")].split(",")]
        column = next((c for c in ("id_hmac", "chain_key") if c in columns), None)
        if column is None:
            return []
        values = statement.split(" values (", 1)[1].split(",")
        index = columns.index(column)
        return [params[sum(v.strip() == "%s" for v in values[:index])]]
    return [params[statement[: m.start()].count("%s")] for m in re.finditer(r"\b(?:id_hmac|chain_key) = %s", statement)]


def test_pg_commit_binding_again_after_an_unknown_outcome_is_success(pg_url: str) -> None:
    """kb_commit_binding is one autocommitted call, retried on a fresh connection when its connection dies:
    a second call with the same binding (its commit's outcome unknown to the caller) finds it and succeeds,
    consuming nothing twice and writing no second audit entry."""
    s = empty_pg_store(pg_url)
    try:
        id_hmac = new_id()
        otp = make_otp(id_hmac)
        s.replace_otp(otp)
        binding = make_binding(id_hmac)
        ok = individual_event(id_hmac, T0, PARTNER, "do_key_binding", "success", subject="psut:x")
        for _ in range(2):
            s.commit_binding(binding, consume_otp=otp.transaction_id, now=T0, audit=ok)
        assert s.count_rows("bindings") == 1
        assert s.active_binding(id_hmac, PARTNER, "WLA") == binding
        assert s.otp_state(otp.transaction_id) == ("used", 0)
        assert len(all_audit_rows(s)) == 1
        with pytest.raises(ValueError, match="own chain"):  # the function writes the individual's chain only
            s.commit_binding(make_binding(id_hmac), consume_otp=None, now=T0, audit=replace(ok, chain_key=new_id()))
    finally:
        s.close()


def test_pg_commit_binding_function_stays_on_the_individuals_shard(pg_url: str) -> None:
    """Every statement in kb_commit_binding's body names the individual (p_id_hmac), as the sharding test
    requires of the store's own statements; the audit entry goes to the individual's chain."""
    s = empty_pg_store(pg_url)
    try:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'kb_commit_binding'").fetchone()
    finally:
        s.close()
    assert row is not None
    body = re.sub(r"--[^\n]*", "", str(row[0]))
    statements = [" ".join(st.lower().split()) for st in body.split(";")]
    checked = 0
    for statement in statements:
        statement = re.sub(r"^.*?\b(?=update |insert into |select )", "", statement)
        tables = tables_of(statement) & (PER_INDIVIDUAL_TABLES | PER_CHAIN_TABLES)
        if not tables:
            continue
        keyed = statement.replace("= p_id_hmac", "= %s")
        if statement.startswith("insert into audit_log"):
            assert keyed_by_id_hmac(keyed, "chain_key")
            assert "select p_id_hmac," in statement  # the chain_key inserted is the individual's own
            assert keyed.count("where a.chain_key = %s") == 2  # and the chain's head is read from it
        else:
            assert keyed_by_id_hmac(keyed), statement
        checked += 1
    assert checked >= 5, statements


def test_pg_each_write_transaction_stays_on_one_individuals_shard(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write transaction touches one individual's rows (every ID-HMAC it passes is the same one), or only
    a table distributed otherwise (wallet_keys by key, issuers replicated) — never both."""
    transactions: list[list[tuple[str, Any]]] = []
    current: list[list[tuple[str, Any]]] = []
    original_run = pg.PostgresStore._run
    original_execute = psycopg.Cursor.execute

    def run(self: pg.PostgresStore, work: Any, *, write: bool, **kwargs: Any) -> Any:
        current.append([])
        try:
            return original_run(self, work, write=write, **kwargs)
        finally:
            statements = current.pop()
            if write:  # reads run in autocommit: each statement is its own transaction
                transactions.append([(q, p) for q, p in statements if not q.startswith("set ")])

    def recording(self: psycopg.Cursor[Any], query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        if current and isinstance(query, str):
            current[-1].append((" ".join(query.lower().split()), params))
        return original_execute(self, query, params, **kwargs)

    monkeypatch.setattr(pg.PostgresStore, "_run", run)
    monkeypatch.setattr(psycopg.Cursor, "execute", recording)
    for flow in CONTRACT_FLOWS:
        s = empty_pg_store(pg_url)
        try:
            flow(s)
        finally:
            s.close()
    monkeypatch.undo()

    checked = 0
    for statements in transactions:
        if len(statements) < 2:
            continue  # a single statement is its own transaction on its own shard
        tables = set().union(*(tables_of(q) for q, _ in statements)) - {""}
        if any(q.startswith("truncate") for q, _ in statements):
            continue
        if any(isinstance(p, dict) and p.get("key") == ADMIN_CHAIN for _, p in statements):
            continue  # an admin action (`identities import`: one transaction for the whole file), not a request
        if tables & PER_INDIVIDUAL_TABLES:
            assert tables <= PER_INDIVIDUAL_TABLES | PER_CHAIN_TABLES, f"a transaction mixes shards: {sorted(tables)}"
            keys = {bytes(v) for q, params in statements for v in id_hmac_params(q, params)}
            assert len(keys) == 1, f"a transaction touches {len(keys)} individuals: {[q for q, _ in statements]}"
            checked += 1
        else:
            assert len(tables) <= 1, f"a transaction spans {sorted(tables)}"
    assert checked >= 5, "the flows ran too few multi-statement transactions to show anything"
