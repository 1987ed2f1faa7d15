"""Periodic maintenance of a serving process: purge expired rows, sign the audit chains' heads.

Both are bounded per run (``batch`` rows per table, ``batch`` audit entries), so a run is short whatever
the backlog; a backlog is worked off by the following runs. Every worker runs it; the work is idempotent
(a row deleted twice is deleted once, a head is only ever moved forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from server.audit import MAC_AUDIT_HEAD, SignedHead, head_parts
from server.limits import Limits
from server.ports import KeyedHasher

log = logging.getLogger(__name__)

#: Rows deleted per table, and audit entries read for signing, per run.
DEFAULT_BATCH = 1000
#: Audit entries re-read behind the last one signed: on PostgreSQL ids are taken at insert and committed in
#: any order, so an entry may become visible after a higher id was signed.
AUDIT_OVERLAP_ROWS = 1000


class MaintainedStore(Protocol):
    def purge_expired(self, now: datetime, limits: Limits, batch: int) -> dict[str, int]: ...

    def chain_heads_after(self, row_id: int, limit: int) -> tuple[list[tuple[bytes, int, bytes]], int]: ...

    def save_audit_heads(self, heads: list[SignedHead]) -> None: ...


def sign_head(hasher: KeyedHasher, chain_key: bytes, seq: int, hash_: bytes, now: datetime) -> SignedHead:
    return SignedHead(chain_key, seq, hash_, now, hasher.mac(MAC_AUDIT_HEAD, *head_parts(chain_key, seq, hash_)))


def head_mac_ok(hasher: KeyedHasher, head: SignedHead) -> bool:
    import hmac

    expected = hasher.mac(MAC_AUDIT_HEAD, *head_parts(head.chain_key, head.seq, head.hash))
    return hmac.compare_digest(expected, head.mac)


@dataclass
class Sweeper:
    store: MaintainedStore
    hasher: KeyedHasher
    limits: Limits
    batch: int = DEFAULT_BATCH
    #: The highest audit entry id whose chain head has been signed by this process.
    signed_through: int = 0
    purged: dict[str, int] = field(default_factory=dict)

    def purge(self, now: datetime) -> dict[str, int]:
        done = self.store.purge_expired(now, self.limits, self.batch)
        for table, n in done.items():
            self.purged[table] = self.purged.get(table, 0) + n
        if any(done.values()):
            log.info("swept expired rows: %s", ", ".join(f"{t} {n}" for t, n in done.items() if n))
        return done

    def sign_heads(self, now: datetime) -> int:
        """Sign the heads of the chains with entries since the last run (at most ``batch`` entries read)."""
        start = max(0, self.signed_through - AUDIT_OVERLAP_ROWS)
        heads, last = self.store.chain_heads_after(start, self.batch + (self.signed_through - start))
        if heads:
            self.store.save_audit_heads([sign_head(self.hasher, k, seq, h, now) for k, seq, h in heads])
        self.signed_through = max(self.signed_through, last)
        return len(heads)

    def sign_all(self, now: datetime) -> int:
        """Sign every chain's head now (`keybinder audit sign`): run until the whole log has been read."""
        total = 0
        while True:
            before = self.signed_through
            start = before
            heads, last = self.store.chain_heads_after(start, self.batch)
            if heads:
                self.store.save_audit_heads([sign_head(self.hasher, k, seq, h, now) for k, seq, h in heads])
                total += len(heads)
            self.signed_through = last
            if last == before:
                return total

    def run_once(self, now: datetime) -> None:
        self.purge(now)
        self.sign_heads(now)
