"""The audit trail: hash-chained events, one chain per individual, one per partner, and one for admin actions.

Each entry's hash is SHA-256 over ``prev_hash || seq (8 bytes, big-endian) || payload``, where the payload
is a length-prefixed encoding of the entry's fields. Changing, inserting, deleting or reordering an entry
breaks the link at that entry or the next one, and `keybinder audit verify` names it.

Why many chains and not one: a single chain is one global serialization point and, on a distributed
database, a cross-shard write in every request. An individual's chain is keyed by the id_hmac, so its
entries live on the individual's shard and are appended in the same transaction as the state change they
describe. Events without an individual (a request refused before the ID was hashed, a partner rate limit)
go to the partner's chain; admin CLI actions to the ``admin`` chain.

The chain alone is keyless: anyone who can write the table can recompute it after an edit. So the head of
every chain (its newest seq and hash) is signed periodically with an HMAC key that never leaves the HSM
(``audit_heads``, `server.sweeper`), and `keybinder audit verify` checks every signed head: its MAC, that the
chain still holds that entry with that hash (an edit before it changes the hash), and that the chain has
not been cut short of it (truncation of the newest entries). Entries after a chain's last signed head are
protected by the chain only until the next signing run; `audit verify` counts them.

Entries never hold a raw individual ID, OTP, PIN or key: only reason codes, the partner, and a PSUT or
ID-HMAC (hex) as the subject.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable
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


#: The HSM MAC purpose of a signed chain head (one HMAC key, one label per meaning; see server.service).
MAC_AUDIT_HEAD = "audit-head"


def head_parts(chain_key: bytes, seq: int, hash_: bytes) -> tuple[bytes, bytes, bytes]:
    """What a head's MAC covers (the KeyedHasher length-prefixes each part)."""
    return chain_key, seq.to_bytes(8, "big", signed=True), hash_


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A chain's newest entry (seq, hash) at ``signed_at``, under an HSM-keyed MAC."""

    chain_key: bytes
    seq: int
    hash: bytes
    signed_at: datetime
    mac: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": chain_name(self.chain_key),
            "chain_key": self.chain_key.hex(),
            "seq": self.seq,
            "hash": self.hash.hex(),
            "signed_at": canonical_time(self.signed_at),
            "mac": self.mac.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SignedHead:
        return cls(
            bytes.fromhex(data["chain_key"]),
            int(data["seq"]),
            bytes.fromhex(data["hash"]),
            datetime.fromisoformat(data["signed_at"].replace("Z", "+00:00")),
            bytes.fromhex(data["mac"]),
        )


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
    #: Signed heads checked, and entries newer than their chain's last signed head (chain-protected only).
    signed_heads: int = 0
    unsigned_entries: int = 0


def verify_chains(
    rows: Iterable[AuditRow],
    heads: Iterable[SignedHead] = (),
    mac_ok: Callable[[SignedHead], bool] | None = None,
) -> VerifyReport:
    """Recompute every chain from ``rows``, which come ordered by (chain_key, seq), and check them against
    their signed ``heads`` (``mac_ok`` checks a head's MAC in the HSM)."""
    broken: list[BrokenLink] = []
    signed: dict[bytes, SignedHead] = {}
    checked = 0
    for head in heads:
        checked += 1
        if mac_ok is not None and not mac_ok(head):
            broken.append(BrokenLink(0, chain_name(head.chain_key), head.seq, "its signed head's MAC does not verify"))
            continue
        signed[head.chain_key] = head
    chains = entries = unsigned = 0
    key: bytes | None = None
    expected_seq, prev, failed = 1, GENESIS, False
    last: AuditRow | None = None

    def close_chain(row: AuditRow | None) -> None:
        # The chain ended: it must reach its signed head (newest entries cut off otherwise).
        if row is None or failed:
            return
        head = signed.pop(row.chain_key, None)
        if head is not None and row.seq < head.seq:
            problem = f"the chain ends at seq {row.seq} but its signed head is seq {head.seq}: newest entries removed"
            broken.append(BrokenLink(row.id, chain_name(row.chain_key), row.seq, problem))

    for row in rows:
        entries += 1
        if row.chain_key != key:
            close_chain(last)
            key, expected_seq, prev, failed = row.chain_key, 1, GENESIS, False
            chains += 1
        last = row
        if failed:
            continue
        own = signed.get(row.chain_key)
        problem: str | None = None
        if row.seq != expected_seq:
            problem = f"expected seq {expected_seq}: an entry before it was removed or inserted"
        elif row.prev_hash != prev:
            problem = "prev_hash is not the hash of the previous entry"
        elif row.hash != row.expected_hash():
            problem = "hash does not match the entry's contents"
        elif own is not None and row.seq == own.seq and row.hash != own.hash:
            # Every link holds, yet the hash is not the one the HSM signed: the chain was recomputed.
            problem = "hash differs from the chain's signed head: the chain was rewritten up to here"
        if own is None or row.seq > own.seq:
            unsigned += 1
        if problem is not None:
            broken.append(BrokenLink(row.id, chain_name(row.chain_key), row.seq, problem))
            failed = True
            continue
        expected_seq, prev = row.seq + 1, row.hash
    close_chain(last)
    for head in signed.values():  # a signed chain none of whose entries is left
        if all(b.chain != chain_name(head.chain_key) for b in broken):
            problem = f"the chain has no entries but its signed head is seq {head.seq}: the chain was removed"
            broken.append(BrokenLink(0, chain_name(head.chain_key), head.seq, problem))
    return VerifyReport(
        chains,
        entries,
        sorted(broken, key=lambda b: b.row_id),
        signed_heads=checked,
        unsigned_entries=unsigned,
    )
