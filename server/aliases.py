"""Aliases of an individual (MOSIP: one UIN, any number of revocable VIDs): one canonical ID, several IDs.

Every alias is stored as the same HSM-keyed HMAC as an individual ID (so an ID is an ID, whichever kind)
and maps to the individual's canonical ``id_hmac``. The service resolves whatever ID a request names to
the canonical one once, at the start of the request; from then on bindings, the PSUT, supersede, limits,
lockouts, OTPs and the audit chain are the individual's. A revoked or expired alias resolves to nothing,
exactly like an ID nobody registered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.domain import Identity
from server.ports import StoreConflict

#: `UIN`, `VID`, or any other upper-case word an operator uses for a kind of ID.
ALIAS_TYPE_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


@dataclass(frozen=True, slots=True)
class Alias:
    """One alias: only its HMAC is stored, never the ID itself."""

    alias_hmac: bytes
    id_hmac: bytes
    alias_type: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def active_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def state_at(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.active_at(now) else "expired"


class AliasConflict(StoreConflict):
    """The alias is registered to another individual, or was revoked (a revoked alias is never reused)."""


class AliasStore(Protocol):
    """Where aliases live, and the one lookup every request makes."""

    def resolve_individual(self, id_hmac: bytes, now: datetime) -> bytes | None:
        """The canonical ID-HMAC of a registered individual's ID or of an active alias; None for anything
        else (unknown, revoked, expired). One query whatever the answer, so none of them takes longer."""
        ...

    def add_alias(self, alias: Alias) -> None:
        """Record ``alias`` (or update the type and expiry of the same individual's active alias); raises
        ``AliasConflict``, writing nothing, when it belongs to another individual or was revoked."""
        ...

    def revoke_alias(self, alias_hmac: bytes, now: datetime) -> bool:
        """Revoke an active or expired alias for good; False when there is none to revoke."""
        ...

    def aliases_of(self, id_hmac: bytes) -> Sequence[Alias]:
        """Every alias of the individual (revoked and expired ones too), oldest first."""
        ...

    def partner_psut(self, id_hmac: bytes, partner_id: str) -> str | None:
        """The PSUT of the individual's first binding with the partner, if any (keeps pre-alias PSUTs)."""
        ...


def check_alias_type(alias_type: str) -> str:
    if not ALIAS_TYPE_PATTERN.fullmatch(alias_type):
        raise ValueError("an alias type is an upper-case word such as UIN or VID (A-Z, 0-9, _; up to 32)")
    return alias_type


# -- administration (`keybinder identities alias ...`, `identities import`) ----------------------


class IdHasher(Protocol):
    """What the administration needs of the service: the ID syntax and the HSM-keyed HMAC."""

    def check_individual_id(self, individual_id: str) -> str: ...

    def id_hmac(self, individual_id: str) -> bytes: ...


class AliasAdminStore(AliasStore, Protocol):
    def get_identity(self, id_hmac: bytes) -> Identity | None: ...


def parse_expiry(value: str | None, now: datetime) -> datetime | None:
    """An alias's ISO 8601 expiry (a time zone is required), in the future; None: it never expires."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expires_at is not an ISO 8601 time: {value!r}") from None
    if when.tzinfo is None:
        raise ValueError("expires_at needs a time zone (e.g. 2030-01-01T00:00:00Z)")
    if when <= now:
        raise ValueError("expires_at is in the past")
    return when


def check_alias(ids: IdHasher, *, individual_id: str, alias_id: str, alias_type: str) -> None:
    """Everything about an alias that needs no HSM or database, checked before anything is written."""
    check_alias_type(alias_type)
    ids.check_individual_id(individual_id)
    ids.check_individual_id(alias_id)
    if alias_id == individual_id:
        raise ValueError("an alias must differ from the individual's ID")


def check_alias_free(
    ids: IdHasher, store: AliasAdminStore, *, individual_id: str, alias_id: str, now: datetime
) -> None:
    """Before a file is imported: the alias is no registered individual's own ID and no one else's active alias.
    (A revoked alias is refused only when written: resolution cannot tell it from an unknown ID, by design.)"""
    alias_hmac = ids.id_hmac(alias_id)
    owner = store.resolve_individual(alias_hmac, now)
    if owner == alias_hmac:
        raise ValueError("the alias is a registered individual's own ID")
    if owner is not None and owner != ids.id_hmac(individual_id):
        raise ValueError("the alias belongs to another individual")


def add_alias(
    ids: IdHasher,
    store: AliasAdminStore,
    *,
    individual_id: str,
    alias_id: str,
    alias_type: str,
    expires_at: datetime | None,
    now: datetime,
) -> Alias:
    """Give the registered individual ``individual_id`` (their canonical ID) the alias ``alias_id``."""
    check_alias(ids, individual_id=individual_id, alias_id=alias_id, alias_type=alias_type)
    id_hmac = ids.id_hmac(individual_id)
    if store.get_identity(id_hmac) is None:
        raise ValueError("no individual is registered with this ID (name the canonical ID, not an alias)")
    alias_hmac = ids.id_hmac(alias_id)
    if store.get_identity(alias_hmac) is not None:
        raise ValueError("the alias is a registered individual's own ID")
    alias = Alias(alias_hmac, id_hmac, alias_type, now, expires_at)
    store.add_alias(alias)
    return alias


def revoke_alias(ids: IdHasher, store: AliasAdminStore, *, alias_id: str, now: datetime) -> bool:
    """Revoke the alias for good: from now on it answers like an unknown ID."""
    ids.check_individual_id(alias_id)
    return store.revoke_alias(ids.id_hmac(alias_id), now)


def aliases_of(ids: IdHasher, store: AliasAdminStore, *, individual_id: str) -> Sequence[Alias]:
    ids.check_individual_id(individual_id)
    id_hmac = ids.id_hmac(individual_id)
    if store.get_identity(id_hmac) is None:
        raise ValueError("no individual is registered with this ID (name the canonical ID, not an alias)")
    return store.aliases_of(id_hmac)
