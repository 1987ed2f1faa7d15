"""Persistence backends behind the ports in `server.ports`, chosen by database URL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from server.aliases import AliasStore
from server.domain import Binding
from server.ports import (
    AuditLog,
    BindingStore,
    IdentityStore,
    IssuerStore,
    KbiStore,
    LimitStore,
    NonceStore,
    OtpStore,
    PartnerStore,
    ReplayCache,
)


class Store(
    IdentityStore,
    KbiStore,
    OtpStore,
    BindingStore,
    IssuerStore,
    ReplayCache,
    NonceStore,
    LimitStore,
    AuditLog,
    PartnerStore,
    AliasStore,
    Protocol,
):
    """Everything one backend module provides: every port, plus what operators and tests need."""

    def ping(self) -> None: ...

    def close(self) -> None: ...

    def count_rows(self, table: str) -> int: ...

    def count_active_bindings(self) -> int: ...

    def otp_state(self, transaction_id: str) -> tuple[str, int] | None: ...

    def bindings_for(self, id_hmac: bytes, partner_id: str) -> Sequence[Binding]: ...

    def key_owner(self, key_fingerprint: str) -> bytes | None:
        """The ID-HMAC that claimed the wallet key, if any (admin and tests; the service only claims)."""
        ...


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].lower() in {"postgresql", "postgres", "postgresql+psycopg"}


def check_url(url: str) -> str:
    if sqlite_path(url) is None and not is_postgres(url):
        raise ValueError("the database URL must be sqlite:///path or postgresql://...")
    return url


def open_store(url: str) -> Store:
    """The store for ``url``: ``sqlite:///path`` or ``postgresql://user@host:port/db``."""
    path = sqlite_path(check_url(url))
    if path is not None:
        from server.stores.sqlite import SqliteStore

        return SqliteStore(path)
    from server.stores.postgres import PostgresStore

    return PostgresStore(url)


def migrate(url: str) -> int:
    """Apply the backend's pending migrations; returns how many were applied."""
    path = sqlite_path(check_url(url))
    if path is not None:
        from server.stores import sqlite

        return sqlite.migrate(path)
    from server.stores import postgres

    return postgres.migrate(url)


def pending_migrations(url: str) -> int:
    """How many schema migrations the database still needs (0: up to date), applying none.

    Raises FileNotFoundError for a SQLite file that does not exist (it is not created), and the driver's
    error for a PostgreSQL server that cannot be reached or a database that does not exist.
    """
    path = sqlite_path(check_url(url))
    if path is not None:
        from server.stores import sqlite

        return sqlite.pending_migrations(path)
    from server.stores import postgres

    return postgres.pending_migrations(url)
