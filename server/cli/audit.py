"""The hash-chained audit trail: `keybinder audit verify|sign|export`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from server.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DbOpt,
    HsmOpt,
    fail,
    settings_for,
    with_app,
)

if TYPE_CHECKING:
    from server.audit import AuditRow
    from server.stores import Store

audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)


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
        raise fail(RuntimeError(f"cannot read signed heads from {path}: {err}")) from err


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

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    exported = _read_heads(heads_file) if heads_file is not None else []
    store = open_store(settings.database)
    kb = None
    try:
        heads = _newest_heads(store.audit_heads(), exported)
        if heads:  # only the HSM can check a head's MAC
            try:
                kb = with_app(settings)
            except (HsmError, BackendUnavailable, OSError) as err:
                raise fail(RuntimeError(f"the signed heads need the HSM to be checked: {err}")) from err
        hasher = kb.service.hasher if kb is not None else None
        report = verify_chains(
            _audit_rows(store), heads, (lambda h: head_mac_ok(hasher, h)) if hasher is not None else None
        )
    except BackendUnavailable as err:
        raise fail(err) from err
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

    settings = settings_for(config, data_dir, database_url, hsm_uri)
    try:
        kb = with_app(settings)
    except (HsmError, BackendUnavailable, OSError) as err:
        raise fail(err) from err
    try:
        signed = kb.sweeper().sign_all(datetime.now(UTC))
        heads = kb.store.audit_heads()
        if output is not None:
            with output.open("a", encoding="utf-8") as out:
                for head in heads:
                    out.write(json.dumps(head.to_json(), sort_keys=True) + "\n")
    except (BackendUnavailable, HsmError, OSError) as err:
        raise fail(err) from err
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

    settings = settings_for(config, data_dir, database_url, None)
    store = open_store(settings.database)
    try:
        with output.open("w", encoding="utf-8") if output is not None else _stdout() as out:
            for row in _audit_rows(store):
                out.write(json.dumps(row.to_json(), sort_keys=True) + "\n")
    except (BackendUnavailable, OSError) as err:
        raise fail(err) from err
    finally:
        store.close()


def _stdout() -> Any:
    from contextlib import nullcontext

    return nullcontext(sys.stdout)
