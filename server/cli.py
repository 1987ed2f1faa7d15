"""The `keybinder` command line: init, serve, issuer, keys, identities, demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from server.config import Settings, load_settings

# Rich tracebacks with locals would print PINs and OTPs held in local variables.
app = typer.Typer(
    help="KeyBinder: bind individuals' IDs to wallet keys with HSM-signed certificates.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
issuer_app = typer.Typer(help="Issuer certificates.", no_args_is_help=True)
identities_app = typer.Typer(help="The identity registry.", no_args_is_help=True)
keys_app = typer.Typer(help="Issuer key lifecycle: list, rotate, import a CA-signed certificate.", no_args_is_help=True)
app.add_typer(issuer_app, name="issuer")
app.add_typer(keys_app, name="keys")
app.add_typer(identities_app, name="identities")

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
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    return settings


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


@app.command()
def init(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None, hsm_uri: HsmOpt = None
) -> None:
    """Create (idempotently) the token, HMAC key, issuer key and certificate, and the database."""
    from hsm import HsmError
    from server.app import initialise

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        report = initialise(settings)
    except (HsmError, RuntimeError, OSError) as err:
        raise _fail(err) from err
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
) -> None:
    """Serve keybinder.v1.KeyBinderService (plus health and reflection) until SIGTERM."""
    from hsm import HsmError
    from server.serve import serve as run
    from server.workers import run_workers

    if port is not None and listen is None:
        listen = f"127.0.0.1:{port}"
    settings = _settings(config, data_dir, database_url, hsm_uri, listen=listen, workers=workers)
    count = settings.workers or os.cpu_count() or 1

    def ready(bound: int) -> None:
        # One machine-readable line on stdout so scripts (and tests) can find a port-0 server.
        suffix = f" ({count} workers)" if count > 1 else ""
        print(f"keybinder listening on {settings.host_port[0]}:{bound}{suffix}", flush=True)

    try:
        if count == 1:
            asyncio.run(run(settings, ready))
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
        chain = issuer_chain_pem(store, rotation_window_days=settings.issuer_rotation_window_days)
    finally:
        store.close()
    if not chain:
        raise _fail(RuntimeError("no valid issuer certificate; run `keybinder init` or `keybinder keys rotate`"))
    typer.echo(chain, nl=False)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Every issuer key with its state: pending, next, active, retiring or expired."""
    from server.app import issuer_key_statuses

    settings = _settings(config, data_dir, database_url, None)
    statuses = issuer_key_statuses(settings)
    if not statuses:
        raise _fail(RuntimeError("no issuer key; run `keybinder init`"))

    def when(t: datetime | None) -> str:
        return f"{t:%Y-%m-%dT%H:%M:%SZ}" if t is not None else "-"

    rows = [("LABEL", "STATE", "KIND", "NOT BEFORE", "NOT AFTER")]
    rows += [(s.key_label, str(s.state), s.key_kind, when(s.not_before), when(s.not_after)) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as err:
        raise _fail(RuntimeError(f"not an ISO 8601 time: {value!r}")) from err


@keys_app.command("rotate")
def keys_rotate(
    csr: Annotated[
        Path | None, typer.Option("--csr", help="Write a CSR for an external CA here; the key stays pending.")
    ] = None,
    not_before: Annotated[
        str | None,
        typer.Option("--not-before", help="Self-signed only: start signing at this ISO 8601 time [default: now]."),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Generate a new issuer key on the HSM and its self-signed certificate (or a CSR)."""
    from hsm import HsmError
    from server.app import IssuerKeyError, rotate_issuer
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        report = rotate_issuer(settings, csr_path=csr, not_before=_when(not_before))
    except (IssuerKeyError, HsmError, BackendUnavailable, OSError) as err:
        raise _fail(err) from err
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
        str | None, typer.Option("--label", help="The pending key [default: the one whose key matches].")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Install the CA-signed certificate of a key made with `keys rotate --csr`."""
    from hsm import HsmError
    from server.app import IssuerKeyError, import_issuer_certificate
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        report = import_issuer_certificate(settings, certificate, chain_path=chain, label=label)
    except (IssuerKeyError, HsmError, BackendUnavailable) as err:
        raise _fail(err) from err
    typer.echo(f"installed issuer key {report.key_label!r} ({report.state}) until {report.not_after:%Y-%m-%d}")


@keys_app.command("csr")
def keys_csr(
    label: Annotated[str, typer.Argument(help="A pending key's label.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Print the CSR of a pending key again."""
    from server.app import IssuerKeyError, pending_csr

    settings = _settings(config, data_dir, database_url, None)
    try:
        typer.echo(pending_csr(settings, label), nl=False)
    except IssuerKeyError as err:
        raise _fail(err) from err


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
    except (KeyBinderError, ValueError) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    typer.echo("added" if new else "updated")


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
