"""The `keybinder` command line: init, serve, issuer, keys, identities, partners, audit, demo.

One module per command group; the options every command shares (--config, --data-dir, --database-url,
--hsm-uri) and the one place that turns them into Settings are in common.py. They stay options of each
command (not of the root), so `keybinder identities import F --data-dir D` keeps working.
"""

from __future__ import annotations

import sys

import typer

from server.cli.audit import audit_app
from server.cli.identities import identities_app
from server.cli.keys import issuer_app, keys_app
from server.cli.partners import partners_app
from server.cli.server_cmds import demo, init, migrate, serve

# Rich tracebacks with locals would print PINs and OTPs held in local variables.
app = typer.Typer(
    help="KeyBinder: bind individuals' IDs to wallet keys with HSM-signed certificates.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(issuer_app, name="issuer")
app.add_typer(keys_app, name="keys")
app.add_typer(identities_app, name="identities")
app.add_typer(audit_app, name="audit")
app.add_typer(partners_app, name="partners")
for command in (init, migrate, serve, demo):
    app.command()(command)


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


__all__ = ["app", "main"]
