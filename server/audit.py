"""The audit trail: hash-chained events, one chain per individual, one per partner, and one for admin actions.

Each entry's hash is SHA-256 over ``prev_hash || seq (8 bytes, big-endian) || payload``, where the payload
is a length-prefixed encoding of the entry's fields. Changing, inserting, deleting or reordering an entry
breaks the link at that entry or the next one, and `keybinder audit verify` names it.

Why many chains and not one: a single chain is one global serialization point and, on a distributed
database, a cross-shard write in every request. An individual's chain is keyed by the id_hmac, so its
entries live on the individual's shard and are appended in the same transaction as the state change they
describe. Events without an individual (a request refused before the ID was hashed, a partner rate limit)
go to the partner's chain; admin CLI actions to the ``admin`` chain.

Entries never hold a raw individual ID, OTP, PIN or key: only reason codes, the partner, and a PSUT or
ID-HMAC (hex) as the subject.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: The prev_hash of every chain's first entry.
GENESIS = bytes(32)
ADMIN_CHAIN = b"admin"
PARTNER_CHAIN_PREFIX = b"partner:"
#: How many entries `audit verify` and `audit export` read per query.
PAGE_ROWS = 1000


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    #: The request was refused with the entry's reason code (bad input, failed challenge, limit).
    REFUSED = "refused"
    #: A backend or internal failure: nothing was written.
    ERROR = "error"
    #: This failure started a lockout of the individual.
    LOCKED = "locked"


def canonical_time(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("naive datetime: every time in KeyBinder is tz-aware UTC")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_payload(
    chain_key: bytes, at: datetime, partner_id: str, action: str, outcome: str, reason: str, subject: str
) -> bytes:
    """The hashed fields, each as a 4-byte big-endian length and its bytes: no two tuples encode alike."""
    parts = [chain_key, *(v.encode() for v in (canonical_time(at), partner_id, action, outcome, reason, subject))]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def link_hash(prev_hash: bytes, seq: int, payload: bytes) -> bytes:
    """An entry's hash. PostgreSQL computes the same as ``sha256(prev_hash || int8send(seq) || payload)``."""
    return hashlib.sha256(prev_hash + seq.to_bytes(8, "big", signed=True) + payload).digest()


def partner_chain(partner_id: str) -> bytes:
    return PARTNER_CHAIN_PREFIX + partner_id.encode()


def chain_name(chain_key: bytes) -> str:
    """How reports name a chain: ``admin``, ``partner:<id>`` or ``individual:<id_hmac hex>``."""
    if chain_key == ADMIN_CHAIN or chain_key.startswith(PARTNER_CHAIN_PREFIX):
        return chain_key.decode("utf-8", "replace")
    return f"individual:{chain_key.hex()}"


def id_hmac_subject(id_hmac: bytes) -> str:
    return f"id_hmac:{id_hmac.hex()}"


def psut_subject(psut: str) -> str:
    return f"psut:{psut}"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event to append; the store assigns its seq, prev_hash and hash."""

    chain_key: bytes
    at: datetime
    partner_id: str
    action: str
    outcome: str
    reason: str = ""
    subject: str = ""
    #: The chain is an individual's (chain_key is its id_hmac): the writer takes that individual's lock.
    per_individual: bool = False

    def payload(self) -> bytes:
        return encode_payload(
            self.chain_key, self.at, self.partner_id, self.action, self.outcome, self.reason, self.subject
        )


def individual_event(
    id_hmac: bytes, at: datetime, partner_id: str, action: str, outcome: str, reason: str = "", subject: str = ""
) -> AuditEvent:
    return AuditEvent(id_hmac, at, partner_id, action, outcome, reason, subject or id_hmac_subject(id_hmac), True)


def partner_event(at: datetime, partner_id: str, action: str, outcome: str, reason: str = "") -> AuditEvent:
    return AuditEvent(partner_chain(partner_id), at, partner_id, action, outcome, reason)


def admin_event(at: datetime, action: str, outcome: str = Outcome.SUCCESS, subject: str = "") -> AuditEvent:
    return AuditEvent(ADMIN_CHAIN, at, "", action, outcome, "", subject)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One stored entry, as `audit verify` and `audit export` read it."""

    id: int
    chain_key: bytes
    seq: int
    at: datetime
    partner_id: str
    action: str
    outcome: str
    reason: str
    subject: str
    prev_hash: bytes
    hash: bytes

    def expected_hash(self) -> bytes:
        payload = encode_payload(
            self.chain_key, self.at, self.partner_id, self.action, self.outcome, self.reason, self.subject
        )
        return link_hash(self.prev_hash, self.seq, payload)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "chain": chain_name(self.chain_key),
            "seq": self.seq,
            "at": canonical_time(self.at),
            "partner_id": self.partner_id,
            "action": self.action,
            "outcome": self.outcome,
            "reason": self.reason,
            "subject": self.subject,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


@dataclass(frozen=True, slots=True)
class BrokenLink:
    row_id: int
    chain: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"row id {self.row_id} (chain {self.chain}, seq {self.seq}): {self.problem}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    chains: int
    entries: int
    #: The first broken link of each broken chain, in row-id order.
    broken: list[BrokenLink]


def verify_chains(rows: Iterable[AuditRow]) -> VerifyReport:
    """Recompute every chain from ``rows``, which come ordered by (chain_key, seq)."""
    broken: list[BrokenLink] = []
    chains = entries = 0
    key: bytes | None = None
    expected_seq, prev, failed = 1, GENESIS, False
    for row in rows:
        entries += 1
        if row.chain_key != key:
            key, expected_seq, prev, failed = row.chain_key, 1, GENESIS, False
            chains += 1
        if failed:
            continue
        problem = None
        if row.seq != expected_seq:
            problem = f"expected seq {expected_seq}: an entry before it was removed or inserted"
        elif row.prev_hash != prev:
            problem = "prev_hash is not the hash of the previous entry"
        elif row.hash != row.expected_hash():
            problem = "hash does not match the entry's contents"
        if problem is not None:
            broken.append(BrokenLink(row.id, chain_name(row.chain_key), row.seq, problem))
            failed = True
            continue
        expected_seq, prev = row.seq + 1, row.hash
    return VerifyReport(chains, entries, sorted(broken, key=lambda b: b.row_id))
