"""What every command shares: the common options (--config, --data-dir, --database-url, --hsm-uri) as
Annotated aliases, the one place that turns them into Settings, and the one-line error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from server.config import Settings, config_path, explain, load_settings
from server.logs import configure_logging
from server.stores import sqlite_path

if TYPE_CHECKING:
    from server.audit import AuditEvent
    from server.stores import Store

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


def settings_for(
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
        raise fail(RuntimeError(f"no KeyBinder state {where} — run `keybinder init`"))


def fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


def audit_admin(store: Store, event: AuditEvent) -> None:
    """Append an admin action's entry; the action is done, so a failure here says exactly that."""
    try:
        store.append_audit(event)
    except Exception as err:
        raise fail(RuntimeError(f"{event.action} succeeded, but its audit entry was not written: {err}")) from err


def table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def with_app(settings: Settings) -> Any:
    from server.app import build_app

    return build_app(settings)
