"""Binding partners and their API keys: `keybinder partners add|list|disable|enable|rotate-key|set-cert`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from server.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DbOpt,
    audit_admin,
    fail,
    settings_for,
    table,
)
from server.config import Settings

if TYPE_CHECKING:
    from server.stores import Store

partners_app = typer.Typer(help="Binding partners and their API keys.", no_args_is_help=True)


@contextlib.contextmanager
def _partner_store(settings: Settings) -> Iterator[Any]:
    """The store, closed afterwards; a refused change or an unreachable database is a clean error (exit 1)."""
    from server.ports import BackendUnavailable, StoreConflict
    from server.stores import open_store

    store = open_store(settings.database)
    try:
        yield store
    except (ValueError, StoreConflict) as err:
        raise fail(err) from err
    except BackendUnavailable as err:
        raise fail(RuntimeError(f"{err} (has `keybinder init` been run?)")) from err
    finally:
        store.close()


def _now() -> Any:

    return datetime.now(UTC)


def _read_cert_fingerprint(path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from server.partners import certificate_fingerprint

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise fail(RuntimeError(f"cannot read a PEM certificate from {path}")) from err
    return certificate_fingerprint(cert.public_bytes(serialization.Encoding.PEM))


def _audit_partner_change(store: Store, action: str, partner_id: str) -> None:
    """Every change to the partner registry is an admin entry of the audit trail (never a key)."""
    from server.audit import admin_event

    audit_admin(store, admin_event(_now(), action, subject=f"partner {partner_id}"))


def _show_key(issued: Any) -> None:
    # The only time the key exists outside the partner's hands: stdout, never a log line or argv.
    typer.echo(f"partner {issued.partner_id}")
    typer.echo(f"api key {issued.api_key}")
    typer.echo("store it now: only its hash is kept, it cannot be shown again", err=True)


@partners_app.command("add")
def partners_add(
    partner_id: Annotated[str, typer.Argument(help="The partner id (the partner-id header).")],
    client_cert: Annotated[
        Path | None,
        typer.Option("--client-cert", help="PEM client certificate that authenticates this partner over mTLS."),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Register a partner; prints its new API key once (only a hash is stored)."""
    from server.partners import add_partner

    settings = settings_for(config, data_dir, database_url, None)
    fingerprint = _read_cert_fingerprint(client_cert) if client_cert is not None else None
    with _partner_store(settings) as store:
        issued = add_partner(store, partner_id, _now(), client_cert_sha256=fingerprint)
        _audit_partner_change(store, "partners_add", partner_id)
    _show_key(issued)


@partners_app.command("list")
def partners_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """List partners: id, state, client certificate fingerprint, last change (never keys)."""
    settings = settings_for(config, data_dir, database_url, None)
    with _partner_store(settings) as store:
        partners = store.list_partners()
    rows = [("PARTNER", "STATE", "CLIENT CERT SHA-256", "UPDATED")]
    for p in partners:
        state = "enabled" if p.enabled else "disabled"
        rows.append((p.partner_id, state, p.client_cert_sha256 or "-", f"{p.updated_at:%Y-%m-%dT%H:%M:%SZ}"))
    table(rows)


def _set_enabled(partner_id: str, enabled: bool, settings: Settings) -> None:
    with _partner_store(settings) as store:
        found = store.set_partner_enabled(partner_id, enabled, _now())
        if found:
            _audit_partner_change(store, "partners_enable" if enabled else "partners_disable", partner_id)
    if not found:
        raise fail(RuntimeError(f"no partner {partner_id!r}"))
    typer.echo(f"{'enabled' if enabled else 'disabled'} {partner_id}")


@partners_app.command("disable")
def partners_disable(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Refuse the partner's requests (running servers within partner_cache_seconds, or at once on SIGHUP)."""
    _set_enabled(partner_id, False, settings_for(config, data_dir, database_url, None))


@partners_app.command("enable")
def partners_enable(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Accept a disabled partner again."""
    _set_enabled(partner_id, True, settings_for(config, data_dir, database_url, None))


@partners_app.command("rotate-key")
def partners_rotate_key(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Issue a new API key (printed once); the old key stops working."""
    from server.partners import rotate_key

    settings = settings_for(config, data_dir, database_url, None)
    with _partner_store(settings) as store:
        issued = rotate_key(store, partner_id, _now())
        _audit_partner_change(store, "partners_rotate_key", partner_id)
    _show_key(issued)


@partners_app.command("set-cert")
def partners_set_cert(
    partner_id: Annotated[str, typer.Argument()],
    client_cert: Annotated[
        Path | None, typer.Argument(help="PEM client certificate; omit to remove the partner's certificate.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Map an mTLS client certificate (by its SHA-256 fingerprint) to the partner, e.g. after renewal."""
    settings = settings_for(config, data_dir, database_url, None)
    fingerprint = _read_cert_fingerprint(client_cert) if client_cert is not None else None
    with _partner_store(settings) as store:
        found = store.set_partner_certificate(partner_id, fingerprint, _now())
        if found:
            _audit_partner_change(store, "partners_set_cert", partner_id)
    if not found:
        raise fail(RuntimeError(f"no partner {partner_id!r}"))
    typer.echo(f"{partner_id} certificate {'sha256=' + fingerprint if fingerprint else 'removed'}")
