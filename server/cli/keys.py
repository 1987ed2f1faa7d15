"""Issuer keys: `keybinder issuer show` and `keybinder keys list|rotate|import-cert|csr`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from server.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DbOpt,
    HsmOpt,
    fail,
    settings_for,
    table,
)

if TYPE_CHECKING:
    pass

issuer_app = typer.Typer(help="Issuer certificates.", no_args_is_help=True)
keys_app = typer.Typer(help="Issuer key lifecycle: list, rotate, import a CA-signed certificate.", no_args_is_help=True)


@issuer_app.command("show")
def issuer_show(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Print the PEM chain of the issuer certificates that are still valid."""
    from server.issuer_admin import issuer_chain_pem
    from server.stores import open_store

    settings = settings_for(config, data_dir, database_url, None)
    store = open_store(settings.database)
    try:
        chain = issuer_chain_pem(store, rotation_window_days=settings.issuer_rotation_window_days)
    finally:
        store.close()
    if not chain:
        raise fail(RuntimeError("no valid issuer certificate; run `keybinder init` or `keybinder keys rotate`"))
    typer.echo(chain, nl=False)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Every issuer key with its state: pending, next, active, retiring or expired."""
    from server.issuer_admin import issuer_key_statuses

    settings = settings_for(config, data_dir, database_url, None)
    statuses = issuer_key_statuses(settings)
    if not statuses:
        raise fail(RuntimeError("no issuer key; run `keybinder init`"))

    def when(t: datetime | None) -> str:
        return f"{t:%Y-%m-%dT%H:%M:%SZ}" if t is not None else "-"

    rows = [("LABEL", "STATE", "KIND", "NOT BEFORE", "NOT AFTER")]
    rows += [(s.key_label, str(s.state), s.key_kind, when(s.not_before), when(s.not_after)) for s in statuses]
    table(rows)


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as err:
        raise fail(RuntimeError(f"not an ISO 8601 time: {value!r}")) from err


@keys_app.command("rotate")
def keys_rotate(
    csr: Annotated[
        Path | None, typer.Option("--csr", help="Write a CSR for an external CA here; the key stays pending.")
    ] = None,
    not_before: Annotated[
        str | None,
        typer.Option("--not-before", help="Self-signed only: start signing at this ISO 8601 time.", show_default="now"),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Generate a new issuer key on the HSM and its self-signed certificate (or a CSR)."""
    from hsm import HsmError
    from server.issuer_admin import IssuerKeyError, rotate_issuer
    from server.ports import BackendUnavailable

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    try:
        report = rotate_issuer(settings, csr_path=csr, not_before=_when(not_before))
    except (IssuerKeyError, HsmError, BackendUnavailable, OSError) as err:
        raise fail(err) from err
    if csr is not None:
        typer.echo(f"created  issuer key {report.key_label!r} (pending); CSR written to {csr}")
        typer.echo(f"next:    keybinder keys import-cert <signed.pem> --label {report.key_label}")
    else:
        typer.echo(f"created  issuer key {report.key_label!r} ({report.state}) until {report.not_after:%Y-%m-%d}")


@keys_app.command("import-cert")
def keys_import_cert(
    certificate: Annotated[Path, typer.Argument(help="The CA-signed issuer certificate (PEM or DER).")],
    chain: Annotated[
        Path | None, typer.Option("--chain", help="PEM of the CA certificates above it, intermediates first.")
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="The pending key.", show_default="the one whose key matches")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Install the CA-signed certificate of a key made with `keys rotate --csr`."""
    from hsm import HsmError
    from server.issuer_admin import IssuerKeyError, import_issuer_certificate
    from server.ports import BackendUnavailable

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    try:
        report = import_issuer_certificate(settings, certificate, chain_path=chain, label=label)
    except (IssuerKeyError, HsmError, BackendUnavailable) as err:
        raise fail(err) from err
    typer.echo(f"installed issuer key {report.key_label!r} ({report.state}) until {report.not_after:%Y-%m-%d}")


@keys_app.command("csr")
def keys_csr(
    label: Annotated[str, typer.Argument(help="A pending key's label.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Print the CSR of a pending key again."""
    from server.issuer_admin import IssuerKeyError, pending_csr

    settings = settings_for(config, data_dir, database_url, None)
    try:
        typer.echo(pending_csr(settings, label), nl=False)
    except IssuerKeyError as err:
        raise fail(err) from err
