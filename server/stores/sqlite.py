"""SQLite backend of every store port (`server.stores.Store`): the embedded default."""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from yoyo import get_backend, read_migrations

from server.aliases import Alias, AliasConflict
from server.audit import GENESIS, AuditEvent, AuditRow, SignedHead, link_hash
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

BUSY_TIMEOUT_SECONDS = 5.0
TABLES = frozenset(
    {"individuals", "otps", "bindings", "wallet_keys", "issuers", "wla_jtis", "binding_nonces"}
    | {"individual_limits", "partner_limits", "audit_log", "partners", "kbi_answers", "individual_aliases"}
    | {"limit_windows", "audit_heads"}
)


def ts(value: datetime) -> str:
    """Fixed-width UTC text, so that SQL compares times as strings correctly."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: every time in KeyBinder is tz-aware UTC")
    # isoformat: the same text as strftime("%Y-%m-%dT%H:%M:%S.%fZ") for years 1000-9999, a tenth of the cost.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def migrations_dir() -> str:
    return str(Path(__file__).resolve().parent.parent / "migrations" / "sqlite")


def migrate(path: Path) -> int:
    """Apply pending schema migrations; returns how many were applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = get_backend(f"sqlite:///{path}")
    migrations = read_migrations(migrations_dir())
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    # WAL is a property of the file, set once here: switching it per connection needs an exclusive
    # lock that SQLite does not wait for, so connections opened at the same moment failed with "locked".
    with sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return len(pending)


def pending_migrations(path: Path) -> int:
    """Migrations not yet applied to an existing database file (never creates one)."""
    if not path.is_file():
        raise FileNotFoundError(f"the database {path} does not exist")
    backend = get_backend(f"sqlite:///{path}")
    try:
        return len(backend.to_apply(read_migrations(migrations_dir())))
    finally:
        backend.connection.close()


class SqliteStore:
    """Implements IdentityStore, OtpStore, BindingStore and IssuerStore on one SQLite file.

    One connection per thread; writes take the database lock up front (BEGIN IMMEDIATE) so a
    transaction never fails half-way on a lock upgrade, and several processes can share the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._write_lock = threading.Lock()
        #: Bumped after a failed write: every thread then opens a new connection before its next statement.
        self._generation = 0

    # -- connections ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", 0) != self._generation:
            self._drop(conn)
            conn = None
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # The audit INSERT computes the entry's hash in the statement (see SQL_APPEND_AUDIT).
                conn.create_function("kb_link_hash", 3, _sql_link_hash, deterministic=True)
            except sqlite3.Error as err:
                raise StoreUnavailable(f"cannot open the database: {err}") from err
            self._local.conn = conn
            self._local.generation = self._generation
            with self._guard:
                self._all.append(conn)
        return conn

    def _drop(self, conn: sqlite3.Connection) -> None:
        self._local.conn = None
        with self._guard:
            if conn in self._all:
                self._all.remove(conn)
        with suppress(sqlite3.Error):
            conn.close()

    def _reopen_all(self) -> None:
        """After a failed write, open fresh connections: SQLite opens a file it cannot write (an immutable or
        read-only file, a read-only mount) read-only and keeps it so for the connection's life, so only a new
        connection sees the file writable again. Each thread reopens before its next statement."""
        with self._guard:
            self._generation += 1

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``durable=False`` commits without waiting for the disk (synchronous=NORMAL):
        on a power loss it may be lost, but never half-applied; only for writes whose loss is harmless."""
        conn = self._conn()
        # SQLite admits one writer at a time; threads of this process queue on a lock rather
        # than in SQLite's busy handler, whose sleeps (up to 100 ms each) make long latency tails.
        with self._write_lock:
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                yield from self._in_tx(conn)
            finally:
                if not durable:
                    with suppress(sqlite3.Error):
                        conn.execute("PRAGMA synchronous=FULL")

    def _in_tx(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                self._reopen_all()
            raise StoreUnavailable(f"database busy or unavailable: {err}") from err
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as err:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.OperationalError):
                if not _is_busy(err):
                    self._reopen_all()
                raise StoreUnavailable(f"database write failed: {err}") from err
            raise

    def _query(self, sql: str, params: Sequence[object]) -> list[sqlite3.Row]:
        conn = self._conn()
        try:
            cur = conn.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as err:
            raise StoreUnavailable(f"database query failed: {err}") from err

    def ping(self) -> None:
        self._query("SELECT 1", ())

    def check_writable(self) -> None:
        """The health probe's write: a row written and rolled back (StoreUnavailable when writes fail)."""
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(
                        "INSERT INTO limit_windows (scope, key, window_start, count) VALUES ('health', ?, ?, 0)"
                        " ON CONFLICT (scope, key) DO UPDATE SET count = count + 1",
                        (secrets.token_hex(8), ts(datetime.now(UTC))),
                    )
                finally:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as err:
                if not (isinstance(err, sqlite3.OperationalError) and _is_busy(err)):
                    self._reopen_all()
                raise StoreUnavailable(f"database write failed: {err}") from err

    def close(self) -> None:
        with self._guard:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- identities -----------------------------------------------------------------------

    def upsert_identity(self, identity: Identity, *, kbi: Mapping[str, bytes] | None = None) -> bool:
        now = ts(datetime.now(UTC))
        with self._tx() as conn:
            existed = conn.execute("SELECT 1 FROM individuals WHERE id_hmac = ?", (identity.id_hmac,)).fetchone()
            conn.execute(
                "INSERT INTO individuals (id_hmac, email, phone, name, pin_hmac, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id_hmac) DO UPDATE SET email = excluded.email, phone = excluded.phone,"
                " name = excluded.name, pin_hmac = excluded.pin_hmac, updated_at = excluded.updated_at",
                (identity.id_hmac, identity.email, identity.phone, identity.name, identity.pin_hmac, now, now),
            )
            conn.execute("DELETE FROM kbi_answers WHERE id_hmac = ?", (identity.id_hmac,))
            conn.executemany(
                "INSERT INTO kbi_answers (id_hmac, field_id, answer_hmac) VALUES (?, ?, ?)",
                [(identity.id_hmac, field_id, mac) for field_id, mac in (kbi or {}).items()],
            )
        return existed is None

    def kbi_answers(self, id_hmac: bytes) -> dict[str, bytes]:
        rows = self._query("SELECT field_id, answer_hmac FROM kbi_answers WHERE id_hmac = ?", (id_hmac,))
        return {row["field_id"]: bytes(row["answer_hmac"]) for row in rows}

    def upsert_identities(
        self,
        identities: Sequence[Identity],
        *,
        kbi: Sequence[Mapping[str, bytes] | None] = (),
        aliases: Sequence[Alias] = (),
        audit: Callable[[int, int], AuditEvent] | None = None,
    ) -> tuple[int, int]:
        """Insert or replace every identity, its KBI answers (``kbi[i]`` for ``identities[i]``; none clears
        them, as `upsert_identity`) and ``aliases`` in one transaction (all or nothing), with the audit entry
        ``audit(new, updated)`` makes; returns (new, updated). An alias another individual holds, or one that
        was revoked, raises AliasConflict and nothing is written."""
        now = ts(datetime.now(UTC))
        added = 0
        with self._tx() as conn:
            for index, identity in enumerate(identities):
                existed = conn.execute("SELECT 1 FROM individuals WHERE id_hmac = ?", (identity.id_hmac,)).fetchone()
                conn.execute(
                    "INSERT INTO individuals (id_hmac, email, phone, name, pin_hmac, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (id_hmac) DO UPDATE SET email = excluded.email, phone = excluded.phone,"
                    " name = excluded.name, pin_hmac = excluded.pin_hmac, updated_at = excluded.updated_at",
                    (identity.id_hmac, identity.email, identity.phone, identity.name, identity.pin_hmac, now, now),
                )
                added += existed is None
                answers = kbi[index] if index < len(kbi) else None
                conn.execute("DELETE FROM kbi_answers WHERE id_hmac = ?", (identity.id_hmac,))
                conn.executemany(
                    "INSERT INTO kbi_answers (id_hmac, field_id, answer_hmac) VALUES (?, ?, ?)",
                    [(identity.id_hmac, field_id, mac) for field_id, mac in (answers or {}).items()],
                )
            for alias in aliases:
                _upsert_alias(conn, alias)
            if audit is not None:
                self._append_audit(conn, audit(added, len(identities) - added))
        return added, len(identities) - added

    def get_identity(self, id_hmac: bytes) -> Identity | None:
        rows = self._query("SELECT email, phone, name, pin_hmac FROM individuals WHERE id_hmac = ?", (id_hmac,))
        if not rows:
            return None
        row = rows[0]
        return Identity(id_hmac, row["email"], row["phone"], row["name"], row["pin_hmac"])

    def count_identities(self) -> int:
        return int(self._query("SELECT count(*) AS n FROM individuals", ())[0]["n"])

    def count_active_bindings(self) -> int:
        """Every individual's active bindings (the metrics gauge; never on the request path)."""
        return int(self._query("SELECT count(*) AS n FROM bindings WHERE status = 'active'", ())[0]["n"])

    # -- OTPs -----------------------------------------------------------------------------

    def replace_otp(
        self, otp: OtpRecord, *, send_limit: RateRule | None = None, audit: AuditEvent | None = None
    ) -> None:
        with self._tx() as conn:
            if send_limit is not None:
                self._count_otp_send(conn, otp.id_hmac, otp.created_at, send_limit)
            conn.execute(
                "UPDATE otps SET state = 'replaced' WHERE id_hmac = ? AND partner_id = ? AND state = 'pending'",
                (otp.id_hmac, otp.partner_id),
            )
            conn.execute(
                "INSERT INTO otps (transaction_id, id_hmac, partner_id, otp_hmac, created_at, expires_at,"
                " attempts, max_attempts, state) VALUES (?, ?, ?, ?, ?, ?, 0, ?, 'pending')",
                (
                    otp.transaction_id,
                    otp.id_hmac,
                    otp.partner_id,
                    otp.otp_hmac,
                    ts(otp.created_at),
                    ts(otp.expires_at),
                    otp.max_attempts,
                ),
            )
            if audit is not None:
                self._append_audit(conn, audit)

    def discard_otp(self, transaction_id: str, id_hmac: bytes) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM otps WHERE id_hmac = ? AND transaction_id = ?", (id_hmac, transaction_id))

    def claim_otp_attempt(self, id_hmac: bytes, partner_id: str, now: datetime) -> OtpRecord | None:
        # One statement: the check and the increment cannot be split by a concurrent guess.
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE otps SET attempts = attempts + 1"
                " WHERE id_hmac = ? AND partner_id = ? AND state = 'pending'"
                " AND attempts < max_attempts AND expires_at > ?"
                " RETURNING transaction_id, otp_hmac, created_at, expires_at, attempts, max_attempts",
                (id_hmac, partner_id, ts(now)),
            )
            cur.row_factory = sqlite3.Row
            row = cur.fetchone()
        if row is None:
            return None
        return OtpRecord(
            transaction_id=row["transaction_id"],
            id_hmac=id_hmac,
            partner_id=partner_id,
            otp_hmac=row["otp_hmac"],
            created_at=parse_ts(row["created_at"]),
            expires_at=parse_ts(row["expires_at"]),
            max_attempts=row["max_attempts"],
            attempts=row["attempts"],
        )

    def otp_state(self, transaction_id: str) -> tuple[str, int] | None:
        rows = self._query("SELECT state, attempts FROM otps WHERE transaction_id = ?", (transaction_id,))
        return (rows[0]["state"], rows[0]["attempts"]) if rows else None

    # -- bindings -------------------------------------------------------------------------

    def key_owner(self, key_fingerprint: str) -> bytes | None:
        rows = self._query("SELECT id_hmac FROM wallet_keys WHERE key_fingerprint = ?", (key_fingerprint,))
        return bytes(rows[0]["id_hmac"]) if rows else None

    @staticmethod
    def _consume(conn: sqlite3.Connection, id_hmac: bytes, otp: str | None, nonce: str | None, now: datetime) -> None:
        # Matched by individual too: one individual's OTP or nonce can never complete another's request.
        if otp is not None:
            cur = conn.execute(
                "UPDATE otps SET state = 'used' WHERE transaction_id = ? AND id_hmac = ? AND state = 'pending'",
                (otp, id_hmac),
            )
            if cur.rowcount != 1:
                raise OtpAlreadyUsed(otp)
        if nonce is not None:
            cur = conn.execute(
                "UPDATE binding_nonces SET used_at = ?"
                " WHERE nonce = ? AND id_hmac = ? AND used_at IS NULL AND expires_at > ?",
                (ts(now), nonce, id_hmac, ts(now)),
            )
            if cur.rowcount != 1:
                raise OtpAlreadyUsed(nonce)

    def claim_key(self, key_fingerprint: str, id_hmac: bytes, now: datetime) -> None:
        # Its own transaction, as in the PostgreSQL store (where it keeps the binding on one shard).
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO wallet_keys (key_fingerprint, id_hmac, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key_fingerprint) DO NOTHING",
                (key_fingerprint, id_hmac, ts(now)),
            )
            owner = conn.execute(
                "SELECT id_hmac FROM wallet_keys WHERE key_fingerprint = ?", (key_fingerprint,)
            ).fetchone()
        if owner is None or bytes(owner[0]) != id_hmac:
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
        with self._tx() as conn:
            self._consume(conn, binding.id_hmac, consume_otp, consume_nonce, now)
            if release is not None:  # in this transaction: a success costs no extra commit
                self._release(conn, binding.id_hmac, release)
            conn.execute(
                "UPDATE bindings SET status = 'superseded', superseded_at = ?"
                " WHERE id_hmac = ? AND partner_id = ? AND auth_factor_type = ? AND status = 'active'",
                (ts(now), binding.id_hmac, binding.partner_id, binding.auth_factor_type),
            )
            conn.execute(
                "INSERT INTO bindings (id_hmac, partner_id, auth_factor_type, psut, key_fingerprint,"
                " certificate_pem, cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?)",
                (
                    binding.id_hmac,
                    binding.partner_id,
                    binding.auth_factor_type,
                    binding.psut,
                    binding.key_fingerprint,
                    binding.certificate_pem,
                    binding.cert_thumbprint,
                    binding.serial_hex,
                    binding.issuer_key_label,
                    ts(binding.created_at),
                    ts(binding.expires_at),
                ),
            )
            if audit is not None:
                self._append_audit(conn, audit)

    def bindings_for(self, id_hmac: bytes, partner_id: str) -> Sequence[Binding]:
        rows = self._query(
            "SELECT * FROM bindings WHERE id_hmac = ? AND partner_id = ? ORDER BY id", (id_hmac, partner_id)
        )
        return [_binding(r) for r in rows]

    def active_binding(self, id_hmac: bytes, partner_id: str, factor: str) -> Binding | None:
        rows = self._query(
            "SELECT * FROM bindings"
            " WHERE id_hmac = ? AND partner_id = ? AND auth_factor_type = ? AND status = 'active'",
            (id_hmac, partner_id, factor),
        )
        return _binding(rows[0]) if rows else None

    def binding_by_thumbprint(self, thumbprint: str) -> Binding | None:
        rows = self._query("SELECT * FROM bindings WHERE cert_thumbprint = ?", (thumbprint,))
        return _binding(rows[0]) if rows else None

    def binding_of(self, id_hmac: bytes, thumbprint: str) -> Binding | None:
        rows = self._query("SELECT * FROM bindings WHERE id_hmac = ? AND cert_thumbprint = ?", (id_hmac, thumbprint))
        return _binding(rows[0]) if rows else None

    def latest_binding_by_psut(self, psut: str, partner_id: str, factor: str) -> Binding | None:
        rows = self._query(
            "SELECT * FROM bindings WHERE psut = ? AND partner_id = ? AND auth_factor_type = ?"
            " ORDER BY status = 'active' DESC, id DESC LIMIT 1",
            (psut, partner_id, factor),
        )
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
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE bindings SET status = 'revoked', revoked_at = ?, revocation_reason = ?"
                " WHERE id_hmac = ? AND partner_id = ? AND auth_factor_type = ? AND status = 'active'"
                " RETURNING *",
                (ts(now), reason, id_hmac, partner_id, factor),
            )
            cur.row_factory = sqlite3.Row
            row = cur.fetchone()
            if row is None:
                return None  # nothing changed; the OTP stays usable
            self._consume(conn, id_hmac, consume_otp, None, now)
            if audit is not None:
                self._append_audit(conn, audit)
        return _binding(row)

    # -- WLA replay cache and PoP nonces --------------------------------------------------

    def claim_jti(
        self, id_hmac: bytes, jti: str, expires_at: datetime, now: datetime, *, audit: AuditEvent | None = None
    ) -> bool:
        with self._tx() as conn:
            # Expired entries of this individual can go: their tokens fail the exp check anyway.
            conn.execute("DELETE FROM wla_jtis WHERE id_hmac = ? AND expires_at <= ?", (id_hmac, ts(now)))
            cur = conn.execute(
                "INSERT INTO wla_jtis (id_hmac, jti, expires_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (id_hmac, jti, ts(expires_at)),
            )
            if cur.rowcount != 1:
                return False
            if audit is not None:
                self._append_audit(conn, audit)
            return True

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
        with self._tx() as conn:
            if limit is not None and now is not None:
                row = conn.execute(
                    SQL_COUNT_INDIVIDUAL_NONCE, (id_hmac, ts(now), *_window_params(now, limit))
                ).fetchone()
                wait = _refused_for(row, now, limit)
                if wait:
                    raise RateLimited(wait)  # rolls the count back: nothing is written
            conn.execute(
                "INSERT INTO binding_nonces (nonce, id_hmac, partner_id, expires_at) VALUES (?, ?, ?, ?)",
                (nonce, id_hmac, partner_id, ts(expires_at)),
            )

    def nonce_usable(self, nonce: str, id_hmac: bytes, partner_id: str, now: datetime) -> bool:
        rows = self._query(
            "SELECT 1 FROM binding_nonces WHERE nonce = ? AND id_hmac = ? AND partner_id = ?"
            " AND used_at IS NULL AND expires_at > ?",
            (nonce, id_hmac, partner_id, ts(now)),
        )
        return bool(rows)

    def count_rows(self, table: str) -> int:
        if table not in TABLES:
            raise ValueError(table)
        return int(self._query(f"SELECT count(*) AS n FROM {table}", ())[0]["n"])  # noqa: S608

    # -- issuers --------------------------------------------------------------------------

    def add_issuer(self, issuer: IssuerRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO issuers (key_label, key_kind, state, certificate_pem, chain_pem, not_before, not_after,"
                " created_at) VALUES (?, ?, 'installed', ?, ?, ?, ?, ?)",
                (
                    issuer.key_label,
                    issuer.key_kind,
                    issuer.certificate_pem,
                    issuer.chain_pem,
                    ts(issuer.not_before or issuer.created_at),
                    ts(issuer.not_after),
                    ts(issuer.created_at),
                ),
            )

    def issuers(self) -> Sequence[IssuerRecord]:
        rows = self._query("SELECT * FROM issuers WHERE state = 'installed' ORDER BY created_at DESC", ())
        return [
            IssuerRecord(
                key_label=r["key_label"],
                key_kind=r["key_kind"],
                certificate_pem=r["certificate_pem"],
                not_after=parse_ts(r["not_after"]),
                created_at=parse_ts(r["created_at"]),
                not_before=parse_ts(r["not_before"]),
                chain_pem=r["chain_pem"],
            )
            for r in rows
        ]

    # -- abuse limits and audit trail (LimitStore, AuditLog) -------------------------------
    # Per-individual rows are keyed by id_hmac; the partner counter by partner_id, in a transaction of its
    # own. Send counters are one statement each (the window rule of server.limits, in SQL); failures, a
    # rare path, are read and written under the write lock with server.limits.after_failure.

    def identity_and_lock(self, id_hmac: bytes) -> tuple[Identity | None, datetime | None]:
        rows = self._query(SQL_IDENTITY_AND_LOCK, (id_hmac,))
        if not rows:
            locks = self._query("SELECT locked_until FROM individual_limits WHERE id_hmac = ?", (id_hmac,))
            return None, _opt_ts(locks[0]["locked_until"]) if locks else None
        row = rows[0]
        return Identity(id_hmac, row["email"], row["phone"], row["name"], row["pin_hmac"]), _opt_ts(row["locked_until"])

    def count_partner_otp_send(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        with self._tx() as conn:
            row = conn.execute(SQL_COUNT_PARTNER_SEND, (partner_id, ts(now), *_window_params(now, rule))).fetchone()
        return _refused_for(row, now, rule)

    @staticmethod
    def _count_otp_send(conn: sqlite3.Connection, id_hmac: bytes, now: datetime, rule: RateRule) -> None:
        row = conn.execute(SQL_COUNT_INDIVIDUAL_SEND, (id_hmac, ts(now), *_window_params(now, rule))).fetchone()
        wait = _refused_for(row, now, rule)
        if wait:
            raise RateLimited(wait)  # rolls the count back with the rest of the transaction

    @staticmethod
    def _failure_state(conn: sqlite3.Connection, id_hmac: bytes) -> FailureState:
        row = conn.execute(
            "SELECT fail_window_start, failures, locked_until FROM individual_limits WHERE id_hmac = ?", (id_hmac,)
        ).fetchone()
        return FailureState(Window(_opt_ts(row[0]), row[1]), _opt_ts(row[2])) if row is not None else FailureState()

    @staticmethod
    def _save_failure_state(conn: sqlite3.Connection, id_hmac: bytes, new: FailureState) -> None:
        conn.execute(
            "INSERT INTO individual_limits (id_hmac, fail_window_start, failures, locked_until) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id_hmac) DO UPDATE SET fail_window_start = excluded.fail_window_start,"
            " failures = excluded.failures, locked_until = excluded.locked_until",
            (id_hmac, _opt_text(new.window.start), new.window.count, _opt_text(new.locked_until)),
        )

    def reserve_attempt(self, id_hmac: bytes, now: datetime, limits: Limits) -> tuple[Identity | None, Reservation]:
        # Not waited for on disk: a reservation lost to a power cut belongs to an attempt that was never
        # answered (its failure, or the binding that gives it back, is committed durably, and with it this).
        with self._tx(durable=False) as conn:
            found = conn.execute(
                "SELECT email, phone, name, pin_hmac FROM individuals WHERE id_hmac = ?", (id_hmac,)
            ).fetchone()
            state = self._failure_state(conn, id_hmac)
            new, reservation = reserve(state, now, limits)
            if new != state:
                self._save_failure_state(conn, id_hmac, new)
        identity = Identity(id_hmac, found[0], found[1], found[2], found[3]) if found is not None else None
        return identity, reservation

    def release_attempt(self, id_hmac: bytes, reservation: Reservation) -> None:
        if reservation.window_start is None:
            return
        with self._tx() as conn:
            self._release(conn, id_hmac, reservation)

    def _release(self, conn: sqlite3.Connection, id_hmac: bytes, reservation: Reservation) -> None:
        if reservation.window_start is None:
            return
        state = self._failure_state(conn, id_hmac)
        new = release(state, reservation)
        if new != state:
            self._save_failure_state(conn, id_hmac, new)

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
        with self._tx() as conn:
            state = self._failure_state(conn, id_hmac)
            if reservation is None:
                new = after_failure(state, now, limits)
            else:
                new = after_reserved_failure(state, now, limits, reservation)
            if new != state:
                self._save_failure_state(conn, id_hmac, new)
            self._append_audit(conn, audit)
            if new.locked_until != state.locked_until:
                self._append_audit(conn, lockout_audit)
        return new

    def failure_budget(self, partner_id: str) -> tuple[Window, Window]:
        """The partner's and everyone's failed-challenge windows, as stored."""
        rows = self._query(SQL_FAILURE_BUDGET, (SCOPE_AUTH_FAILURES, partner_id, GLOBAL_KEY))
        windows = {r["key"]: Window(parse_ts(r["window_start"]), r["count"]) for r in rows}
        return windows.get(partner_id, Window()), windows.get(GLOBAL_KEY, Window())

    def count_failure_budget(self, partner_id: str, now: datetime, limits: Limits) -> None:
        """Count one failed challenge against the partner's budget and everyone's."""
        with self._tx() as conn:
            for key, rule in (
                (partner_id, limits.auth_failures_per_partner),
                (GLOBAL_KEY, limits.auth_failures_global),
            ):
                conn.execute(SQL_COUNT_WINDOW, (SCOPE_AUTH_FAILURES, key, ts(now), *_window_params(now, rule)))

    def count_partner_nonce(self, partner_id: str, now: datetime, rule: RateRule) -> int:
        with self._tx() as conn:
            row = conn.execute(
                SQL_COUNT_WINDOW, (SCOPE_NONCES, partner_id, ts(now), *_window_params(now, rule))
            ).fetchone()
        return _refused_for(row, now, rule)

    def purge_expired(self, now: datetime, limits: Limits, batch: int) -> dict[str, int]:
        """Delete up to ``batch`` expired rows of each kind, oldest first, each kind in a short transaction."""
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
        cut = ts(now - timedelta(seconds=longest))
        done: dict[str, int] = {}
        for table, sql, params in (
            ("otps", SQL_PURGE_OTPS, (ts(now), batch)),
            ("wla_jtis", SQL_PURGE_JTIS, (ts(now), batch)),
            ("binding_nonces", SQL_PURGE_NONCES, (ts(now), batch)),
            ("limit_windows", SQL_PURGE_WINDOWS, (cut, batch)),
            ("partner_limits", SQL_PURGE_PARTNER_LIMITS, (cut, batch)),
            ("individual_limits", SQL_PURGE_INDIVIDUAL_LIMITS, {"now": ts(now), "cut": cut, "n": batch}),
        ):
            with self._tx() as conn:
                done[table] = conn.execute(sql, params).rowcount
        return done

    # -- signed audit chain heads (server/audit.py) ---------------------------------------

    def chain_heads_after(self, row_id: int, limit: int) -> tuple[list[tuple[bytes, int, bytes]], int]:
        """The newest (chain_key, seq, hash) of each chain with an entry whose id is above ``row_id``, among the
        next ``limit`` entries; and the highest id seen (the caller's next ``row_id``)."""
        rows = self._query(
            "SELECT id, chain_key, seq, hash FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", (row_id, limit)
        )
        heads: dict[bytes, tuple[int, bytes]] = {}
        for r in rows:
            key = bytes(r["chain_key"])
            if key not in heads or r["seq"] > heads[key][0]:
                heads[key] = (r["seq"], bytes(r["hash"]))
        last = max((r["id"] for r in rows), default=row_id)
        return [(k, seq, h) for k, (seq, h) in heads.items()], last

    def save_audit_heads(self, heads: Sequence[SignedHead]) -> None:
        """Record signed heads; a head never moves back (an older signature never replaces a newer one)."""
        with self._tx() as conn:
            for h in heads:
                conn.execute(
                    "INSERT INTO audit_heads (chain_key, seq, hash, signed_at, mac) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (chain_key) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
                    " signed_at = excluded.signed_at, mac = excluded.mac WHERE excluded.seq >= audit_heads.seq",
                    (h.chain_key, h.seq, h.hash, ts(h.signed_at), h.mac),
                )

    def audit_heads(self) -> Sequence[SignedHead]:
        rows = self._query("SELECT chain_key, seq, hash, signed_at, mac FROM audit_heads ORDER BY chain_key", ())
        return [
            SignedHead(bytes(r["chain_key"]), r["seq"], bytes(r["hash"]), parse_ts(r["signed_at"]), bytes(r["mac"]))
            for r in rows
        ]

    def max_audit_id(self) -> int:
        return int(self._query("SELECT coalesce(max(id), 0) AS n FROM audit_log", ())[0]["n"])

    @staticmethod
    def _append_audit(conn: sqlite3.Connection, event: AuditEvent) -> None:
        conn.execute(
            SQL_APPEND_AUDIT,
            {
                "key": event.chain_key,
                "at": ts(event.at),
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
        with self._tx() as conn:
            self._append_audit(conn, event)

    def audit_rows(self, after: tuple[bytes, int] | None, limit: int) -> Sequence[AuditRow]:
        key, seq = after if after is not None else (b"", 0)
        rows = self._query(
            "SELECT id, chain_key, seq, at, partner_id, action, outcome, reason, subject, prev_hash, hash"
            " FROM audit_log WHERE (chain_key, seq) > (?, ?) ORDER BY chain_key, seq LIMIT ?",
            (key, seq, limit),
        )
        return [
            AuditRow(
                r["id"],
                bytes(r["chain_key"]),
                r["seq"],
                parse_ts(r["at"]),
                r["partner_id"],
                r["action"],
                r["outcome"],
                r["reason"],
                r["subject"],
                bytes(r["prev_hash"]),
                bytes(r["hash"]),
            )
            for r in rows
        ]

    # -- partners (PartnerStore; the sec-auth change) -------------------------------------

    def add_partner(self, partner: Partner) -> bool:
        try:
            with self._tx() as conn:
                cur = conn.execute(
                    "INSERT INTO partners (partner_id, api_key_sha256, client_cert_sha256, enabled, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (partner_id) DO NOTHING",
                    (
                        partner.partner_id,
                        partner.api_key_hash,
                        partner.client_cert_sha256,
                        int(partner.enabled),
                        ts(partner.created_at),
                        ts(partner.updated_at),
                    ),
                )
                return cur.rowcount == 1
        except sqlite3.IntegrityError as err:  # the only other unique column: the certificate
            raise PartnerCertificateInUse("the client certificate is registered to another partner") from err

    def get_partner(self, partner_id: str) -> Partner | None:
        rows = self._query("SELECT * FROM partners WHERE partner_id = ?", (partner_id,))
        return _partner(rows[0]) if rows else None

    def partner_by_certificate(self, fingerprint: str) -> Partner | None:
        rows = self._query("SELECT * FROM partners WHERE client_cert_sha256 = ?", (fingerprint,))
        return _partner(rows[0]) if rows else None

    def list_partners(self) -> Sequence[Partner]:
        return [_partner(r) for r in self._query("SELECT * FROM partners ORDER BY partner_id", ())]

    def set_partner_enabled(self, partner_id: str, enabled: bool, now: datetime) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE partners SET enabled = ?, updated_at = ? WHERE partner_id = ?",
                (int(enabled), ts(now), partner_id),
            )
            return cur.rowcount == 1

    def set_partner_key(self, partner_id: str, api_key_hash: bytes, now: datetime) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE partners SET api_key_sha256 = ?, updated_at = ? WHERE partner_id = ?",
                (api_key_hash, ts(now), partner_id),
            )
            return cur.rowcount == 1

    def set_partner_certificate(self, partner_id: str, fingerprint: str | None, now: datetime) -> bool:
        try:
            with self._tx() as conn:
                cur = conn.execute(
                    "UPDATE partners SET client_cert_sha256 = ?, updated_at = ? WHERE partner_id = ?",
                    (fingerprint, ts(now), partner_id),
                )
                return cur.rowcount == 1
        except sqlite3.IntegrityError as err:
            raise PartnerCertificateInUse("the client certificate is registered to another partner") from err

    # -- issuer lifecycle (keys rotate / import-cert) -----------------------------------

    def add_pending_issuer(self, pending: PendingIssuer) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO issuers (key_label, key_kind, state, csr_pem, created_at) VALUES (?, ?, 'pending', ?, ?)",
                (pending.key_label, pending.key_kind, pending.csr_pem, ts(pending.created_at)),
            )

    def pending_issuers(self) -> Sequence[PendingIssuer]:
        rows = self._query(
            "SELECT key_label, key_kind, csr_pem, created_at FROM issuers WHERE state = 'pending'"
            " ORDER BY created_at DESC",
            (),
        )
        return [PendingIssuer(r["key_label"], r["key_kind"], r["csr_pem"], parse_ts(r["created_at"])) for r in rows]

    def install_issuer(self, issuer: IssuerRecord) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE issuers SET state = 'installed', certificate_pem = ?, chain_pem = ?, not_before = ?,"
                " not_after = ? WHERE key_label = ? AND state = 'pending'",
                (
                    issuer.certificate_pem,
                    issuer.chain_pem,
                    ts(issuer.not_before or issuer.created_at),
                    ts(issuer.not_after),
                    issuer.key_label,
                ),
            )
            return cur.rowcount == 1

    # -- aliases (AliasStore) ---------------------------------------------------------------

    def resolve_individual(self, id_hmac: bytes, now: datetime) -> bytes | None:
        rows = self._query(SQL_RESOLVE_INDIVIDUAL, (id_hmac, id_hmac, ts(now)))
        return bytes(rows[0][0]) if rows else None

    def add_alias(self, alias: Alias) -> None:
        with self._tx() as conn:
            _upsert_alias(conn, alias)

    def revoke_alias(self, alias_hmac: bytes, now: datetime) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE individual_aliases SET revoked_at = ? WHERE alias_hmac = ? AND revoked_at IS NULL",
                (ts(now), alias_hmac),
            )
            return cur.rowcount == 1

    def aliases_of(self, id_hmac: bytes) -> Sequence[Alias]:
        rows = self._query(
            "SELECT alias_hmac, id_hmac, alias_type, created_at, expires_at, revoked_at FROM individual_aliases"
            " WHERE id_hmac = ? ORDER BY created_at, alias_hmac",
            (id_hmac,),
        )
        return [Alias(bytes(r[0]), bytes(r[1]), r[2], parse_ts(r[3]), _opt_ts(r[4]), _opt_ts(r[5])) for r in rows]

    def partner_psut(self, id_hmac: bytes, partner_id: str) -> str | None:
        rows = self._query(
            "SELECT psut FROM bindings WHERE id_hmac = ? AND partner_id = ? ORDER BY id LIMIT 1", (id_hmac, partner_id)
        )
        return str(rows[0][0]) if rows else None


# One query resolves any ID: the individual's own, or an alias that is neither revoked nor expired.
SQL_RESOLVE_INDIVIDUAL = (
    "SELECT id_hmac FROM individuals WHERE id_hmac = ?"
    " UNION ALL SELECT id_hmac FROM individual_aliases"
    " WHERE alias_hmac = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) LIMIT 1"
)
# Insert, or update the same individual's unrevoked alias; no row back means another individual's or revoked.
SQL_UPSERT_ALIAS = (
    "INSERT INTO individual_aliases (alias_hmac, id_hmac, alias_type, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (alias_hmac) DO UPDATE SET alias_type = excluded.alias_type, expires_at = excluded.expires_at"
    " WHERE individual_aliases.id_hmac = excluded.id_hmac AND individual_aliases.revoked_at IS NULL"
    " RETURNING alias_hmac"
)
SQL_IDENTITY_AND_LOCK = (
    "SELECT email, phone, name, pin_hmac, locked_until FROM individuals LEFT JOIN individual_limits USING (id_hmac)"
    " WHERE id_hmac = ?"
)
# One statement counts a send: a window that ended (or lies over a minute ahead: the clock stepped back) starts
# afresh at 1; otherwise the count goes up, but never past limit + 1, which means "refused".
# Parameters: key, now, expired (= now - window), ahead (= now + skew), limit.
_COUNT_SEND = (
    " ON CONFLICT ({key}) DO UPDATE SET"
    " otp_window_start = CASE WHEN l.otp_window_start IS NULL OR l.otp_window_start <= ?3 OR l.otp_window_start > ?4"
    " THEN excluded.otp_window_start ELSE l.otp_window_start END,"
    " otp_sends = CASE WHEN l.otp_window_start IS NULL OR l.otp_window_start <= ?3 OR l.otp_window_start > ?4 THEN 1"
    " WHEN l.otp_sends <= ?5 THEN l.otp_sends + 1 ELSE l.otp_sends END"
    " RETURNING otp_window_start, otp_sends"
)
SQL_COUNT_PARTNER_SEND = (
    "INSERT INTO partner_limits AS l (partner_id, otp_window_start, otp_sends) VALUES (?1, ?2, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.format(key="partner_id")
)
SQL_COUNT_INDIVIDUAL_NONCE = (
    "INSERT INTO individual_limits AS l (id_hmac, nonce_window_start, nonces) VALUES (?1, ?2, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.replace("otp_window_start", "nonce_window_start").replace("otp_sends", "nonces").format(key="id_hmac")
)
# The same window rule on a limit_windows row. Parameters: scope, key, now, expired, ahead, limit.
SQL_COUNT_WINDOW = (
    "INSERT INTO limit_windows AS l (scope, key, window_start, count) VALUES (?1, ?2, ?3, 1)"
    " ON CONFLICT (scope, key) DO UPDATE SET"
    " window_start = CASE WHEN l.window_start <= ?4 OR l.window_start > ?5 THEN excluded.window_start"
    " ELSE l.window_start END,"
    " count = CASE WHEN l.window_start <= ?4 OR l.window_start > ?5 THEN 1"
    " WHEN l.count <= ?6 THEN l.count + 1 ELSE l.count END"
    " RETURNING window_start, count"
)
SQL_FAILURE_BUDGET = "SELECT key, window_start, count FROM limit_windows WHERE scope = ? AND key IN (?, ?)"
# The sweep (server/sweeper.py): expired rows, oldest first, at most a batch per statement.
SQL_PURGE_OTPS = (
    "DELETE FROM otps WHERE transaction_id IN (SELECT transaction_id FROM otps WHERE expires_at <= ?"
    " ORDER BY expires_at LIMIT ?)"
)
SQL_PURGE_JTIS = (
    "DELETE FROM wla_jtis WHERE rowid IN (SELECT rowid FROM wla_jtis WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
)
SQL_PURGE_NONCES = (
    "DELETE FROM binding_nonces WHERE nonce IN (SELECT nonce FROM binding_nonces WHERE expires_at <= ?"
    " ORDER BY expires_at LIMIT ?)"
)
SQL_PURGE_WINDOWS = (
    "DELETE FROM limit_windows WHERE rowid IN (SELECT rowid FROM limit_windows WHERE window_start <= ?"
    " ORDER BY window_start LIMIT ?)"
)
SQL_PURGE_PARTNER_LIMITS = (
    "DELETE FROM partner_limits WHERE partner_id IN (SELECT partner_id FROM partner_limits"
    " WHERE otp_window_start <= ? LIMIT ?)"
)
# An individual's counters can go once every window has ended and no lockout is running: a fresh row
# behaves the same.
SQL_PURGE_INDIVIDUAL_LIMITS = (
    "DELETE FROM individual_limits WHERE id_hmac IN (SELECT id_hmac FROM individual_limits"
    " WHERE coalesce(locked_until, '') <= :now AND coalesce(otp_window_start, '') <= :cut"
    " AND coalesce(fail_window_start, '') <= :cut AND coalesce(nonce_window_start, '') <= :cut LIMIT :n)"
)
SQL_COUNT_INDIVIDUAL_SEND = (
    "INSERT INTO individual_limits AS l (id_hmac, otp_window_start, otp_sends) VALUES (?1, ?2, 1)"  # noqa: S608 (fixed names)
    + _COUNT_SEND.format(key="id_hmac")
)
# The new entry follows the chain's last one (or the genesis hash); its hash is computed in the same
# statement, so one round trip appends it. Concurrent appends to one chain queue on the write lock.
SQL_APPEND_AUDIT = (
    "INSERT INTO audit_log (chain_key, seq, at, partner_id, action, outcome, reason, subject, prev_hash, hash)"
    " SELECT :key, h.seq + 1, :at, :partner, :action, :outcome, :reason, :subject, h.hash,"
    " kb_link_hash(h.hash, h.seq + 1, :payload)"
    " FROM (SELECT coalesce((SELECT seq FROM audit_log WHERE chain_key = :key ORDER BY seq DESC LIMIT 1), 0) AS seq,"
    " coalesce((SELECT hash FROM audit_log WHERE chain_key = :key ORDER BY seq DESC LIMIT 1), :genesis) AS hash) AS h"
)


def _is_busy(err: sqlite3.OperationalError) -> bool:
    """Another writer holds the lock: the connection is fine, the caller may retry."""
    return "locked" in str(err) or "busy" in str(err)


def _sql_link_hash(prev_hash: bytes, seq: int, payload: bytes) -> bytes:
    return link_hash(bytes(prev_hash), int(seq), bytes(payload))


def _window_params(now: datetime, rule: RateRule) -> tuple[str, str, int]:
    """(expired, ahead, limit): a window that started before ``expired`` has ended; one that starts after
    ``ahead`` lies in the future (the clock stepped back); one in between is current, though it may start a
    little after ``now`` (a concurrent request read the clock later but counted first)."""
    return ts(now - rule.window), ts(now + timedelta(seconds=WINDOW_SKEW_SECONDS)), rule.limit


def _refused_for(row: Sequence[object] | None, now: datetime, rule: RateRule) -> int:
    """0 when the counted send is within the limit, else the seconds until its window ends."""
    assert row is not None
    start, count = row[0], row[1]
    assert isinstance(start, str)
    assert isinstance(count, int)
    return seconds_until(parse_ts(start) + rule.window, now) if count > rule.limit else 0


def _opt_ts(value: str | None) -> datetime | None:
    return parse_ts(value) if value is not None else None


def _opt_text(value: datetime | None) -> str | None:
    return ts(value) if value is not None else None


def _partner(r: sqlite3.Row) -> Partner:
    return Partner(
        partner_id=r["partner_id"],
        api_key_hash=bytes(r["api_key_sha256"]),
        enabled=bool(r["enabled"]),
        client_cert_sha256=r["client_cert_sha256"],
        created_at=parse_ts(r["created_at"]),
        updated_at=parse_ts(r["updated_at"]),
    )


def _binding(r: sqlite3.Row) -> Binding:
    return Binding(
        id_hmac=bytes(r["id_hmac"]),
        partner_id=r["partner_id"],
        auth_factor_type=r["auth_factor_type"],
        psut=r["psut"],
        key_fingerprint=r["key_fingerprint"],
        certificate_pem=r["certificate_pem"],
        cert_thumbprint=r["cert_thumbprint"],
        serial_hex=r["serial_hex"],
        issuer_key_label=r["issuer_key_label"],
        created_at=parse_ts(r["created_at"]),
        expires_at=parse_ts(r["expires_at"]),
        status=BindingStatus(r["status"]),
        superseded_at=parse_ts(r["superseded_at"]) if r["superseded_at"] else None,
        revoked_at=parse_ts(r["revoked_at"]) if r["revoked_at"] else None,
        revocation_reason=r["revocation_reason"],
    )


def _upsert_alias(conn: sqlite3.Connection, alias: Alias) -> None:
    """Record the alias, or update the same individual's active one; AliasConflict (the transaction is rolled
    back) when it belongs to another individual or was revoked."""
    row = conn.execute(
        SQL_UPSERT_ALIAS,
        (alias.alias_hmac, alias.id_hmac, alias.alias_type, ts(alias.created_at), _opt_text(alias.expires_at)),
    ).fetchone()
    if row is None:
        raise AliasConflict("the alias is registered to another individual or was revoked")
