"""The server's life: init, migrate, serve, and the demo client against a running server."""

from __future__ import annotations

import asyncio
import enum
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from server.cli.common import (
    ConfigOpt,
    DataDirOpt,
    DbOpt,
    HsmOpt,
    audit_admin,
    fail,
    settings_for,
)

if TYPE_CHECKING:
    pass


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
    from server.provisioning import initialise

    settings = settings_for(config, data_dir, database_url, hsm_uri, state=False)
    from server.audit import admin_event
    from server.stores import open_store

    try:
        report = initialise(settings, demo_partner=demo_partner)
    except (HsmError, RuntimeError, OSError) as err:
        raise fail(err) from err
    store = open_store(settings.database)
    try:
        summary = f"{len(report.created)} created, {len(report.reused)} reused"
        audit_admin(store, admin_event(datetime.now(UTC), "init", subject=summary))
    finally:
        store.close()
    for item in report.created:
        typer.echo(f"created  {item}")
    for item in report.reused:
        typer.echo(f"reused   {item}")


def migrate(config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Apply pending database schema migrations."""
    from server.stores import migrate as run_migrations

    settings = settings_for(config, data_dir, database_url, None)
    typer.echo(f"applied {run_migrations(settings.database)} migration(s)")


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
    settings = settings_for(
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
        raise fail(err) from err
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
        raise fail(err) from err


class Channel(enum.StrEnum):
    EMAIL = "email"
    PHONE = "phone"


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

    settings = settings_for(config, data_dir, None, None, state=False)
    key_path = partner_key_file or settings.demo_partner_key_file
    try:
        api_key = key_path.read_text().strip()
    except OSError as err:
        hint = " — run `keybinder init --demo-partner`" if partner_key_file is None else ""
        raise fail(RuntimeError(f"cannot read the partner API key from {key_path}: {err.strerror}{hint}")) from err
    if (client_cert is None) != (client_key is None):
        raise fail(RuntimeError("--client-cert and --client-key go together"))
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
