"""The `keybinder` command line: init, serve, issuer, keys, identities, partners, audit, demo."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from server.config import Settings, config_path, explain, load_settings
from server.logs import configure_logging
from server.stores import sqlite_path

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
keys_app = typer.Typer(help="Issuer key lifecycle: list, rotate, import a CA-signed certificate.", no_args_is_help=True)
app.add_typer(issuer_app, name="issuer")
app.add_typer(keys_app, name="keys")
app.add_typer(identities_app, name="identities")
audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
partners_app = typer.Typer(help="Binding partners and their API keys.", no_args_is_help=True)
app.add_typer(partners_app, name="partners")
alias_app = typer.Typer(
    help="Aliases of an individual (a UIN, VIDs): any active one works as the ID.", no_args_is_help=True
)
identities_app.add_typer(alias_app, name="alias")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file (or $KEYBINDER_CONFIG).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="State directory.", show_default=".keybinder")]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="sqlite:///path or postgresql://user@host/db.", show_default="<data-dir>/keybinder.db"
    ),
]
HsmOpt = Annotated[
    str | None,
    typer.Option("--hsm-uri", help="RFC 7512 URI, e.g. pkcs11:token=t;object=k?module-path=...&pin-source=file:/p"),
]


def _settings(
    config: Path | None, data_dir: Path | None, db: str | None, hsm: str | None, *, state: bool = True, **extra: Any
) -> Settings:
    """The settings, or one line naming what is wrong (exit 2); with ``state``, also the state `init` makes."""
    flags = {"data_dir": data_dir, "database_url": db, "hsm_uri": hsm, **extra}
    try:
        settings = load_settings(config, **flags)
    except ValidationError as err:
        given = {name for name, value in flags.items() if value is not None}
        typer.echo(f"configuration error: {explain(err, config_path(config), given)}", err=True)
        raise typer.Exit(2) from err
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"configuration error: {err}", err=True)
        raise typer.Exit(2) from err
    configure_logging(settings.log_level, settings.log_format)
    if state:
        _require_state(settings)
    return settings


def _require_state(settings: Settings) -> None:
    """Refuse, in one line, to work on a data directory or SQLite database that `keybinder init` never made
    (a mistyped --data-dir would otherwise surface as a traceback, or as a new empty database)."""
    path = sqlite_path(settings.database)
    if path is not None and not path.is_file():
        where = f"in {settings.data_dir}" if path.parent == settings.data_dir else f"at {path}"
        raise _fail(RuntimeError(f"no KeyBinder state {where} — run `keybinder init`"))


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
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
    demo_partner: Annotated[
        bool,
        typer.Option(
            "--demo-partner", help="Also register partner demo-wallet, its key in <data-dir>/demo-partner.key."
        ),
    ] = False,
) -> None:
    """Create (idempotently) the token, HMAC key, issuer key and certificate, and the database."""
    from hsm import HsmError
    from server.app import initialise

    settings = _settings(config, data_dir, database_url, hsm_uri, state=False)
    from server.audit import admin_event
    from server.stores import open_store

    try:
        report = initialise(settings, demo_partner=demo_partner)
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
    listen: Annotated[str | None, typer.Option("--listen", help="host:port.", show_default="127.0.0.1:50051")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port on the default host; 0 picks a free one.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Serving processes sharing the port.", show_default="one per CPU")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve Prometheus /metrics on this port.", show_default="off")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate chain (TLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    client_ca: Annotated[
        Path | None, typer.Option("--client-ca", help="PEM CA bundle; clients must present a certificate (mTLS).")
    ] = None,
    allow_plaintext: Annotated[
        bool | None,
        typer.Option("--allow-plaintext", help="Allow plaintext on a non-loopback address (behind a TLS proxy)."),
    ] = None,
) -> None:
    """Serve keybinder.v1.KeyBinderService (plus health and reflection) until SIGTERM; SIGHUP reloads
    the TLS certificate and clears the partner cache."""
    from hsm import HsmError
    from server.process import StartupError, raise_descriptor_limit
    from server.serve import check_start
    from server.serve import serve as run
    from server.tls import TlsConfigError
    from server.workers import run_workers

    if port is not None and listen is None:
        listen = f"127.0.0.1:{port}"
    settings = _settings(
        config,
        data_dir,
        database_url,
        hsm_uri,
        listen=listen,
        workers=workers,
        metrics_port=metrics_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        client_ca=client_ca,
        allow_plaintext=allow_plaintext,
    )
    try:
        # Everything checked here, once, before a worker starts: a mistake is one line and a non-zero exit,
        # never a worker restarted forever or a server "listening" that can only answer NOT_SERVING.
        check_start(settings)
    except TlsConfigError as err:
        typer.echo(f"configuration error: {err}", err=True)
        raise typer.Exit(2) from err
    except StartupError as err:
        raise _fail(err) from err
    raise_descriptor_limit()  # workers inherit it
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
    except (HsmError, OSError, StartupError) as err:
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
    _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
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
        typer.Option("--not-before", help="Self-signed only: start signing at this ISO 8601 time.", show_default="now"),
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
        str | None, typer.Option("--label", help="The pending key.", show_default="the one whose key matches")
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
    file: Annotated[
        Path,
        typer.Argument(
            help='JSON array of {"individual_id","email","phone","pin","name","kbi":{field: answer},'
            '"aliases":[{"id","type","expires_at"}]}.'
        ),
    ],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Import identities in one transaction; the ID, its aliases, the PIN and KBI attributes are stored only as
    HSM-keyed HMACs."""
    import sqlite3

    from server.aliases import Alias, AliasConflict, check_alias, check_alias_free
    from server.app import identity_record
    from server.audit import Outcome, admin_event
    from server.errors import KeyBinderError
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        entries = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(RuntimeError(f"cannot read {file}: {err}")) from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _fail(RuntimeError("the file must hold a JSON array of objects"))
    allowed = {"individual_id", "email", "phone", "pin", "name", "kbi", "aliases"}
    for index, entry in enumerate(entries):
        unknown = set(entry) - allowed
        if unknown or not isinstance(entry.get("individual_id"), str):
            raise _fail(RuntimeError(f"entry {index}: needs a string individual_id; unknown keys {sorted(unknown)}"))
        for key in allowed - {"individual_id", "kbi", "aliases"}:
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise _fail(RuntimeError(f"entry {index}: {key} must be a string"))
        kbi = entry.get("kbi")
        if kbi is not None and not (isinstance(kbi, dict) and all(isinstance(v, str) for v in kbi.values())):
            raise _fail(RuntimeError(f"entry {index}: kbi must be an object of field id to answer (strings)"))
    import_now = datetime.now(UTC)
    aliases = _import_aliases(entries, import_now)
    kb = _with_app(settings)
    try:
        # Every entry is checked (and its HMACs made) before anything is written: a bad file imports nothing.
        records = []
        answers: list[dict[str, bytes] | None] = []
        new_aliases: list[Alias] = []
        for index, entry in enumerate(entries):
            try:
                record = identity_record(
                    kb.service,
                    individual_id=entry["individual_id"],
                    email=entry.get("email"),
                    phone=entry.get("phone"),
                    name=entry.get("name"),
                    pin=entry.get("pin"),
                    kbi=entry.get("kbi"),
                )
                if kb.service.resolve(entry["individual_id"]) != record.id_hmac:
                    raise ValueError("this ID is an alias of a registered individual; revoke the alias first")
                records.append(record)
                answers.append(kb.service.kbi_hmacs(record.id_hmac, entry["kbi"]) if entry.get("kbi") else None)
                for alias_id, alias_type, expires_at in aliases[index]:
                    check_alias(
                        kb.service, individual_id=entry["individual_id"], alias_id=alias_id, alias_type=alias_type
                    )
                    check_alias_free(
                        kb.service, kb.store, individual_id=entry["individual_id"], alias_id=alias_id, now=import_now
                    )
                    new_aliases.append(
                        Alias(kb.service.id_hmac(alias_id), record.id_hmac, alias_type, import_now, expires_at)
                    )
            except (KeyBinderError, ValueError) as err:
                raise _fail(RuntimeError(f"entry {index}: {err}")) from err
        # One transaction, with its audit entry: a full disk or a lost database imports nothing at all.
        try:
            added, updated = kb.store.upsert_identities(
                records,
                kbi=answers,
                aliases=new_aliases,
                audit=lambda new, changed: admin_event(
                    datetime.now(UTC), "identities_import", subject=f"{new} new, {changed} updated"
                ),
            )
        except AliasConflict as err:
            raise _fail(RuntimeError(f"nothing was imported: {err}")) from err
        except (BackendUnavailable, sqlite3.Error, OSError) as err:
            cause = f"{type(err).__name__}: {err}" if not isinstance(err, BackendUnavailable) else str(err)
            cause = cause.splitlines()[0] if cause else type(err).__name__  # the database's CONTEXT lines: logs
            with contextlib.suppress(Exception):  # the disk may still be full: the error line says it all
                kb.store.append_audit(
                    admin_event(
                        datetime.now(UTC),
                        "identities_import",
                        Outcome.ERROR,
                        subject=f"{len(records)} entries, nothing imported",
                    )
                )
            raise _fail(
                RuntimeError(
                    f"import failed, nothing was imported ({cause}); fix the database (disk space, permissions)"
                    " and run the import again"
                )
            ) from err
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
    with_kbi: Annotated[
        bool,
        typer.Option(
            "--with-kbi",
            help="Read an answer to each configured KBI field (kbi_fields) from the terminal, or one line each"
            " from stdin (after the PIN line with --with-pin).",
        ),
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Add or update one identity. The PIN and KBI answers are never taken on the command line."""
    from server.app import register_identity
    from server.audit import admin_event, id_hmac_subject
    from server.errors import KeyBinderError

    settings = _settings(config, data_dir, database_url, hsm_uri)
    pin = None
    if with_pin:
        pin = _read_secret_line("PIN")
    kbi: dict[str, str] | None = None
    if with_kbi:
        if not settings.kbi_fields:
            raise _fail(RuntimeError("--with-kbi: no kbi_fields are configured (see docs/auth-factors.md)"))
        kbi = {}
        for field in settings.kbi_fields:
            if field.id == settings.kbi_individual_id_field:
                continue  # the ID, not a question
            hint = f" ({field.format or 'yyyy-MM-dd'})" if field.type == "date" else ""
            kbi[field.id] = _read_secret_line(f"KBI {field.id}{hint}", strip=field.type == "date")
    kb = _with_app(settings)
    try:
        new = register_identity(
            kb.service, kb.store, individual_id=individual_id, email=email, phone=phone, name=name, pin=pin, kbi=kbi
        )
        subject = id_hmac_subject(kb.service.id_hmac(individual_id))
        _audit_admin(kb.store, admin_event(datetime.now(UTC), "identities_add", subject=subject))
    except (KeyBinderError, ValueError) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    typer.echo("added" if new else "updated")


def _read_secret_line(prompt: str, *, strip: bool = True) -> str:
    """A secret from the terminal (not echoed) or one line of stdin; never from argv."""
    if sys.stdin.isatty():
        value: str = typer.prompt(prompt, hide_input=True)
        return value.strip() if strip else value
    line = sys.stdin.readline().rstrip("\r\n")
    return line.strip() if strip else line


def _import_aliases(entries: list[dict[str, Any]], now: datetime) -> list[list[tuple[str, str, datetime | None]]]:
    """Each entry's aliases as (id, type, expiry), their shape checked; no alias twice in one file."""
    from server.aliases import parse_expiry

    seen = {e["individual_id"] for e in entries}
    result: list[list[tuple[str, str, datetime | None]]] = []
    for index, entry in enumerate(entries):
        given = entry.get("aliases") or []
        if not isinstance(given, list):
            raise _fail(RuntimeError(f"entry {index}: aliases must be an array"))
        parsed: list[tuple[str, str, datetime | None]] = []
        for alias in given:
            if (
                not isinstance(alias, dict)
                or set(alias) - {"id", "type", "expires_at"}
                or not isinstance(alias.get("id"), str)
                or not isinstance(alias.get("type"), str)
                or not isinstance(alias.get("expires_at"), str | None)
            ):
                raise _fail(RuntimeError(f'entry {index}: an alias is {{"id", "type", "expires_at"}} (strings)'))
            if alias["id"] in seen:
                raise _fail(RuntimeError(f"entry {index}: an alias appears twice, or is also an individual_id"))
            seen.add(alias["id"])
            try:
                parsed.append((alias["id"], alias["type"], parse_expiry(alias.get("expires_at"), now)))
            except ValueError as err:
                raise _fail(RuntimeError(f"entry {index}: {err}")) from err
        result.append(parsed)
    return result


@alias_app.command("add")
def alias_add(
    individual_id: Annotated[str, typer.Argument(help="The individual's canonical ID.")],
    alias_id: Annotated[str, typer.Argument(help="The alias, e.g. a VID.")],
    alias_type: Annotated[str, typer.Option("--type", help="UIN, VID or another upper-case word.")] = "VID",
    expires_at: Annotated[
        str | None, typer.Option("--expires-at", help="ISO 8601 time with zone [default: never].")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Give a registered individual an alias: any request may name them by it until it expires or is revoked."""
    from server.aliases import add_alias, parse_expiry
    from server.audit import admin_event, id_hmac_subject
    from server.errors import KeyBinderError
    from server.ports import BackendUnavailable, StoreConflict

    settings = _settings(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    try:
        expiry = parse_expiry(expires_at, now)
    except ValueError as err:
        raise _fail(err) from err
    kb = _with_app(settings)
    try:
        alias = add_alias(
            kb.service,
            kb.store,
            individual_id=individual_id,
            alias_id=alias_id,
            alias_type=alias_type,
            expires_at=expiry,
            now=now,
        )
        _audit_admin(kb.store, admin_event(now, "alias_add", subject=id_hmac_subject(alias.id_hmac)))
    except (KeyBinderError, ValueError, StoreConflict, BackendUnavailable) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    typer.echo(f"added {alias_type} alias")


@alias_app.command("revoke")
def alias_revoke(
    alias_id: Annotated[str, typer.Argument(help="The alias to revoke (it is never usable again).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Revoke an alias for good: from now on it answers exactly like an unknown ID."""
    from server.aliases import revoke_alias
    from server.audit import admin_event
    from server.errors import KeyBinderError
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    kb = _with_app(settings)
    try:
        found = revoke_alias(kb.service, kb.store, alias_id=alias_id, now=now)
        if found:
            _audit_admin(kb.store, admin_event(now, "alias_revoke"))
    except (KeyBinderError, ValueError, BackendUnavailable) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    if not found:
        raise _fail(RuntimeError("no such alias, or it is revoked already"))
    typer.echo("revoked")


@alias_app.command("list")
def alias_list(
    individual_id: Annotated[str, typer.Argument(help="The individual's canonical ID.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """The individual's aliases: type, state, expiry and a reference (a prefix of the HMAC, never the ID)."""
    from server.aliases import aliases_of
    from server.errors import KeyBinderError
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    kb = _with_app(settings)
    try:
        found = aliases_of(kb.service, kb.store, individual_id=individual_id)
    except (KeyBinderError, ValueError, BackendUnavailable) as err:
        raise _fail(err) from err
    finally:
        kb.close()

    def when(t: datetime | None) -> str:
        return f"{t:%Y-%m-%dT%H:%M:%SZ}" if t is not None else "-"

    rows = [("TYPE", "STATE", "EXPIRES", "CREATED", "REF")]
    rows += [
        (a.alias_type, a.state_at(now), when(a.expires_at), when(a.created_at), a.alias_hmac.hex()[:12]) for a in found
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _audit_rows(store: Store) -> Iterator[AuditRow]:
    """Every entry, ordered by chain then seq, read a page at a time."""
    from server.audit import PAGE_ROWS

    after: tuple[bytes, int] | None = None
    while page := store.audit_rows(after, PAGE_ROWS):
        yield from page
        after = (page[-1].chain_key, page[-1].seq)


def _newest_heads(*sources: Any) -> list[Any]:
    """One head per chain: the newest among the database's and any exported file's."""
    newest: dict[bytes, Any] = {}
    for heads in sources:
        for head in heads:
            if head.chain_key not in newest or head.seq > newest[head.chain_key].seq:
                newest[head.chain_key] = head
    return list(newest.values())


def _read_heads(path: Path) -> list[Any]:
    from server.audit import SignedHead

    try:
        return [SignedHead.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError) as err:
        raise _fail(RuntimeError(f"cannot read signed heads from {path}: {err}")) from err


@audit_app.command("verify")
def audit_verify(
    heads_file: Annotated[
        Path | None,
        typer.Option("--heads", help="Signed heads exported by `audit sign -o` (kept off the database) to check too."),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Recompute every hash chain and check it against its HSM-signed head; name the first broken link of
    each broken chain (exit status 1)."""
    from hsm import HsmError
    from server.audit import verify_chains
    from server.ports import BackendUnavailable
    from server.stores import open_store
    from server.sweeper import head_mac_ok

    settings = _settings(config, data_dir, database_url, hsm_uri)
    exported = _read_heads(heads_file) if heads_file is not None else []
    store = open_store(settings.database)
    kb = None
    try:
        heads = _newest_heads(store.audit_heads(), exported)
        if heads:  # only the HSM can check a head's MAC
            try:
                kb = _with_app(settings)
            except (HsmError, BackendUnavailable, OSError) as err:
                raise _fail(RuntimeError(f"the signed heads need the HSM to be checked: {err}")) from err
        hasher = kb.service.hasher if kb is not None else None
        report = verify_chains(
            _audit_rows(store), heads, (lambda h: head_mac_ok(hasher, h)) if hasher is not None else None
        )
    except BackendUnavailable as err:
        raise _fail(err) from err
    finally:
        store.close()
        if kb is not None:
            kb.close()
    if report.broken:
        typer.echo(f"audit trail BROKEN: {len(report.broken)} of {report.chains} chain(s), {report.entries} entries")
        for link in report.broken:
            typer.echo(f"first broken link: {link}")
        raise typer.Exit(1)
    typer.echo(
        f"audit trail intact: {report.entries} entries in {report.chains} chain(s); {report.signed_heads} signed"
        f" head(s) verified, {report.unsigned_entries} entries newer than their chain's last signed head"
    )


@audit_app.command("sign")
def audit_sign(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Append the signed heads to this file (JSON lines).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    hsm_uri: HsmOpt = None,
) -> None:
    """Sign every chain's head now with the HSM (servers do it every sweep_interval_seconds); with -o, export
    the heads, so that a copy lives off the database."""
    from hsm import HsmError
    from server.ports import BackendUnavailable

    settings = _settings(config, data_dir, database_url, hsm_uri)
    try:
        kb = _with_app(settings)
    except (HsmError, BackendUnavailable, OSError) as err:
        raise _fail(err) from err
    try:
        signed = kb.sweeper().sign_all(datetime.now(UTC))
        heads = kb.store.audit_heads()
        if output is not None:
            with output.open("a", encoding="utf-8") as out:
                for head in heads:
                    out.write(json.dumps(head.to_json(), sort_keys=True) + "\n")
    except (BackendUnavailable, HsmError, OSError) as err:
        raise _fail(err) from err
    finally:
        kb.close()
    typer.echo(f"signed {signed} chain head(s); {len(heads)} signed head(s) in the database")


@audit_app.command("export")
def audit_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")] = None,
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


@contextlib.contextmanager
def _partner_store(settings: Settings) -> Iterator[Any]:
    """The store, closed afterwards; a refused change or an unreachable database is a clean error (exit 1)."""
    from server.ports import BackendUnavailable, StoreConflict
    from server.stores import open_store

    store = open_store(settings.database)
    try:
        yield store
    except (ValueError, StoreConflict) as err:
        raise _fail(err) from err
    except BackendUnavailable as err:
        raise _fail(RuntimeError(f"{err} (has `keybinder init` been run?)")) from err
    finally:
        store.close()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _read_cert_fingerprint(path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from server.partners import certificate_fingerprint

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise _fail(RuntimeError(f"cannot read a PEM certificate from {path}")) from err
    return certificate_fingerprint(cert.public_bytes(serialization.Encoding.PEM))


def _audit_partner_change(store: Store, action: str, partner_id: str) -> None:
    """Every change to the partner registry is an admin entry of the audit trail (never a key)."""
    from server.audit import admin_event

    _audit_admin(store, admin_event(_now(), action, subject=f"partner {partner_id}"))


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

    settings = _settings(config, data_dir, database_url, None)
    fingerprint = _read_cert_fingerprint(client_cert) if client_cert is not None else None
    with _partner_store(settings) as store:
        issued = add_partner(store, partner_id, _now(), client_cert_sha256=fingerprint)
        _audit_partner_change(store, "partners_add", partner_id)
    _show_key(issued)


@partners_app.command("list")
def partners_list(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """List partners: id, state, client certificate fingerprint, last change (never keys)."""
    settings = _settings(config, data_dir, database_url, None)
    with _partner_store(settings) as store:
        partners = store.list_partners()
    rows = [("PARTNER", "STATE", "CLIENT CERT SHA-256", "UPDATED")]
    for p in partners:
        state = "enabled" if p.enabled else "disabled"
        rows.append((p.partner_id, state, p.client_cert_sha256 or "-", f"{p.updated_at:%Y-%m-%dT%H:%M:%SZ}"))
    _table(rows)


def _set_enabled(partner_id: str, enabled: bool, settings: Settings) -> None:
    with _partner_store(settings) as store:
        found = store.set_partner_enabled(partner_id, enabled, _now())
        if found:
            _audit_partner_change(store, "partners_enable" if enabled else "partners_disable", partner_id)
    if not found:
        raise _fail(RuntimeError(f"no partner {partner_id!r}"))
    typer.echo(f"{'enabled' if enabled else 'disabled'} {partner_id}")


@partners_app.command("disable")
def partners_disable(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Refuse the partner's requests (running servers within partner_cache_seconds, or at once on SIGHUP)."""
    _set_enabled(partner_id, False, _settings(config, data_dir, database_url, None))


@partners_app.command("enable")
def partners_enable(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Accept a disabled partner again."""
    _set_enabled(partner_id, True, _settings(config, data_dir, database_url, None))


@partners_app.command("rotate-key")
def partners_rotate_key(
    partner_id: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Issue a new API key (printed once); the old key stops working."""
    from server.partners import rotate_key

    settings = _settings(config, data_dir, database_url, None)
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
    settings = _settings(config, data_dir, database_url, None)
    fingerprint = _read_cert_fingerprint(client_cert) if client_cert is not None else None
    with _partner_store(settings) as store:
        found = store.set_partner_certificate(partner_id, fingerprint, _now())
        if found:
            _audit_partner_change(store, "partners_set_cert", partner_id)
    if not found:
        raise _fail(RuntimeError(f"no partner {partner_id!r}"))
    typer.echo(f"{partner_id} certificate {'sha256=' + fingerprint if fingerprint else 'removed'}")


class Channel(enum.StrEnum):
    EMAIL = "email"
    PHONE = "phone"


@app.command()
def demo(
    target: Annotated[
        str | None, typer.Option(help="Server address.", show_default="the listen setting, 127.0.0.1:50051")
    ] = None,
    channel: Annotated[
        list[Channel] | None,
        typer.Option("--channel", help="Where the OTP goes; repeat for both.", show_default="email and phone"),
    ] = None,
    individual_id: Annotated[str, typer.Option(help="A registered individual.")] = "1234567890",
    partner: Annotated[str, typer.Option(help="partner-id header.")] = "demo-wallet",
    partner_key_file: Annotated[
        Path | None,
        typer.Option(
            "--partner-key-file", help="File holding the partner's API key.", show_default="<data-dir>/demo-partner.key"
        ),
    ] = None,
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-2048 or ed25519.")] = "ec-p256",
    ca_cert: Annotated[
        Path | None, typer.Option("--ca-cert", help="Connect with TLS, trusting this PEM CA bundle.")
    ] = None,
    client_cert: Annotated[Path | None, typer.Option("--client-cert", help="PEM client certificate (mTLS).")] = None,
    client_key: Annotated[Path | None, typer.Option("--client-key", help="PEM key of --client-cert.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Walk through a binding against a running server: OTP from the outbox, bind, print the certificate."""
    from server.grpc_api.demo import DemoTls, run_demo

    settings = _settings(config, data_dir, None, None, state=False)
    key_path = partner_key_file or settings.demo_partner_key_file
    try:
        api_key = key_path.read_text().strip()
    except OSError as err:
        hint = " — run `keybinder init --demo-partner`" if partner_key_file is None else ""
        raise _fail(RuntimeError(f"cannot read the partner API key from {key_path}: {err.strerror}{hint}")) from err
    if (client_cert is None) != (client_key is None):
        raise _fail(RuntimeError("--client-cert and --client-key go together"))
    tls = DemoTls(ca_cert, client_cert, client_key) if ca_cert is not None else None
    host, port = settings.host_port
    # A server listening on every address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - compared, not bound
    address = target or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    channels = tuple(str(c) for c in dict.fromkeys(channel or (Channel.EMAIL, Channel.PHONE)))
    sys.exit(
        run_demo(
            address, individual_id, partner, key_type, settings.outbox, api_key=api_key, tls=tls, channels=channels
        )
    )


def main() -> None:
    from server.process import owner_only_files

    owner_only_files()  # every command: databases, keys, CSRs and outboxes are created owner-only
    try:
        app()
    except Exception as err:
        # An unreachable database or HSM, or a token that is not there, is the operator's to fix: one line.
        # Anything else is a bug and keeps its traceback.
        from hsm import HsmError
        from server.ports import BackendUnavailable

        if not isinstance(err, HsmError | BackendUnavailable):
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
