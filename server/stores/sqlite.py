"""SQLite backend for the identity, OTP, binding and issuer stores (the embedded default)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from yoyo import get_backend, read_migrations

from server.domain import Binding, BindingStatus, Identity, IssuerRecord, OtpRecord, PendingIssuer
from server.ports import KeyOwnedByOther, OtpAlreadyUsed, StoreUnavailable

BUSY_TIMEOUT_SECONDS = 5.0


def ts(value: datetime) -> str:
    """Fixed-width UTC text, so that SQL compares times as strings correctly."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: every time in KeyBinder is tz-aware UTC")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


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

    # -- connections ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as err:
                raise StoreUnavailable(f"cannot open the database: {err}") from err
            self._local.conn = conn
            with self._guard:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        # SQLite admits one writer at a time; threads of this process queue on a lock rather
        # than in SQLite's busy handler, whose sleeps (up to 100 ms each) make long latency tails.
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise StoreUnavailable(f"database busy or unavailable: {err}") from err
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as err:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(err, sqlite3.OperationalError):
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

    def close(self) -> None:
        with self._guard:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- identities -----------------------------------------------------------------------

    def upsert_identity(self, identity: Identity) -> bool:
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
        return existed is None

    def get_identity(self, id_hmac: bytes) -> Identity | None:
        rows = self._query("SELECT email, phone, name, pin_hmac FROM individuals WHERE id_hmac = ?", (id_hmac,))
        if not rows:
            return None
        row = rows[0]
        return Identity(id_hmac, row["email"], row["phone"], row["name"], row["pin_hmac"])

    def count_identities(self) -> int:
        return int(self._query("SELECT count(*) AS n FROM individuals", ())[0]["n"])

    # -- OTPs -----------------------------------------------------------------------------

    def replace_otp(self, otp: OtpRecord) -> None:
        with self._tx() as conn:
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
        self, binding: Binding, *, consume_otp: str | None, now: datetime, consume_nonce: str | None = None
    ) -> None:
        with self._tx() as conn:
            self._consume(conn, binding.id_hmac, consume_otp, consume_nonce, now)
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
        self, id_hmac: bytes, partner_id: str, factor: str, *, reason: str, now: datetime, consume_otp: str | None
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
        return _binding(row)

    # -- WLA replay cache and PoP nonces --------------------------------------------------

    def claim_jti(self, id_hmac: bytes, jti: str, expires_at: datetime, now: datetime) -> bool:
        with self._tx() as conn:
            # Expired entries of this individual can go: their tokens fail the exp check anyway.
            conn.execute("DELETE FROM wla_jtis WHERE id_hmac = ? AND expires_at <= ?", (id_hmac, ts(now)))
            cur = conn.execute(
                "INSERT INTO wla_jtis (id_hmac, jti, expires_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (id_hmac, jti, ts(expires_at)),
            )
            return cur.rowcount == 1

    def create_nonce(self, nonce: str, id_hmac: bytes, partner_id: str, expires_at: datetime) -> None:
        with self._tx() as conn:
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
        if table not in {"individuals", "otps", "bindings", "wallet_keys", "issuers", "wla_jtis", "binding_nonces"}:
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
