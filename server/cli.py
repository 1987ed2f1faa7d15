"""The `keybinder` command line: init, serve, issuer, identities, audit, demo."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from server.config import Settings, load_settings
from server.logs import configure_logging

if TYPE_CHECKING:
    from server.audit import AuditEvent, AuditRow
    from server.stores import Store

# Rich tracebacks with locals would print PINs and OTPs held in local variables.
app = typer.Typer(
    help="KeyBinder: bind individuals' IDs to wallet keys with HSM-signed certificates.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
issuer_app = typer.Typer(help="Issuer certificates.", no_args_is_help=True)
identities_app = typer.Typer(help="The identity registry.", no_args_is_help=True)
app.add_typer(issuer_app, name="issuer")
app.add_typer(identities_app, name="identities")
audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file (or $KEYBINDER_CONFIG).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="State directory [default: .keybinder].")]
DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="sqlite:///path or postgresql://... [default: <data-dir>/keybinder.db]."),
]
HsmOpt = Annotated[
    str | None,
    typer.Option("--hsm-uri", help="RFC 7512 URI, e.g. pkcs11:token=t;object=k?module-path=...&pin-source=file:/p"),
]


def _settings(config: Path | None, data_dir: Path | None, db: str | None, hsm: str | None, **extra: Any) -> Settings:
    try:
        settings = load_settings(config, data_dir=data_dir, database_url=db, hsm_uri=hsm, **extra)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"configuration error: {err}", err=True)
        raise typer.Exit(2) from err
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


def _audit_admin(store: Store, event: AuditEvent) -> None:
    """Append an admin action's entry; the action is done, so a failure here says exactly that."""
    try:
        store.append_audit(event)
    except Exception as err:
        raise _fail(RuntimeError(f"{event.action} succeeded, but its audit entry was not written: {err}")) from err


@app.command()
def init(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None, hsm_uri: HsmOpt = None
) -> None:
    """Create (idempotently) the token, HMAC key, issuer key and certificate, and the database."""
    from hsm import HsmError
    from server.app import initialise

    settings = _settings(config, data_dir, database_url, hsm_uri)
    from server.audit import admin_event
    from server.stores import open_store

    try:
        report = initialise(settings)
    except (HsmError, RuntimeError, OSError) as err:
        raise _fail(err) from err
    store = open_store(settings.database)
    try:
        summary = f"{len(report.created)} created, {len(report.reused)} reused"
        _audit_admin(store, admin_event(datetime.now(UTC), "init", subject=summary))
    finally:
        store.close()
    for item in report.created:
        typer.echo(f"created  {item}")
    for item in report.reused:
        typer.echo(f"reused   {item}")


@app.command()
def migrate(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Apply pending database schema migrations."""
    from server.stores import migrate as run_migrations

    settings = _settings(config, data_dir, database_url, None)
    typer.echo(f"applied {run_migrations(settings.database)} migration(s)")


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
    listen: Annotated[str | None, typer.Option("--listen", help="host:port [default: 127.0.0.1:50051].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port on the default host; 0 picks a free one.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Serving processes sharing the port [default: one per CPU].")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve Prometheus /metrics on this port [default: off].")
    ] = None,
) -> None:
    """Serve keybinder.v1.KeyBinderService (plus health and reflection) until SIGTERM."""
    from hsm import HsmError
    from server.serve import serve as run
    from server.workers import run_workers

    if port is not None and listen is None:
        listen = f"127.0.0.1:{port}"
    settings = _settings(
        config, data_dir, database_url, hsm_uri, listen=listen, workers=workers, metrics_port=metrics_port
    )
    count = settings.workers or os.cpu_count() or 1

    def ready(bound: int) -> None:
        # One machine-readable line on stdout so scripts (and tests) can find a port-0 server.
        suffix = f" ({count} workers)" if count > 1 else ""
        print(f"keybinder listening on {settings.host_port[0]}:{bound}{suffix}", flush=True)

    try:
        if count == 1:
            from server.metrics import start_exporter  # observability: this process serves /metrics

            exporter = start_exporter(settings) if settings.metrics_port is not None else None
            try:
                asyncio.run(run(settings, ready))
            finally:
                if exporter is not None:
                    exporter.close()
        else:
            raise typer.Exit(run_workers(settings, count, ready))
    except (HsmError, OSError) as err:
        raise _fail(err) from err


@issuer_app.command("show")
def issuer_show(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Print the PEM chain of the issuer certificates that are still valid."""
    from server.app import issuer_chain_pem
    from server.stores import open_store

    settings = _settings(config, data_dir, database_url, None)
    store = open_store(settings.database)
    try:
        chain = issuer_chain_pem(store)
    finally:
        store.close()
    if not chain:
        raise _fail(RuntimeError("no issuer certificate; run `keybinder init`"))
    typer.echo(chain, nl=False)


def _with_app(settings: Settings) -> Any:
    from server.app import build_app

    return build_app(settings)


@identities_app.command("import")
def identities_import(
    file: Annotated[Path, typer.Argument(help='JSON array of {"individual_id","email","phone","pin","name"}.')],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Import identities; the ID and PIN are stored only as HSM-keyed HMACs."""
    from server.app import check_identity, register_identity
    from server.audit import admin_event
    from server.errors import KeyBinderError

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        entries = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(RuntimeError(f"cannot read {file}: {err}")) from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _fail(RuntimeError("the file must hold a JSON array of objects"))
    allowed = {"individual_id", "email", "phone", "pin", "name"}
    for index, entry in enumerate(entries):
        unknown = set(entry) - allowed
        if unknown or not isinstance(entry.get("individual_id"), str):
            raise _fail(RuntimeError(f"entry {index}: needs a string individual_id; unknown keys {sorted(unknown)}"))
        for key in allowed - {"individual_id"}:
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise _fail(RuntimeError(f"entry {index}: {key} must be a string"))
    kb = _with_app(settings)
    added = updated = 0
    try:
        # Every entry is checked before the first is written: a bad file imports nothing.
        for index, entry in enumerate(entries):
            try:
                check_identity(kb.service, individual_id=entry["individual_id"], pin=entry.get("pin"))
            except (KeyBinderError, ValueError) as err:
                raise _fail(RuntimeError(f"entry {index}: {err}")) from err
        for index, entry in enumerate(entries):
            try:
                new = register_identity(
                    kb.service,
                    kb.store,
                    individual_id=entry["individual_id"],
                    email=entry.get("email"),
                    phone=entry.get("phone"),
                    name=entry.get("name"),
                    pin=entry.get("pin"),
                )
            except (KeyBinderError, ValueError) as err:
                raise _fail(RuntimeError(f"entry {index}: {err}")) from err
            added += new
            updated += not new
        _audit_admin(
            kb.store, admin_event(datetime.now(UTC), "identities_import", subject=f"{added} new, {updated} updated")
        )
    finally:
        kb.close()
    typer.echo(f"imported {len(entries)} identities ({added} new, {updated} updated)")


@identities_app.command("add")
def identities_add(
    individual_id: Annotated[str, typer.Argument(help="The individual's ID.")],
    email: Annotated[str | None, typer.Option(help="Email for OTP delivery.")] = None,
    phone: Annotated[str | None, typer.Option(help="Phone for OTP delivery.")] = None,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    with_pin: Annotated[
        bool, typer.Option("--with-pin", help="Read a 6-digit PIN from the terminal or stdin.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Add or update one identity. The PIN is never taken on the command line."""
    from server.app import register_identity
    from server.audit import admin_event, id_hmac_subject
    from server.errors import KeyBinderError

    settings = _settings(config, data_dir, database_url, hsm_uri)
    pin = None
    if with_pin:
        pin = typer.prompt("PIN", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline().strip()
    kb = _with_app(settings)
    try:
        new = register_identity(
            kb.service, kb.store, individual_id=individual_id, email=email, phone=phone, name=name, pin=pin
        )
        subject = id_hmac_subject(kb.service.id_hmac(individual_id))
        _audit_admin(kb.store, admin_event(datetime.now(UTC), "identities_add", subject=subject))
    except (KeyBinderError, ValueError) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    typer.echo("added" if new else "updated")


def _audit_rows(store: Store) -> Iterator[AuditRow]:
    """Every entry, ordered by chain then seq, read a page at a time."""
    from server.audit import PAGE_ROWS

    after: tuple[bytes, int] | None = None
    while page := store.audit_rows(after, PAGE_ROWS):
        yield from page
        after = (page[-1].chain_key, page[-1].seq)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Recompute every hash chain; name the first broken link of each broken chain (exit status 1)."""
    from server.audit import verify_chains
    from server.ports import BackendUnavailable
    from server.stores import open_store

    settings = _settings(config, data_dir, database_url, None)
    store = open_store(settings.database)
    try:
        report = verify_chains(_audit_rows(store))
    except BackendUnavailable as err:
        raise _fail(err) from err
    finally:
        store.close()
    if report.broken:
        typer.echo(f"audit trail BROKEN: {len(report.broken)} of {report.chains} chain(s), {report.entries} entries")
        for link in report.broken:
            typer.echo(f"first broken link: {link}")
        raise typer.Exit(1)
    typer.echo(f"audit trail intact: {report.entries} entries in {report.chains} chain(s)")


@audit_app.command("export")
def audit_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write [default: stdout].")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Write every entry as one JSON object per line, ordered by chain then seq."""
    from server.ports import BackendUnavailable
    from server.stores import open_store

    settings = _settings(config, data_dir, database_url, None)
    store = open_store(settings.database)
    try:
        with output.open("w", encoding="utf-8") if output is not None else _stdout() as out:
            for row in _audit_rows(store):
                out.write(json.dumps(row.to_json(), sort_keys=True) + "\n")
    except (BackendUnavailable, OSError) as err:
        raise _fail(err) from err
    finally:
        store.close()


def _stdout() -> Any:
    from contextlib import nullcontext

    return nullcontext(sys.stdout)


@app.command()
def demo(
    target: Annotated[str, typer.Option(help="Server address.")] = "127.0.0.1:50051",
    individual_id: Annotated[str, typer.Option(help="A registered individual.")] = "1234567890",
    partner: Annotated[str, typer.Option(help="partner-id header.")] = "demo-wallet",
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-2048 or ed25519.")] = "ec-p256",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Walk through a binding against a running server: OTP from the outbox, bind, print the certificate."""
    from server.demo import run_demo

    settings = _settings(config, data_dir, None, None)
    sys.exit(run_demo(target, individual_id, partner, key_type, settings.outbox))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
