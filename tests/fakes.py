"""In-memory fakes of the service's ports, for fast unit tests of the auth factors above them.

Never instead of the real test: the store fake is run through the store contract suite
(tests/test_store_contract.py, backend "memory") for every method it implements, and the real factors are
tested end to end on SoftHSM, SQLite and PostgreSQL (tests/test_auth_factors.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from server.audit import AuditEvent
from server.domain import Binding, BindingStatus, Identity, OtpRecord
from server.limits import RateRule
from server.ports import OtpAlreadyUsed


class FakeHasher:
    """`KeyedHasher` with a random in-process key, framing the parts as HsmHasher does."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self.calls: list[str] = []  # purposes only: the parts may be secrets

    def mac(self, purpose: str, *parts: str | bytes) -> bytes:
        self.calls.append(purpose)
        message = bytearray(purpose.encode())
        for part in parts:
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
            message += len(data).to_bytes(4, "big") + data
        return hmac.new(self._key, bytes(message), hashlib.sha256).digest()


class FakeClock:
    def __init__(self, now: datetime | None = None) -> None:
        self.current = now or datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


class MemoryStore:
    """The identity, KBI, OTP, binding and replay ports in memory (what the auth factors need), one lock for
    atomicity. Only what it implements is offered; the contract suite checks each of those methods."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._identities: dict[bytes, Identity] = {}
        self._kbi: dict[bytes, dict[str, bytes]] = {}
        self._otps: dict[str, tuple[OtpRecord, str]] = {}  # transaction id → (record, state)
        self._bindings: list[Binding] = []
        self._jtis: dict[tuple[bytes, str], datetime] = {}

    # -- IdentityStore, KbiStore
    def upsert_identity(self, identity: Identity, *, kbi: Mapping[str, bytes] | None = None) -> bool:
        with self._lock:
            new = identity.id_hmac not in self._identities
            self._identities[identity.id_hmac] = identity
            self._kbi[identity.id_hmac] = dict(kbi or {})
            return new

    def get_identity(self, id_hmac: bytes) -> Identity | None:
        return self._identities.get(id_hmac)

    def kbi_answers(self, id_hmac: bytes) -> dict[str, bytes]:
        return dict(self._kbi.get(id_hmac, {}))

    def count_identities(self) -> int:
        return len(self._identities)

    # -- OtpStore
    def replace_otp(
        self, otp: OtpRecord, *, send_limit: RateRule | None = None, audit: AuditEvent | None = None
    ) -> None:
        if send_limit is not None or audit is not None:
            raise NotImplementedError("MemoryStore keeps no send limits or audit trail")
        with self._lock:
            for tid, (record, state) in self._otps.items():
                if (record.id_hmac, record.partner_id) == (otp.id_hmac, otp.partner_id) and state == "pending":
                    self._otps[tid] = (record, "replaced")
            self._otps[otp.transaction_id] = (otp, "pending")

    def claim_otp_attempt(self, id_hmac: bytes, partner_id: str, now: datetime) -> OtpRecord | None:
        with self._lock:
            for tid, (record, state) in self._otps.items():
                if (record.id_hmac, record.partner_id, state) != (id_hmac, partner_id, "pending"):
                    continue
                if record.attempts >= record.max_attempts or record.expires_at <= now:
                    return None
                counted = replace(record, attempts=record.attempts + 1)
                self._otps[tid] = (counted, state)
                return counted
            return None

    def otp_state(self, transaction_id: str) -> tuple[str, int] | None:
        found = self._otps.get(transaction_id)
        return (found[1], found[0].attempts) if found is not None else None

    # -- BindingStore (what WLA reads, and the commit that makes a binding)
    def commit_binding(
        self,
        binding: Binding,
        *,
        consume_otp: str | None,
        now: datetime,
        consume_nonce: str | None = None,
        audit: AuditEvent | None = None,
    ) -> None:
        if consume_nonce is not None or audit is not None:
            raise NotImplementedError("MemoryStore keeps no nonces or audit trail")
        with self._lock:
            if consume_otp is not None:
                found = self._otps.get(consume_otp)
                if found is None or found[1] != "pending" or found[0].id_hmac != binding.id_hmac:
                    raise OtpAlreadyUsed(consume_otp)
                self._otps[consume_otp] = (found[0], "used")
            key = (binding.id_hmac, binding.partner_id, binding.auth_factor_type)
            self._bindings = [
                replace(b, status=BindingStatus.SUPERSEDED, superseded_at=now)
                if (b.id_hmac, b.partner_id, b.auth_factor_type) == key and b.status is BindingStatus.ACTIVE
                else b
                for b in self._bindings
            ]
            self._bindings.append(binding)

    def active_binding(self, id_hmac: bytes, partner_id: str, factor: str) -> Binding | None:
        return next(
            (
                b
                for b in self._bindings
                if (b.id_hmac, b.partner_id, b.auth_factor_type) == (id_hmac, partner_id, factor)
                and b.status is BindingStatus.ACTIVE
            ),
            None,
        )

    def binding_of(self, id_hmac: bytes, thumbprint: str) -> Binding | None:
        return next((b for b in self._bindings if (b.id_hmac, b.cert_thumbprint) == (id_hmac, thumbprint)), None)

    def bindings_for(self, id_hmac: bytes, partner_id: str) -> Sequence[Binding]:
        return [b for b in self._bindings if (b.id_hmac, b.partner_id) == (id_hmac, partner_id)]

    def count_active_bindings(self) -> int:
        return sum(b.status is BindingStatus.ACTIVE for b in self._bindings)

    # -- ReplayCache
    def claim_jti(
        self, id_hmac: bytes, jti: str, expires_at: datetime, now: datetime, *, audit: AuditEvent | None = None
    ) -> bool:
        if audit is not None:
            raise NotImplementedError("MemoryStore keeps no audit trail")
        with self._lock:
            # As the real stores: the individual's expired entries go when it claims.
            for key in [k for k, exp in self._jtis.items() if k[0] == id_hmac and exp <= now]:
                del self._jtis[key]
            if (id_hmac, jti) in self._jtis:
                return False
            self._jtis[(id_hmac, jti)] = expires_at
            return True

    def count_rows(self, table: str) -> int:
        counts = {
            "individuals": len(self._identities),
            "kbi_answers": sum(len(v) for v in self._kbi.values()),
            "otps": len(self._otps),
            "bindings": len(self._bindings),
            "wla_jtis": len(self._jtis),
            "wallet_keys": 0,  # claim_key is not implemented: no key is ever claimed here
        }
        if table not in counts:
            raise ValueError(table)
        return counts[table]
