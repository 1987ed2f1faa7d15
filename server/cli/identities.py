"""The identity registry: `keybinder identities import|add` and `keybinder identities alias add|revoke|list`."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from server.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DbOpt,
    HsmOpt,
    audit_admin,
    fail,
    settings_for,
    with_app,
)

if TYPE_CHECKING:
    pass

identities_app = typer.Typer(help="The identity registry.", no_args_is_help=True)
alias_app = typer.Typer(
    help="Aliases of an individual (a UIN, VIDs): any active one works as the ID.", no_args_is_help=True
)
identities_app.add_typer(alias_app, name="alias")


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
    from server.audit import Outcome, admin_event
    from server.enrolment import identity_record
    from server.errors import KeyBinderError
    from server.ports import BackendUnavailable

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    try:
        entries = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise fail(RuntimeError(f"cannot read {file}: {err}")) from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise fail(RuntimeError("the file must hold a JSON array of objects"))
    allowed = {"individual_id", "email", "phone", "pin", "name", "kbi", "aliases"}
    for index, entry in enumerate(entries):
        unknown = set(entry) - allowed
        if unknown or not isinstance(entry.get("individual_id"), str):
            raise fail(RuntimeError(f"entry {index}: needs a string individual_id; unknown keys {sorted(unknown)}"))
        for key in allowed - {"individual_id", "kbi", "aliases"}:
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise fail(RuntimeError(f"entry {index}: {key} must be a string"))
        kbi = entry.get("kbi")
        if kbi is not None and not (isinstance(kbi, dict) and all(isinstance(v, str) for v in kbi.values())):
            raise fail(RuntimeError(f"entry {index}: kbi must be an object of field id to answer (strings)"))
    import_now = datetime.now(UTC)
    aliases = _import_aliases(entries, import_now)
    kb = with_app(settings)
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
                raise fail(RuntimeError(f"entry {index}: {err}")) from err
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
            raise fail(RuntimeError(f"nothing was imported: {err}")) from err
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
            raise fail(
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
    from server.audit import admin_event, id_hmac_subject
    from server.enrolment import register_identity
    from server.errors import KeyBinderError

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    pin = None
    if with_pin:
        pin = _read_secret_line("PIN")
    kbi: dict[str, str] | None = None
    if with_kbi:
        if not settings.kbi_fields:
            raise fail(RuntimeError("--with-kbi: no kbi_fields are configured (see docs/auth-factors.md)"))
        kbi = {}
        for field in settings.kbi_fields:
            if field.id == settings.kbi_individual_id_field:
                continue  # the ID, not a question
            hint = f" ({field.format or 'yyyy-MM-dd'})" if field.type == "date" else ""
            kbi[field.id] = _read_secret_line(f"KBI {field.id}{hint}", strip=field.type == "date")
    kb = with_app(settings)
    try:
        new = register_identity(
            kb.service, kb.store, individual_id=individual_id, email=email, phone=phone, name=name, pin=pin, kbi=kbi
        )
        subject = id_hmac_subject(kb.service.id_hmac(individual_id))
        audit_admin(kb.store, admin_event(datetime.now(UTC), "identities_add", subject=subject))
    except (KeyBinderError, ValueError) as err:
        raise fail(err) from err
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
            raise fail(RuntimeError(f"entry {index}: aliases must be an array"))
        parsed: list[tuple[str, str, datetime | None]] = []
        for alias in given:
            if (
                not isinstance(alias, dict)
                or set(alias) - {"id", "type", "expires_at"}
                or not isinstance(alias.get("id"), str)
                or not isinstance(alias.get("type"), str)
                or not isinstance(alias.get("expires_at"), str | None)
            ):
                raise fail(RuntimeError(f'entry {index}: an alias is {{"id", "type", "expires_at"}} (strings)'))
            if alias["id"] in seen:
                raise fail(RuntimeError(f"entry {index}: an alias appears twice, or is also an individual_id"))
            seen.add(alias["id"])
            try:
                parsed.append((alias["id"], alias["type"], parse_expiry(alias.get("expires_at"), now)))
            except ValueError as err:
                raise fail(RuntimeError(f"entry {index}: {err}")) from err
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

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    try:
        expiry = parse_expiry(expires_at, now)
    except ValueError as err:
        raise fail(err) from err
    kb = with_app(settings)
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
        audit_admin(kb.store, admin_event(now, "alias_add", subject=id_hmac_subject(alias.id_hmac)))
    except (KeyBinderError, ValueError, StoreConflict, BackendUnavailable) as err:
        raise fail(err) from err
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

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    kb = with_app(settings)
    try:
        found = revoke_alias(kb.service, kb.store, alias_id=alias_id, now=now)
        if found:
            audit_admin(kb.store, admin_event(now, "alias_revoke"))
    except (KeyBinderError, ValueError, BackendUnavailable) as err:
        raise fail(err) from err
    finally:
        kb.close()
    if not found:
        raise fail(RuntimeError("no such alias, or it is revoked already"))
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

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    now = datetime.now(UTC)
    kb = with_app(settings)
    try:
        found = aliases_of(kb.service, kb.store, individual_id=individual_id)
    except (KeyBinderError, ValueError, BackendUnavailable) as err:
        raise fail(err) from err
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
