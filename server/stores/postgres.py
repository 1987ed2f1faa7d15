"""PostgreSQL backend of every store port (`server.stores.Store`), for replicated servers."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool
from yoyo import get_backend, read_migrations

from server.aliases import Alias, AliasConflict
from server.audit import GENESIS, AuditEvent, AuditRow, SignedHead
from server.domain import Binding, BindingStatus, Identity, IssuerRecord, OtpRecord, Partner, PendingIssuer
from server.limits import (
    GLOBAL_KEY,
    SCOPE_AUTH_FAILURES,
    SCOPE_NONCES,
    WINDOW_SKEW_SECONDS,
    FailureState,
    Limits,
    RateRule,
    Reservation,
    Window,
    after_failure,
    after_reserved_failure,
    release,
    reserve,
    seconds_until,
)
from server.ports import KeyOwnedByOther, OtpAlreadyUsed, PartnerCertificateInUse, RateLimited, StoreUnavailable

T = TypeVar("T")
Conn = psycopg.Connection[TupleRow]
Cur = psycopg.Cursor[TupleRow]

#: How long a request waits for a pooled connection, and a new connection for the server: well below a
#: client's usual deadline (a few seconds), so a database outage is answered UNAVAILABLE, retryable, rather
#: than DEADLINE_EXCEEDED; the circuit breaker (server/breaker.py) then answers at once until it is back.
POOL_TIMEOUT_SECONDS: Final = 2.0
CONNECT_TIMEOUT_SECONDS: Final = 2
#: How long the pool keeps retrying (with doubling waits: 1, 2, 4, 8 s…) to replace a connection it lost.
#: Short, so that after a failover a retry is never many seconds away: a chain that gives up leaves the
#: pool short of a connection, and the next request that has to wait starts a fresh attempt at once.
#: (psycopg_pool's default, 5 minutes, measured ~15 s from a primary's death to the first bind after a
#: ~9 s promotion: the attempts fell at 0, 1, 3, 7 and 15 s.)
RECONNECT_TIMEOUT_SECONDS: Final = 5.0
#: Like SQLite's busy timeout: a lock wait (row or advisory) longer than this fails as retryable.
LOCK_TIMEOUT_MS: Final = 2_000
#: Bounds a runaway statement; the admin row counts are the only scans and fit well within it.
STATEMENT_TIMEOUT_MS: Final = 30_000
#: First key of KeyBinder's two-key advisory locks ("KB"), so they are recognisable in pg_locks.
LOCK_NAMESPACE: Final = 0x4B42

TABLES: Final = (
    *("individuals", "otps", "bindings", "wallet_keys", "issuers", "wla_jtis", "binding_nonces"),
    *("individual_limits", "partner_limits", "audit_log", "partners", "kbi_answers", "individual_aliases"),
    *("limit_windows", "audit_heads"),
)

# -- SQL ------------------------------------------------------------------------------------
# Every statement is a module constant (SQL_*), so the sharding test can check that it has seen each one.
# Statements on per-individual tables filter by id_hmac, the distribution column on a distributed
# PostgreSQL; the few that cannot say why where they are defined.

BINDING_COLUMNS: Final = (
    "id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem, cert_thumbprint, serial_hex,"
    " issuer_key_label, created_at, expires_at, status, superseded_at, revoked_at, revocation_reason"
)

# Serialises the writers of one individual (OTP replacement, binding, revocation). The partial unique
# indexes already make a second active binding or pending OTP impossible; the lock makes concurrent
# writers queue instead of failing on them. It is taken first in each transaction, before any row lock,
# and a transaction takes at most one, so lock waits cannot form a cycle.
SQL_LOCK_INDIVIDUAL: Final = "SELECT pg_advisory_xact_lock(%s, %s)"

SQL_PING: Final = "SELECT 1"

SQL_INSERT_IDENTITY: Final = (
    "INSERT INTO individuals (id_hmac, email, phone, name, pin_hmac, created_at, updated_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id_hmac) DO NOTHING"
)
SQL_UPDATE_IDENTITY: Final = (
    "UPDATE individuals SET email = %s, phone = %s, name = %s, pin_hmac = %s, updated_at = %s WHERE id_hmac = %s"
)
SQL_GET_IDENTITY: Final = "SELECT email, phone, name, pin_hmac FROM individuals WHERE id_hmac = %s"
# An individual's KBI attributes are replaced with the identity, in its transaction (server/auth/kbi.py).
SQL_DELETE_KBI: Final = "DELETE FROM kbi_answers WHERE id_hmac = %s"
SQL_INSERT_KBI: Final = "INSERT INTO kbi_answers (id_hmac, field_id, answer_hmac) VALUES (%s, %s, %s)"
SQL_KBI_ANSWERS: Final = "SELECT field_id, answer_hmac FROM kbi_answers WHERE id_hmac = %s"
# Admin only (CLI, tests): counts every individual, so it fans out to every shard.
SQL_COUNT_IDENTITIES: Final = "SELECT count(*) FROM individuals"
# Metrics only (the active-bindings gauge, computed at scrape time and cached, off the request path):
# counts every individual's active bindings, so it fans out to every shard.
SQL_COUNT_ACTIVE_BINDINGS: Final = "SELECT count(*) FROM bindings WHERE status = 'active'"

SQL_REPLACE_PENDING_OTP: Final = (
    "UPDATE otps SET state = 'replaced' WHERE id_hmac = %s AND partner_id = %s AND state = 'pending'"
)
SQL_INSERT_OTP: Final = (
    "INSERT INTO otps (transaction_id, id_hmac, partner_id, otp_hmac, created_at, expires_at, attempts,"
    " max_attempts, state) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, 'pending')"
)
# Request path: an OTP whose delivery failed must not stay usable.
SQL_DISCARD_OTP: Final = "DELETE FROM otps WHERE id_hmac = %s AND transaction_id = %s"
# One statement: the check and the increment cannot be split by a concurrent guess. A concurrent
# UPDATE of the same row waits for this one and then re-evaluates the WHERE clause on the new row.
SQL_CLAIM_OTP_ATTEMPT: Final = (
    "UPDATE otps SET attempts = attempts + 1"
    " WHERE id_hmac = %s AND partner_id = %s AND state = 'pending'"
    " AND attempts < max_attempts AND expires_at > %s"
    " RETURNING transaction_id, otp_hmac, created_at, expires_at, attempts, max_attempts"
)
# Test helper only: by transaction id alone, like discard_otp.
SQL_OTP_STATE: Final = "SELECT state, attempts FROM otps WHERE transaction_id = %s"
# Conditional update: exactly one transaction can move the OTP from pending to used.
SQL_CONSUME_OTP: Final = (
    "UPDATE otps SET state = 'used' WHERE id_hmac = %s AND transaction_id = %s AND state = 'pending'"
)

# wallet_keys is distributed by key_fingerprint, not id_hmac (a key's owner is a global fact). Both
# statements are single-row and run in their own transaction (autocommit), never inside an individual's
# binding transaction, so that transaction stays on one shard. See claim_key.
SQL_KEY_OWNER: Final = "SELECT id_hmac FROM wallet_keys WHERE key_fingerprint = %s"
SQL_CLAIM_KEY: Final = (
    "INSERT INTO wallet_keys (key_fingerprint, id_hmac, created_at) VALUES (%s, %s, %s)"
    " ON CONFLICT (key_fingerprint) DO NOTHING"
)

# The binding transaction (lock, OTP/nonce consumption, supersede, insert, audit entry) in one statement and
# one round trip: a function (migration 0007) whose every statement names p_id_hmac, the individual's shard
# (on Citus a function distributed by p_id_hmac). Autocommit makes the call its own transaction.
SQL_COMMIT_BINDING: Final = (
    "SELECT kb_commit_binding(%s::bytea, %s::text, %s::text, %s::text, %s::text, %s::text, %s::text, %s::text,"
    " %s::text, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::integer, %s::integer, %s::text, %s::text,"
    " %s::timestamptz, %s::text, %s::text, %s::text, %s::text, %s::text, %s::bytea, %s::bytea, %s::timestamptz)"
)
#: SQLSTATEs kb_commit_binding raises when the OTP or the nonce it should consume was spent already.
SQLSTATE_OTP_USED: Final = "KB001"
SQLSTATE_NONCE_USED: Final = "KB002"
# The f-strings below only splice in the constant column list (hence noqa: S608).
SQL_BINDINGS_FOR: Final = f"SELECT {BINDING_COLUMNS} FROM bindings WHERE id_hmac = %s AND partner_id = %s ORDER BY id"  # noqa: S608
SQL_ACTIVE_BINDING: Final = (
    f"SELECT {BINDING_COLUMNS} FROM bindings"  # noqa: S608
    " WHERE id_hmac = %s AND partner_id = %s AND auth_factor_type = %s AND status = 'active'"
)
# Lookup by certificate for GetBinding, where the partner names no individual. A thumbprint does not
# reveal the id_hmac, so on a distributed database this fans out to every shard (one index probe each).
SQL_BINDING_BY_THUMBPRINT: Final = f"SELECT {BINDING_COLUMNS} FROM bindings WHERE cert_thumbprint = %s"  # noqa: S608
# The same for a known individual (WLA verification): single-shard.
SQL_BINDING_OF: Final = f"SELECT {BINDING_COLUMNS} FROM bindings WHERE id_hmac = %s AND cert_thumbprint = %s"  # noqa: S608
# Lookup by PSUT (GetBinding). The PSUT is an HMAC of partner and individual ID and does not reveal the
# id_hmac either, so this fans out too. All rows it can match belong to one individual.
SQL_LATEST_BINDING_BY_PSUT: Final = (
    f"SELECT {BINDING_COLUMNS} FROM bindings WHERE psut = %s AND partner_id = %s AND auth_factor_type = %s"  # noqa: S608
    " ORDER BY (status = 'active') DESC, id DESC LIMIT 1"
)
SQL_REVOKE_ACTIVE: Final = (
    "UPDATE bindings SET status = 'revoked', revoked_at = %s, revocation_reason = %s"  # noqa: S608
    " WHERE id_hmac = %s AND partner_id = %s AND auth_factor_type = %s AND status = 'active'"
    f" RETURNING {BINDING_COLUMNS}"
)

# Expired entries of this individual can go: their tokens fail the exp check anyway. SKIP LOCKED: a row
# another claim is deleting is left to it, so two claims never wait on each other here.
SQL_PURGE_JTIS: Final = (
    "DELETE FROM wla_jtis WHERE id_hmac = %s AND jti IN"
    " (SELECT jti FROM wla_jtis WHERE id_hmac = %s AND expires_at <= %s FOR UPDATE SKIP LOCKED)"
)
# A concurrent claim of the same jti waits for this one to commit, then does nothing (rowcount 0).
SQL_CLAIM_JTI: Final = (
    "INSERT INTO wla_jtis (id_hmac, jti, expires_at) VALUES (%s, %s, %s) ON CONFLICT (id_hmac, jti) DO NOTHING"
)
SQL_CREATE_NONCE: Final = "INSERT INTO binding_nonces (nonce, id_hmac, partner_id, expires_at) VALUES (%s, %s, %s, %s)"
SQL_NONCE_USABLE: Final = (
    "SELECT 1 FROM binding_nonces WHERE id_hmac = %s AND nonce = %s AND partner_id = %s"
    " AND used_at IS NULL AND expires_at > %s"
)

# issuers is a small reference table (replicated to every node), not per-individual: its statements name
# no id_hmac, and each is a single-row write or a read of the whole (a handful of rows) table. Pending keys
# (a CSR is out, no certificate yet) live in the same table, so installing one is a single-row UPDATE.
SQL_ADD_ISSUER: Final = (
    "INSERT INTO issuers (key_label, key_kind, state, certificate_pem, chain_pem, not_before, not_after, created_at)"
    " VALUES (%s, %s, 'installed', %s, %s, %s, %s, %s)"
)
SQL_ISSUERS: Final = (
    "SELECT key_label, key_kind, certificate_pem, not_after, created_at, not_before, chain_pem FROM issuers"
    " WHERE state = 'installed' ORDER BY created_at DESC"
)
SQL_ADD_PENDING_ISSUER: Final = (
    "INSERT INTO issuers (key_label, key_kind, state, csr_pem, created_at) VALUES (%s, %s, 'pending', %s, %s)"
)
SQL_PENDING_ISSUERS: Final = (
    "SELECT key_label, key_kind, csr_pem, created_at FROM issuers WHERE state = 'pending' ORDER BY created_at DESC"
)
# Conditional on the key still being pending: two operators installing at once cannot both succeed.
SQL_INSTALL_ISSUER: Final = (
    "UPDATE issuers SET state = 'installed', certificate_pem = %s, chain_pem = %s, not_before = %s, not_after = %s"
    " WHERE key_label = %s AND state = 'pending'"
)

# -- abuse limits and the audit trail (see server/limits.py, server/audit.py) --
# The lockout is read with the identity: a LEFT JOIN on the same key, so the binding path pays no extra
# round trip for it. (individual_limits is distributed by id_hmac too, so the join stays on one shard.)
SQL_IDENTITY_AND_LOCK: Final = (
    "SELECT email, phone, name, pin_hmac, locked_until FROM individuals LEFT JOIN individual_limits USING (id_hmac)"
    " WHERE id_hmac = %s"
)
SQL_LOCKED_UNTIL: Final = "SELECT locked_until FROM individual_limits WHERE id_hmac = %s"
SQL_FAILURE_STATE: Final = "SELECT fail_window_start, failures, locked_until FROM individual_limits WHERE id_hmac = %s"
SQL_SAVE_FAILURE_STATE: Final = (
    "INSERT INTO individual_limits (id_hmac, fail_window_start, failures, locked_until) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (id_hmac) DO UPDATE SET fail_window_start = excluded.fail_window_start,"
    " failures = excluded.failures, locked_until = excluded.locked_until"
)
# One statement counts a send: a window that ended (or lies over a minute ahead: the clock stepped back) starts
# afresh at 1; otherwise the count goes up, but never past limit + 1, which means "refused" (server.limits
# applies the same window rule to failures).
# Parameters: key, now, expired (= now - window), ahead (= now + skew), limit.
_COUNT_SEND: Final = (
    " ON CONFLICT ({key}) DO UPDATE SET"
    " otp_window_start = CASE WHEN l.otp_window_start IS NULL OR l.otp_window_start <= %s"
    " OR l.otp_window_start > %s THEN excluded.otp_window_start ELSE l.otp_window_start END,"
    " otp_sends = CASE WHEN l.otp_window_start IS NULL OR l.otp_window_start <= %s OR l.otp_window_start > %s THEN 1"
    " WHEN l.otp_sends <= %s THEN l.otp_sends + 1 ELSE l.otp_sends END"
    " RETURNING otp_window_start, otp_sends"
)
# In the OTP's transaction, under the individual's lock.
SQL_COUNT_INDIVIDUAL_SEND: Final = (
    "INSERT INTO individual_limits AS l (id_hmac, otp_window_start, otp_sends) VALUES (%s, %s, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.format(key="id_hmac")
)
# partner_limits is distributed by partner_id: this single statement is its own transaction on the
# partner's key, never joined with an individual's rows (a concurrent upsert of the row waits for this one).
SQL_COUNT_PARTNER_SEND: Final = (
    "INSERT INTO partner_limits AS l (partner_id, otp_window_start, otp_sends) VALUES (%s, %s, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.format(key="partner_id")
)
# Appends after the chain's last entry (or the genesis hash) and computes the new entry's hash in the same
# statement: sha256(prev_hash || int8send(seq) || payload) is server.audit.link_hash. One round trip per
# entry. Writers of one chain are serialized by the individual's (or the chain's) advisory lock; the
# primary key (chain_key, seq) would refuse a duplicate seq anyway.
SQL_APPEND_AUDIT: Final = (
    "INSERT INTO audit_log (chain_key, seq, at, partner_id, action, outcome, reason, subject, prev_hash, hash)"
    " SELECT %(key)s, h.seq + 1, %(at)s, %(partner)s, %(action)s, %(outcome)s, %(reason)s, %(subject)s, h.hash,"
    " sha256(h.hash || int8send(h.seq + 1) || %(payload)s)"
    " FROM (SELECT coalesce((SELECT seq FROM audit_log WHERE chain_key = %(key)s ORDER BY seq DESC LIMIT 1), 0)"
    " AS seq, coalesce((SELECT hash FROM audit_log WHERE chain_key = %(key)s ORDER BY seq DESC LIMIT 1),"
    " %(genesis)s) AS hash) AS h"
)
# Failure budgets and the partner's nonce count: limit_windows is distributed by key (a partner id or '*').
# Each statement is its own transaction, never joined with an individual's rows. Parameters: scope, key,
# now, expired (= now - window), ahead (= now + skew), expired, ahead, limit.
SQL_COUNT_WINDOW: Final = (
    "INSERT INTO limit_windows AS l (scope, key, window_start, count) VALUES (%s, %s, %s, 1)"
    " ON CONFLICT (scope, key) DO UPDATE SET"
    " window_start = CASE WHEN l.window_start <= %s OR l.window_start > %s THEN excluded.window_start"
    " ELSE l.window_start END,"
    " count = CASE WHEN l.window_start <= %s OR l.window_start > %s THEN 1"
    " WHEN l.count <= %s THEN l.count + 1 ELSE l.count END"
    " RETURNING window_start, count"
)
SQL_FAILURE_BUDGET: Final = "SELECT key, window_start, count FROM limit_windows WHERE scope = %s AND key IN (%s, %s)"
# In the nonce's transaction, under the individual's lock (the same window rule as OTP sends).
SQL_COUNT_INDIVIDUAL_NONCE: Final = (
    "INSERT INTO individual_limits AS l (id_hmac, nonce_window_start, nonces) VALUES (%s, %s, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.replace("otp_window_start", "nonce_window_start").replace("otp_sends", "nonces").format(key="id_hmac")
)
SQL_RESERVE_IDENTITY: Final = SQL_GET_IDENTITY
# The reservation's commit does not wait for the WAL flush: lost to a crash of the database, it belongs to an
# attempt that was never answered (the failure, or the binding that gives it back, is committed durably).
SQL_RESERVE_NOT_DURABLE: Final = "SET LOCAL synchronous_commit TO off"
# The sweep (server/sweeper.py): expired rows, oldest first, a bounded batch per statement. They name no
# id_hmac: on a distributed database each fans out to every shard (maintenance, off the request path).
# SKIP LOCKED: rows a request is using right now are left for the next run.
SQL_PURGE_EXPIRED_OTPS: Final = (
    "DELETE FROM otps WHERE ctid IN (SELECT ctid FROM otps WHERE expires_at <= %s ORDER BY expires_at LIMIT %s"
    " FOR UPDATE SKIP LOCKED)"
)
SQL_PURGE_EXPIRED_JTIS: Final = (
    "DELETE FROM wla_jtis WHERE ctid IN (SELECT ctid FROM wla_jtis WHERE expires_at <= %s ORDER BY expires_at"
    " LIMIT %s FOR UPDATE SKIP LOCKED)"
)
SQL_PURGE_EXPIRED_NONCES: Final = (
    "DELETE FROM binding_nonces WHERE ctid IN (SELECT ctid FROM binding_nonces WHERE expires_at <= %s"
    " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED)"
)
SQL_PURGE_WINDOWS: Final = (
    "DELETE FROM limit_windows WHERE ctid IN (SELECT ctid FROM limit_windows WHERE window_start <= %s"
    " ORDER BY window_start LIMIT %s FOR UPDATE SKIP LOCKED)"
)
SQL_PURGE_PARTNER_LIMITS: Final = (
    "DELETE FROM partner_limits WHERE ctid IN (SELECT ctid FROM partner_limits WHERE otp_window_start <= %s"
    " LIMIT %s FOR UPDATE SKIP LOCKED)"
)
# An individual's counters can go once every window has ended and no lockout runs: a fresh row is the same.
SQL_PURGE_INDIVIDUAL_LIMITS: Final = (
    "DELETE FROM individual_limits WHERE ctid IN (SELECT ctid FROM individual_limits"
    " WHERE coalesce(locked_until, '-infinity') <= %(now)s AND coalesce(otp_window_start, '-infinity') <= %(cut)s"
    " AND coalesce(fail_window_start, '-infinity') <= %(cut)s AND coalesce(nonce_window_start, '-infinity') <= %(cut)s"
    " LIMIT %(n)s FOR UPDATE SKIP LOCKED)"
)
# The health probe's write, rolled back: shows that the database takes writes (not full, not read-only).
SQL_PROBE_WRITE: Final = (
    "INSERT INTO limit_windows (scope, key, window_start, count) VALUES ('health', %s, %s, 0)"
    " ON CONFLICT (scope, key) DO NOTHING"
)
# Signed audit chain heads (admin and the sweep): by entry id, i.e. across every chain, so they fan out.
SQL_AUDIT_AFTER: Final = "SELECT id, chain_key, seq, hash FROM audit_log WHERE id > %s ORDER BY id LIMIT %s"
SQL_SAVE_AUDIT_HEAD: Final = (
    "INSERT INTO audit_heads (chain_key, seq, hash, signed_at, mac) VALUES (%s, %s, %s, %s, %s)"
    " ON CONFLICT (chain_key) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
    " signed_at = excluded.signed_at, mac = excluded.mac WHERE excluded.seq >= audit_heads.seq"
)
SQL_AUDIT_HEADS: Final = "SELECT chain_key, seq, hash, signed_at, mac FROM audit_heads ORDER BY chain_key"

# Admin only (`keybinder audit verify/export`): walks every chain in pages, so it fans out to every shard.
SQL_AUDIT_PAGE: Final = (
    "SELECT id, chain_key, seq, at, partner_id, action, outcome, reason, subject, prev_hash, hash"
    " FROM audit_log WHERE (chain_key, seq) > (%s, %s) ORDER BY chain_key, seq LIMIT %s"
)
#: First key of the advisory locks of partner and admin chains ("KA"); an individual's chain uses its lock.
AUDIT_LOCK_NAMESPACE: Final = 0x4B41

# -- partners (the sec-auth change) --
# partners is a small reference table (replicated to every node), not per-individual: no id_hmac here.
PARTNER_COLUMNS: Final = "partner_id, api_key_sha256, enabled, client_cert_sha256, created_at, updated_at"
SQL_ADD_PARTNER: Final = (
    "INSERT INTO partners (partner_id, api_key_sha256, enabled, client_cert_sha256, created_at, updated_at)"
    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (partner_id) DO NOTHING"
)
SQL_GET_PARTNER: Final = f"SELECT {PARTNER_COLUMNS} FROM partners WHERE partner_id = %s"  # noqa: S608
SQL_PARTNER_BY_CERTIFICATE: Final = f"SELECT {PARTNER_COLUMNS} FROM partners WHERE client_cert_sha256 = %s"  # noqa: S608
SQL_LIST_PARTNERS: Final = f"SELECT {PARTNER_COLUMNS} FROM partners ORDER BY partner_id"  # noqa: S608
SQL_SET_PARTNER_ENABLED: Final = "UPDATE partners SET enabled = %s, updated_at = %s WHERE partner_id = %s"
SQL_SET_PARTNER_KEY: Final = "UPDATE partners SET api_key_sha256 = %s, updated_at = %s WHERE partner_id = %s"
SQL_SET_PARTNER_CERTIFICATE: Final = (
    "UPDATE partners SET client_cert_sha256 = %s, updated_at = %s WHERE partner_id = %s"
)

# Admin and test helper only: whole-table counts fan out to every shard.
# -- aliases (server/aliases.py) --
# Every request resolves the ID it names with this one query, whatever the answer. individual_aliases is
# distributed by alias_hmac (the value a request knows); the individuals probe filters by id_hmac. Both
# probes take the same value, so on a distributed database this is two single-shard index probes.
SQL_RESOLVE_INDIVIDUAL: Final = (
    "SELECT id_hmac FROM individuals WHERE id_hmac = %s"
    " UNION ALL SELECT id_hmac FROM individual_aliases"
    " WHERE alias_hmac = %s AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > %s) LIMIT 1"
)
# Insert, or update the same individual's unrevoked alias; no row back means another individual's or revoked.
SQL_UPSERT_ALIAS: Final = (
    "INSERT INTO individual_aliases (alias_hmac, id_hmac, alias_type, created_at, expires_at)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (alias_hmac) DO UPDATE SET alias_type = excluded.alias_type,"
    " expires_at = excluded.expires_at"
    " WHERE individual_aliases.id_hmac = excluded.id_hmac AND individual_aliases.revoked_at IS NULL"
    " RETURNING alias_hmac"
)
SQL_REVOKE_ALIAS: Final = "UPDATE individual_aliases SET revoked_at = %s WHERE alias_hmac = %s AND revoked_at IS NULL"
# Admin (`identities alias list`): by individual, so it fans out over the alias shards.
SQL_ALIASES_OF: Final = (
    "SELECT alias_hmac, id_hmac, alias_type, created_at, expires_at, revoked_at FROM individual_aliases"
    " WHERE id_hmac = %s ORDER BY created_at, alias_hmac"
)
# The PSUT an individual already has with a partner (its first binding's), so that PSUTs issued before
# aliases existed never change: single-shard.
SQL_PARTNER_PSUT: Final = "SELECT psut FROM bindings WHERE id_hmac = %s AND partner_id = %s ORDER BY id LIMIT 1"

COUNT_SQL: Final = {table: f"SELECT count(*) FROM {table}" for table in TABLES}  # noqa: S608 (fixed names)


# -- URLs and migrations ------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """The URL as libpq reads it: ``postgresql://…`` (``postgres://`` and ``postgresql+psycopg://`` accepted)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in {"postgresql", "postgres", "postgresql+psycopg"}:
        raise ValueError("a PostgreSQL URL starts with postgresql://")
    return f"postgresql://{rest}"


def yoyo_url(url: str) -> str:
    """The URL for yoyo, whose psycopg 3 backend is registered as ``postgresql+psycopg``."""
    return "postgresql+psycopg://" + libpq_url(url).removeprefix("postgresql://")


def migrations_dir() -> str:
    return str(Path(__file__).resolve().parent.parent / "migrations" / "postgresql")


def writable_host_url(url: str) -> str:
    """A multi-host URL (``host=a,b``, as pg_auto_failover prints it) narrowed to the host that is read-write
    now, for yoyo, which parses one host only; any other URL as it is."""
    parts = urlsplit(libpq_url(url))
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return url
    with psycopg.connect(libpq_url(url), connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        host, port = conn.info.host, conn.info.port
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


def migrate(url: str) -> int:
    """Apply pending schema migrations; returns how many were applied."""
    backend = get_backend(yoyo_url(writable_host_url(url)))
    try:
        migrations = read_migrations(migrations_dir())
        # yoyo's lock table keeps two processes (e.g. two replicas running `init`) from migrating at once.
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return len(pending)
    finally:
        backend.connection.close()


def pending_migrations(url: str) -> int:
    """Migrations not yet applied; connecting first with a bounded wait, so an unreachable server fails fast."""
    psycopg.connect(libpq_url(url), connect_timeout=CONNECT_TIMEOUT_SECONDS).close()
    backend = get_backend(yoyo_url(writable_host_url(url)))
    try:
        return len(backend.to_apply(read_migrations(migrations_dir())))
    finally:
        backend.connection.close()


# -- the store ------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    """Times leave the store as tz-aware UTC (datetime.UTC), whatever the session time zone; they enter
    converted the same way, so a naive value means local time, as in the SQLite store."""
    return value.astimezone(UTC)


def _lock_key(id_hmac: bytes) -> int:
    # The ID-HMAC is uniformly random: 32 of its bits make a good lock key. Two individuals sharing a
    # key only queue behind each other.
    return int.from_bytes(id_hmac[:4], "big", signed=True)


def _configure(conn: Conn) -> None:
    """Session settings for every pooled connection (set once, when it is opened)."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class PostgresStore:
    """Implements the same ports as SqliteStore on a PostgreSQL database, through a connection pool.

    Connections run in autocommit; every write method is one explicit transaction. Atomicity comes from
    PostgreSQL itself: conditional UPDATEs (checked by rowcount or RETURNING) for single use and attempt
    counting, partial unique indexes for one pending OTP and one active binding, and a per-individual
    advisory lock that makes concurrent writers for one individual queue rather than collide.

    Errors: a lost connection, a pool or lock timeout, a deadlock or any other psycopg OperationalError
    becomes ``StoreUnavailable`` (retryable; the transaction was rolled back, or its commit outcome is
    unknown and it was not acknowledged). A statement that fails because its pooled connection turned out
    dead (e.g. after a database restart) is retried once on a fresh connection, so the first request after
    an outage succeeds. A unique violation in a write that races (commit, revoke, OTP, replay cache) is
    retried once and then reported as ``StoreUnavailable``; it is never an unhandled error.
    """

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = libpq_url(url)
        self.min_size = min_size
        self.max_size = max_size
        self._pool: ConnectionPool[Conn] | None = None
        self._guard = threading.Lock()

    # -- connections ----------------------------------------------------------------------

    def _get_pool(self) -> ConnectionPool[Conn]:
        # Opened on first use, like SQLite's connections, so that constructing a store does no I/O and a
        # closed store can be used again.
        pool = self._pool
        if pool is None:
            with self._guard:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.url,
                        min_size=self.min_size,
                        max_size=self.max_size,
                        kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_SECONDS},
                        configure=_configure,
                        timeout=POOL_TIMEOUT_SECONDS,
                        reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
                        name="keybinder",
                        open=True,
                    )
                pool = self._pool
        return pool

    def _run(
        self, work: Callable[[Cur], T], *, write: bool, retry_conflict: bool = True, one_statement: bool = False
    ) -> T:
        """Run ``work`` on a pooled connection: in one transaction when ``write``, else as it comes.

        ``one_statement``: ``work`` is a single autocommitted write (a function call), its own transaction
        with no BEGIN/COMMIT round trips. If the connection dies its outcome is unknown, and it is run again
        on a fresh connection only because the function is idempotent (kb_commit_binding: a binding that is
        already there is success).
        """
        for attempt in (1, 2):
            conn: Conn | None = None
            committing = False
            try:
                with self._get_pool().connection() as conn:
                    if not write or one_statement:
                        with conn.cursor() as cur:
                            return work(cur)
                    with conn.transaction():
                        with conn.cursor() as cur:
                            result = work(cur)
                        committing = True  # leaving the block commits
                    return result
            except pg_errors.UniqueViolation as err:
                if not retry_conflict:
                    raise
                if attempt == 1:
                    continue  # a concurrent writer got there first; the retry sees its committed row
                raise StoreUnavailable(
                    f"concurrent writes conflicted twice on {err.diag.constraint_name}; retry"
                ) from err
            except (psycopg.OperationalError, psycopg.InterfaceError) as err:
                # Nothing was committed when the connection died before the commit: safe to run again.
                if attempt == 1 and not committing and conn is not None and conn.broken:
                    self._drop_dead_connections()
                    continue
                raise StoreUnavailable(f"database unavailable: {type(err).__name__}: {err}") from err
        raise AssertionError("unreachable")

    def _drop_dead_connections(self) -> None:
        # After a restart every idle connection is dead: check them all now rather than fail one request each.
        pool = self._pool
        if pool is not None:
            with contextlib.suppress(psycopg.Error):  # the retry reports what is still wrong
                pool.check()

    def _read(self, sql: str, params: Sequence[object]) -> list[TupleRow]:
        def work(cur: Cur) -> list[TupleRow]:
            cur.execute(sql, params)
            return cur.fetchall()

        return self._run(work, write=False)

    @staticmethod
    def _lock_individual(cur: Cur, id_hmac: bytes) -> None:
        cur.execute(SQL_LOCK_INDIVIDUAL, (LOCK_NAMESPACE, _lock_key(id_hmac)))

    def ping(self) -> None:
        self._read(SQL_PING, ())

    def check_writable(self) -> None:
        """The health probe's write: one row written and rolled back (StoreUnavailable when writes fail)."""

        def work(cur: Cur) -> None:
            cur.execute(SQL_PROBE_WRITE, (secrets.token_hex(8), datetime.now(UTC)))
            raise _RollBack

        with contextlib.suppress(_RollBack):
            self._run(work, write=True, retry_conflict=False)

    def close(self) -> None:
        with self._guard:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- identities -----------------------------------------------------------------------

    def upsert_identity(self, identity: Identity, *, kbi: Mapping[str, bytes] | None = None) -> bool:
        now = datetime.now(UTC)
        i = identity

        def work(cur: Cur) -> bool:
            # Insert-or-nothing, then update: a concurrent insert of the same individual waits for ours and
            # then finds the row, so exactly one caller sees True.
            cur.execute(SQL_INSERT_IDENTITY, (i.id_hmac, i.email, i.phone, i.name, i.pin_hmac, now, now))
            new = cur.rowcount == 1
            if not new:
                cur.execute(SQL_UPDATE_IDENTITY, (i.email, i.phone, i.name, i.pin_hmac, now, i.id_hmac))
            cur.execute(SQL_DELETE_KBI, (i.id_hmac,))
            for field_id, mac in (kbi or {}).items():
                cur.execute(SQL_INSERT_KBI, (i.id_hmac, field_id, mac))
            return new

        return self._run(work, write=True)

    def upsert_identities(
        self,
        identities: Sequence[Identity],
        *,
        kbi: Sequence[Mapping[str, bytes] | None] = (),
        aliases: Sequence[Alias] = (),
        audit: Callable[[int, int], AuditEvent] | None = None,
    ) -> tuple[int, int]:
        """Insert or replace every identity, its KBI answers and ``aliases`` in one transaction (all or
        nothing); (new, updated). An alias another individual holds, or a revoked one, raises AliasConflict.

        An admin import, not the request path: on a distributed database this one transaction spans shards."""
        now = datetime.now(UTC)

        def work(cur: Cur) -> int:
            added = 0
            for index, i in enumerate(identities):
                cur.execute(SQL_INSERT_IDENTITY, (i.id_hmac, i.email, i.phone, i.name, i.pin_hmac, now, now))
                if cur.rowcount == 1:
                    added += 1
                else:
                    cur.execute(SQL_UPDATE_IDENTITY, (i.email, i.phone, i.name, i.pin_hmac, now, i.id_hmac))
                answers = kbi[index] if index < len(kbi) else None
                cur.execute(SQL_DELETE_KBI, (i.id_hmac,))
                for field_id, mac in (answers or {}).items():
                    cur.execute(SQL_INSERT_KBI, (i.id_hmac, field_id, mac))
            if audit is not None:
                event = audit(added, len(identities) - added)
                cur.execute(SQL_LOCK_INDIVIDUAL, (AUDIT_LOCK_NAMESPACE, _chain_lock_key(event.chain_key)))
                self._append_audit(cur, event)
            for a in aliases:  # a conflict rolls back everything above, the audit entry too
                cur.execute(SQL_UPSERT_ALIAS, (a.alias_hmac, a.id_hmac, a.alias_type, a.created_at, a.expires_at))
                if cur.fetchone() is None:
                    raise AliasConflict("an alias is registered to another individual or was revoked")
            return added

        added = self._run(work, write=True)
        return added, len(identities) - added

    def get_identity(self, id_hmac: bytes) -> Identity | None:
        rows = self._read(SQL_GET_IDENTITY, (id_hmac,))
        if not rows:
            return None
        email, phone, name, pin_hmac = rows[0]
        return Identity(id_hmac, email, phone, name, pin_hmac)

    def kbi_answers(self, id_hmac: bytes) -> dict[str, bytes]:
        return {field_id: bytes(mac) for field_id, mac in self._read(SQL_KBI_ANSWERS, (id_hmac,))}

    def count_identities(self) -> int:
        return int(self._read(SQL_COUNT_IDENTITIES, ())[0][0])

    def count_active_bindings(self) -> int:
        return int(self._read(SQL_COUNT_ACTIVE_BINDINGS, ())[0][0])

    # -- OTPs -----------------------------------------------------------------------------

    def replace_otp(
        self, otp: OtpRecord, *, send_limit: RateRule | None = None, audit: AuditEvent | None = None
    ) -> None:
        def work(cur: Cur) -> None:
            self._lock_individual(cur, otp.id_hmac)
            if send_limit is not None:
                self._count_otp_send(cur, otp.id_hmac, otp.created_at, send_limit)
            cur.execute(SQL_REPLACE_PENDING_OTP, (otp.id_hmac, otp.partner_id))
            cur.execute(
                SQL_INSERT_OTP,
                (
                    otp.transaction_id,
                    otp.id_hmac,
                    otp.partner_id,
                    otp.otp_hmac,
                    _utc(otp.created_at),
                    _utc(otp.expires_at),
                    otp.max_attempts,
                ),
            )
            if audit is not None:
                self._append_audit(cur, audit)

        self._run(work, write=True)

    def discard_otp(self, transaction_id: str, id_hmac: bytes) -> None:
        def work(cur: Cur) -> None:
            cur.execute(SQL_DISCARD_OTP, (id_hmac, transaction_id))

        self._run(work, write=True)

    def claim_otp_attempt(self, id_hmac: bytes, partner_id: str, now: datetime) -> OtpRecord | None:
        def work(cur: Cur) -> TupleRow | None:
            cur.execute(SQL_CLAIM_OTP_ATTEMPT, (id_hmac, partner_id, _utc(now)))
            return cur.fetchone()

        row = self._run(work, write=True)
        if row is None:
            return None
        transaction_id, otp_hmac, created_at, expires_at, attempts, max_attempts = row
        return OtpRecord(
            transaction_id=transaction_id,
            id_hmac=id_hmac,
            partner_id=partner_id,
            otp_hmac=otp_hmac,
            created_at=_utc(created_at),
            expires_at=_utc(expires_at),
            max_attempts=max_attempts,
            attempts=attempts,
        )

    def otp_state(self, transaction_id: str) -> tuple[str, int] | None:
        rows = self._read(SQL_OTP_STATE, (transaction_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    # -- bindings -------------------------------------------------------------------------

    def key_owner(self, key_fingerprint: str) -> bytes | None:
        """The ID-HMAC that claimed the wallet key, if any (admin and tests)."""
        rows = self._read(SQL_KEY_OWNER, (key_fingerprint,))
        return bytes(rows[0][0]) if rows else None

    @staticmethod
    def _consume_otp(cur: Cur, id_hmac: bytes, otp: str | None) -> None:
        # Scoped to the individual as well as the id: on a distributed database that names the shard, and
        # nobody can spend another individual's OTP.
        if otp is not None:
            cur.execute(SQL_CONSUME_OTP, (id_hmac, otp))
            if cur.rowcount != 1:
                raise OtpAlreadyUsed(otp)

    def claim_key(self, key_fingerprint: str, id_hmac: bytes, now: datetime) -> None:
        def work(cur: Cur) -> bytes | None:
            # One autocommitted INSERT: a concurrent claim of the same key waits for it, then does nothing.
            cur.execute(SQL_CLAIM_KEY, (key_fingerprint, id_hmac, _utc(now)))
            if cur.rowcount == 1:
                return id_hmac
            cur.execute(SQL_KEY_OWNER, (key_fingerprint,))
            row = cur.fetchone()
            return None if row is None else bytes(row[0])

        owner = self._run(work, write=False)
        if owner is None:
            # Keys are never deleted, so this cannot happen; if it does, a retry decides afresh.
            raise StoreUnavailable("the wallet key changed during the binding; retry")
        if owner != id_hmac:
            raise KeyOwnedByOther(key_fingerprint)

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
        b = binding
        if audit is not None and audit.chain_key != b.id_hmac:
            raise ValueError("a binding's audit entry belongs to the individual's own chain")
        params = (
            *(b.id_hmac, b.partner_id, b.auth_factor_type, b.psut, b.key_fingerprint, b.certificate_pem),
            *(b.cert_thumbprint, b.serial_hex, b.issuer_key_label, _utc(b.created_at), _utc(b.expires_at)),
            *(_utc(now), LOCK_NAMESPACE, _lock_key(b.id_hmac), consume_otp, consume_nonce),
            *(
                (_utc(audit.at), audit.partner_id, audit.action, audit.outcome, audit.reason, audit.subject)
                if audit is not None
                else (None,) * 6
            ),
            audit.payload() if audit is not None else None,
            GENESIS,
            # In the binding's own transaction: a success costs no extra one (server.limits.release).
            _utc(release.window_start) if release is not None and release.window_start is not None else None,
        )

        def work(cur: Cur) -> None:
            cur.execute(SQL_COMMIT_BINDING, params)

        try:
            self._run(work, write=True, one_statement=True)
        except psycopg.DatabaseError as err:
            if err.sqlstate == SQLSTATE_OTP_USED:
                raise OtpAlreadyUsed(consume_otp) from err
            if err.sqlstate == SQLSTATE_NONCE_USED:
                raise OtpAlreadyUsed(consume_nonce) from err
            raise

    def bindings_for(self, id_hmac: bytes, partner_id: str) -> Sequence[Binding]:
        return [_binding(r) for r in self._read(SQL_BINDINGS_FOR, (id_hmac, partner_id))]

    def active_binding(self, id_hmac: bytes, partner_id: str, factor: str) -> Binding | None:
        rows = self._read(SQL_ACTIVE_BINDING, (id_hmac, partner_id, factor))
        return _binding(rows[0]) if rows else None

    def binding_by_thumbprint(self, thumbprint: str) -> Binding | None:
        rows = self._read(SQL_BINDING_BY_THUMBPRINT, (thumbprint,))
        return _binding(rows[0]) if rows else None

    def binding_of(self, id_hmac: bytes, thumbprint: str) -> Binding | None:
        rows = self._read(SQL_BINDING_OF, (id_hmac, thumbprint))
        return _binding(rows[0]) if rows else None

    def latest_binding_by_psut(self, psut: str, partner_id: str, factor: str) -> Binding | None:
        rows = self._read(SQL_LATEST_BINDING_BY_PSUT, (psut, partner_id, factor))
        return _binding(rows[0]) if rows else None

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
        def work(cur: Cur) -> TupleRow | None:
            self._lock_individual(cur, id_hmac)
            cur.execute(SQL_REVOKE_ACTIVE, (_utc(now), reason, id_hmac, partner_id, factor))
            row = cur.fetchone()
            if row is None:
                return None  # nothing changed; the OTP stays usable
            self._consume_otp(cur, id_hmac, consume_otp)
            if audit is not None:
                self._append_audit(cur, audit)
            return row

        row = self._run(work, write=True)
        return _binding(row) if row is not None else None

    # -- WLA replay cache and PoP nonces --------------------------------------------------

    def claim_jti(
        self, id_hmac: bytes, jti: str, expires_at: datetime, now: datetime, *, audit: AuditEvent | None = None
    ) -> bool:
        def work(cur: Cur) -> bool:
            if audit is not None:
                self._lock_individual(cur, id_hmac)  # the audit chain's writers queue
            cur.execute(SQL_PURGE_JTIS, (id_hmac, id_hmac, _utc(now)))
            cur.execute(SQL_CLAIM_JTI, (id_hmac, jti, _utc(expires_at)))
            if cur.rowcount != 1:
                return False
            if audit is not None:
                self._append_audit(cur, audit)
            return True

        return self._run(work, write=True)

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
        def work(cur: Cur) -> None:
            if limit is not None and now is not None:
                self._lock_individual(cur, id_hmac)
                cur.execute(SQL_COUNT_INDIVIDUAL_NONCE, (id_hmac, _utc(now), *_window_params(now, limit)))
                wait = _refused_for(cur.fetchone(), now, limit)
                if wait:
                    raise RateLimited(wait)  # rolls the count back: nothing is written
            cur.execute(SQL_CREATE_NONCE, (nonce, id_hmac, partner_id, _utc(expires_at)))

        # A duplicate nonce is the caller's error (as SQLite's IntegrityError), not a race to retry.
        self._run(work, write=True, retry_conflict=False)

    def nonce_usable(self, nonce: str, id_hmac: bytes, partner_id: str, now: datetime) -> bool:
        return bool(self._read(SQL_NONCE_USABLE, (id_hmac, nonce, partner_id, _utc(now))))

    def count_rows(self, table: str) -> int:
        sql = COUNT_SQL.get(table)
        if sql is None:
            raise ValueError(table)
        return int(self._read(sql, ())[0][0])

    # -- issuers --------------------------------------------------------------------------

    def add_issuer(self, issuer: IssuerRecord) -> None:
        def work(cur: Cur) -> None:
            cur.execute(
                SQL_ADD_ISSUER,
                (
                    issuer.key_label,
                    issuer.key_kind,
                    issuer.certificate_pem,
                    issuer.chain_pem,
                    _utc(issuer.not_before or issuer.created_at),
                    _utc(issuer.not_after),
                    _utc(issuer.created_at),
                ),
            )

        # A duplicate label is the caller's error (as SQLite's IntegrityError), not a race to retry.
        self._run(work, write=True, retry_conflict=False)

    def issuers(self) -> Sequence[IssuerRecord]:
        return [
            IssuerRecord(
                key_label=label,
                key_kind=kind,
                certificate_pem=pem,
                not_after=_utc(not_after),
                created_at=_utc(created_at),
                not_before=_utc(not_before),
                chain_pem=chain,
            )
            for label, kind, pem, not_after, created_at, not_before, chain in self._read(SQL_ISSUERS, ())
        ]

    # -- abuse limits and audit trail (LimitStore, AuditLog) -------------------------------
    # Every transaction here touches one key: an individual's id_hmac (limits, and its audit chain, under
    # its advisory lock), one partner's counter, or one partner/admin audit chain.

    def identity_and_lock(self, id_hmac: bytes) -> tuple[Identity | None, datetime | None]:
        rows = self._read(SQL_IDENTITY_AND_LOCK, (id_hmac,))
        if not rows:
            # Unknown individuals are locked out like known ones; this second query is their path only.
            locks = self._read(SQL_LOCKED_UNTIL, (id_hmac,))
            return None, _opt_utc(locks[0][0]) if locks else None
        email, phone, name, pin_hmac, locked_until = rows[0]
        return Identity(id_hmac, email, phone, name, pin_hmac), _opt_utc(locked_until)

    def count_partner_otp_send(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        def work(cur: Cur) -> TupleRow | None:
            cur.execute(SQL_COUNT_PARTNER_SEND, (partner_id, _utc(now), *_window_params(now, rule)))
            return cur.fetchone()

        return _refused_for(self._run(work, write=True), now, rule)

    @staticmethod
    def _count_otp_send(cur: Cur, id_hmac: bytes, now: datetime, rule: RateRule) -> None:
        cur.execute(SQL_COUNT_INDIVIDUAL_SEND, (id_hmac, _utc(now), *_window_params(now, rule)))
        wait = _refused_for(cur.fetchone(), now, rule)
        if wait:
            raise RateLimited(wait)  # rolls the count back with the rest of the transaction

    @staticmethod
    def _failure_state(cur: Cur, id_hmac: bytes) -> FailureState:
        cur.execute(SQL_FAILURE_STATE, (id_hmac,))
        row = cur.fetchone()
        return FailureState(Window(_opt_utc(row[0]), row[1]), _opt_utc(row[2])) if row is not None else FailureState()

    @staticmethod
    def _save_failure_state(cur: Cur, id_hmac: bytes, new: FailureState) -> None:
        cur.execute(SQL_SAVE_FAILURE_STATE, (id_hmac, new.window.start, new.window.count, new.locked_until))

    def reserve_attempt(self, id_hmac: bytes, now: datetime, limits: Limits) -> tuple[Identity | None, Reservation]:
        def work(cur: Cur) -> tuple[TupleRow | None, Reservation]:
            # The individual's lock makes the check and the count one step for every replica.
            cur.execute(SQL_RESERVE_NOT_DURABLE)
            self._lock_individual(cur, id_hmac)
            cur.execute(SQL_RESERVE_IDENTITY, (id_hmac,))
            found = cur.fetchone()
            state = self._failure_state(cur, id_hmac)
            new, reservation = reserve(state, now, limits)
            if new != state:
                self._save_failure_state(cur, id_hmac, new)
            return found, reservation

        found, reservation = self._run(work, write=True)
        identity = Identity(id_hmac, found[0], found[1], found[2], found[3]) if found is not None else None
        return identity, reservation

    def release_attempt(self, id_hmac: bytes, reservation: Reservation) -> None:
        if reservation.window_start is None:
            return

        def work(cur: Cur) -> None:
            self._lock_individual(cur, id_hmac)
            self._release(cur, id_hmac, reservation)

        self._run(work, write=True)

    @classmethod
    def _release(cls, cur: Cur, id_hmac: bytes, reservation: Reservation) -> None:
        if reservation.window_start is None:
            return
        state = cls._failure_state(cur, id_hmac)
        new = release(state, reservation)
        if new != state:
            cls._save_failure_state(cur, id_hmac, new)

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
        def work(cur: Cur) -> FailureState:
            self._lock_individual(cur, id_hmac)
            state = self._failure_state(cur, id_hmac)
            new = (
                after_failure(state, now, limits)
                if reservation is None
                else after_reserved_failure(state, now, limits, reservation)
            )
            if new != state:
                self._save_failure_state(cur, id_hmac, new)
            self._append_audit(cur, audit)
            if new.locked_until != state.locked_until:
                self._append_audit(cur, lockout_audit)
            return new

        return self._run(work, write=True)

    def failure_budget(self, partner_id: str) -> tuple[Window, Window]:
        """The partner's and everyone's failed-challenge windows, as stored."""
        rows = self._read(SQL_FAILURE_BUDGET, (SCOPE_AUTH_FAILURES, partner_id, GLOBAL_KEY))
        windows = {key: Window(_utc(start), count) for key, start, count in rows}
        return windows.get(partner_id, Window()), windows.get(GLOBAL_KEY, Window())

    def count_failure_budget(self, partner_id: str, now: datetime, limits: Limits) -> None:
        """Count one failed challenge against the partner's budget and everyone's (one statement each)."""
        for key, rule in ((partner_id, limits.auth_failures_per_partner), (GLOBAL_KEY, limits.auth_failures_global)):

            def work(cur: Cur, key: str = key, rule: RateRule = rule) -> None:
                cur.execute(SQL_COUNT_WINDOW, (SCOPE_AUTH_FAILURES, key, _utc(now), *_window_params(now, rule)))

            self._run(work, write=False)

    def count_partner_nonce(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        def work(cur: Cur) -> TupleRow | None:
            cur.execute(SQL_COUNT_WINDOW, (SCOPE_NONCES, partner_id, _utc(now), *_window_params(now, rule)))
            return cur.fetchone()

        return _refused_for(self._run(work, write=False), now, rule)

    def purge_expired(self, now: datetime, limits: Limits, batch: int) -> dict[str, int]:
        """Delete up to ``batch`` expired rows of each kind, oldest first, one statement each."""
        longest = max(
            r.window_seconds
            for r in (
                limits.otp_sends_per_individual,
                limits.otp_sends_per_partner,
                limits.auth_failures,
                limits.auth_failures_per_partner,
                limits.auth_failures_global,
                limits.nonces_per_partner,
                limits.nonces_per_individual,
            )
        )
        cut = _utc(now - timedelta(seconds=longest))
        done: dict[str, int] = {}
        for table, sql, params in (
            ("otps", SQL_PURGE_EXPIRED_OTPS, (_utc(now), batch)),
            ("wla_jtis", SQL_PURGE_EXPIRED_JTIS, (_utc(now), batch)),
            ("binding_nonces", SQL_PURGE_EXPIRED_NONCES, (_utc(now), batch)),
            ("limit_windows", SQL_PURGE_WINDOWS, (cut, batch)),
            ("partner_limits", SQL_PURGE_PARTNER_LIMITS, (cut, batch)),
            ("individual_limits", SQL_PURGE_INDIVIDUAL_LIMITS, {"now": _utc(now), "cut": cut, "n": batch}),
        ):

            def work(cur: Cur, sql: str = sql, params: Any = params) -> int:
                cur.execute(sql, params)
                return cur.rowcount

            done[table] = self._run(work, write=False)
        return done

    # -- signed audit chain heads (server/audit.py) ---------------------------------------

    def chain_heads_after(self, row_id: int, limit: int) -> tuple[list[tuple[bytes, int, bytes]], int]:
        """The newest (chain_key, seq, hash) of each chain among the ``limit`` entries after id ``row_id``, and
        the highest id read."""
        heads: dict[bytes, tuple[int, bytes]] = {}
        last = row_id
        for entry_id, chain_key, seq, hash_ in self._read(SQL_AUDIT_AFTER, (row_id, limit)):
            key = bytes(chain_key)
            if key not in heads or seq > heads[key][0]:
                heads[key] = (seq, bytes(hash_))
            last = max(last, entry_id)
        return [(k, seq, h) for k, (seq, h) in heads.items()], last

    def save_audit_heads(self, heads: Sequence[SignedHead]) -> None:
        """Record signed heads; a head never moves back (an older signature never replaces a newer one)."""
        for h in heads:

            def work(cur: Cur, h: SignedHead = h) -> None:
                cur.execute(SQL_SAVE_AUDIT_HEAD, (h.chain_key, h.seq, h.hash, _utc(h.signed_at), h.mac))

            self._run(work, write=False)

    def audit_heads(self) -> Sequence[SignedHead]:
        return [
            SignedHead(bytes(k), seq, bytes(h), _utc(at), bytes(mac))
            for k, seq, h, at, mac in self._read(SQL_AUDIT_HEADS, ())
        ]

    @staticmethod
    def _append_audit(cur: Cur, event: AuditEvent) -> None:
        cur.execute(
            SQL_APPEND_AUDIT,
            {
                "key": event.chain_key,
                "at": _utc(event.at),
                "partner": event.partner_id,
                "action": event.action,
                "outcome": event.outcome,
                "reason": event.reason,
                "subject": event.subject,
                "payload": event.payload(),
                "genesis": GENESIS,
            },
        )

    def append_audit(self, event: AuditEvent) -> None:
        def work(cur: Cur) -> None:
            if event.per_individual:
                self._lock_individual(cur, event.chain_key)
            else:
                cur.execute(SQL_LOCK_INDIVIDUAL, (AUDIT_LOCK_NAMESPACE, _chain_lock_key(event.chain_key)))
            self._append_audit(cur, event)

        self._run(work, write=True)

    def audit_rows(self, after: tuple[bytes, int] | None, limit: int) -> Sequence[AuditRow]:
        key, seq = after if after is not None else (b"", 0)
        rows = self._read(SQL_AUDIT_PAGE, (key, seq, limit))
        return [
            AuditRow(r[0], bytes(r[1]), r[2], _utc(r[3]), r[4], r[5], r[6], r[7], r[8], bytes(r[9]), bytes(r[10]))
            for r in rows
        ]

    # -- partners (PartnerStore; the sec-auth change) -------------------------------------

    def add_partner(self, partner: Partner) -> bool:
        p = partner

        def work(cur: Cur) -> bool:
            cur.execute(
                SQL_ADD_PARTNER,
                (p.partner_id, p.api_key_hash, p.enabled, p.client_cert_sha256, _utc(p.created_at), _utc(p.updated_at)),
            )
            return cur.rowcount == 1

        try:
            return self._run(work, write=True, retry_conflict=False)
        except pg_errors.UniqueViolation as err:  # the only other unique column: the certificate
            raise PartnerCertificateInUse("the client certificate is registered to another partner") from err

    def get_partner(self, partner_id: str) -> Partner | None:
        rows = self._read(SQL_GET_PARTNER, (partner_id,))
        return _partner(rows[0]) if rows else None

    def partner_by_certificate(self, fingerprint: str) -> Partner | None:
        rows = self._read(SQL_PARTNER_BY_CERTIFICATE, (fingerprint,))
        return _partner(rows[0]) if rows else None

    def list_partners(self) -> Sequence[Partner]:
        return [_partner(r) for r in self._read(SQL_LIST_PARTNERS, ())]

    def _update_partner(self, sql: str, params: tuple[object, ...]) -> bool:
        def work(cur: Cur) -> bool:
            cur.execute(sql, params)
            return cur.rowcount == 1

        try:
            return self._run(work, write=True, retry_conflict=False)
        except pg_errors.UniqueViolation as err:
            raise PartnerCertificateInUse("the client certificate is registered to another partner") from err

    def set_partner_enabled(self, partner_id: str, enabled: bool, now: datetime) -> bool:
        return self._update_partner(SQL_SET_PARTNER_ENABLED, (enabled, _utc(now), partner_id))

    def set_partner_key(self, partner_id: str, api_key_hash: bytes, now: datetime) -> bool:
        return self._update_partner(SQL_SET_PARTNER_KEY, (api_key_hash, _utc(now), partner_id))

    def set_partner_certificate(self, partner_id: str, fingerprint: str | None, now: datetime) -> bool:
        return self._update_partner(SQL_SET_PARTNER_CERTIFICATE, (fingerprint, _utc(now), partner_id))

    # -- issuer lifecycle (keys rotate / import-cert) -----------------------------------

    def add_pending_issuer(self, pending: PendingIssuer) -> None:
        def work(cur: Cur) -> None:
            cur.execute(
                SQL_ADD_PENDING_ISSUER,
                (pending.key_label, pending.key_kind, pending.csr_pem, _utc(pending.created_at)),
            )

        self._run(work, write=True, retry_conflict=False)

    def pending_issuers(self) -> Sequence[PendingIssuer]:
        return [
            PendingIssuer(label, kind, csr, _utc(created_at))
            for label, kind, csr, created_at in self._read(SQL_PENDING_ISSUERS, ())
        ]

    def install_issuer(self, issuer: IssuerRecord) -> bool:
        def work(cur: Cur) -> bool:
            cur.execute(
                SQL_INSTALL_ISSUER,
                (
                    issuer.certificate_pem,
                    issuer.chain_pem,
                    _utc(issuer.not_before or issuer.created_at),
                    _utc(issuer.not_after),
                    issuer.key_label,
                ),
            )
            return cur.rowcount == 1

        return self._run(work, write=True, retry_conflict=False)

    # -- aliases (AliasStore) ---------------------------------------------------------------

    def resolve_individual(self, id_hmac: bytes, now: datetime) -> bytes | None:
        rows = self._read(SQL_RESOLVE_INDIVIDUAL, (id_hmac, id_hmac, now))
        return bytes(rows[0][0]) if rows else None

    def add_alias(self, alias: Alias) -> None:
        a = alias

        def work(cur: Cur) -> TupleRow | None:
            cur.execute(SQL_UPSERT_ALIAS, (a.alias_hmac, a.id_hmac, a.alias_type, a.created_at, a.expires_at))
            return cur.fetchone()

        if self._run(work, write=True) is None:
            raise AliasConflict("the alias is registered to another individual or was revoked")

    def revoke_alias(self, alias_hmac: bytes, now: datetime) -> bool:
        def work(cur: Cur) -> bool:
            cur.execute(SQL_REVOKE_ALIAS, (now, alias_hmac))
            return cur.rowcount == 1

        return self._run(work, write=True)

    def aliases_of(self, id_hmac: bytes) -> Sequence[Alias]:
        rows = self._read(SQL_ALIASES_OF, (id_hmac,))
        return [Alias(bytes(r[0]), bytes(r[1]), r[2], _utc(r[3]), _opt_utc(r[4]), _opt_utc(r[5])) for r in rows]

    def partner_psut(self, id_hmac: bytes, partner_id: str) -> str | None:
        rows = self._read(SQL_PARTNER_PSUT, (id_hmac, partner_id))
        return str(rows[0][0]) if rows else None


def _chain_lock_key(chain_key: bytes) -> int:
    """The advisory lock key of a partner or admin audit chain."""
    return int.from_bytes(hashlib.sha256(chain_key).digest()[:4], "big", signed=True)


class _RollBack(Exception):
    """Raised inside a transaction to roll it back (the health probe's write)."""


def _opt_utc(value: datetime | None) -> datetime | None:
    return _utc(value) if value is not None else None


def _window_params(now: datetime, rule: RateRule) -> tuple[datetime, datetime, datetime, datetime, int]:
    """(expired, ahead, expired, ahead, limit): see the SQLite store's, the same rule."""
    expired, ahead = _utc(now - rule.window), _utc(now + timedelta(seconds=WINDOW_SKEW_SECONDS))
    return expired, ahead, expired, ahead, rule.limit


def _refused_for(row: Sequence[Any] | None, now: datetime, rule: RateRule) -> int:
    """0 when the counted send is within the limit, else the seconds until its window ends."""
    assert row is not None
    start, count = row
    return seconds_until(_utc(start) + rule.window, now) if count > rule.limit else 0


def _partner(r: Sequence[Any]) -> Partner:
    partner_id, api_key_hash, enabled, client_cert_sha256, created_at, updated_at = r
    return Partner(
        partner_id=partner_id,
        api_key_hash=bytes(api_key_hash),
        enabled=bool(enabled),
        client_cert_sha256=client_cert_sha256,
        created_at=_utc(created_at),
        updated_at=_utc(updated_at),
    )


def _binding(r: Sequence[Any]) -> Binding:
    (
        id_hmac,
        partner_id,
        factor,
        psut,
        key_fingerprint,
        certificate_pem,
        cert_thumbprint,
        serial_hex,
        issuer_key_label,
        created_at,
        expires_at,
        status,
        superseded_at,
        revoked_at,
        revocation_reason,
    ) = r
    return Binding(
        id_hmac=bytes(id_hmac),
        partner_id=partner_id,
        auth_factor_type=factor,
        psut=psut,
        key_fingerprint=key_fingerprint,
        certificate_pem=certificate_pem,
        cert_thumbprint=cert_thumbprint,
        serial_hex=serial_hex,
        issuer_key_label=issuer_key_label,
        created_at=_utc(created_at),
        expires_at=_utc(expires_at),
        status=BindingStatus(status),
        superseded_at=_utc(superseded_at) if superseded_at is not None else None,
        revoked_at=_utc(revoked_at) if revoked_at is not None else None,
        revocation_reason=revocation_reason,
    )
