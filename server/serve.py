"""The gRPC server process: grpc.aio front; blocking service calls inline on the event loop or on a bounded
thread pool (`rpc_threads`: none by default with SQLite, 8 with PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hsm import HsmError, Pkcs11KeyManager
from server import metrics
from server.app import App, build_app
from server.config import Settings, redact_url
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.decoding import MAX_WIRE_BYTES, add_servicer
from server.grpc_api.servicer import KeyBinderServicer
from server.logs import filter_grpc_logs
from server.process import StartupError, check_address_free, check_private, descriptor_limit
from server.stores import pending_migrations, sqlite_path
from server.tls import ReloadingCredentials, TlsFiles, check_listen, load

log = logging.getLogger(__name__)

#: On SIGTERM the server keeps picking calls up until none has started for this long (see Server._drain).
DRAIN_QUIET_SECONDS = 0.25
#: After the grace period, how long threads still in a call and the HSM/database close get before being left.
RELEASE_SECONDS = 2.0
#: Threads for SendBindingOtp when service calls otherwise run on the event loop (SQLite).
OUTBOUND_THREADS = 8
#: Descriptors kept free of client sockets at least (the server itself uses about 16 at rest).
DESCRIPTOR_RESERVE = 64
MIN_CONNECTIONS = 16
KEEPALIVE_TIMEOUT_MS = 20_000
#: Calls one connection may have in flight; more wait on the client side (HTTP/2 SETTINGS).
MAX_STREAMS_PER_CONNECTION = 100
#: A probe that has not answered by then counts as failed (health NOT_SERVING, breaker open).
PROBE_TIMEOUT_SECONDS = 5.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyBinderService"].full_name


class Server:
    """One serving process: owns its App (HSM login, DB), executor and grpc.aio server."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.app: App | None = None
        self.port: int | None = None
        self.serving = False
        self._reuse_port = reuse_port
        self._server: grpc.aio.Server | None = None
        self._servicer: KeyBinderServicer | None = None
        #: Shutdown steps that did not finish in time (see stop()).
        self.unfinished: list[str] = []
        self._health = health.aio.HealthServicer()
        threads = settings.service_threads
        # None: service calls run on the event loop thread (see Settings.service_threads).
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="keybinder-rpc") if threads else None
        # OTP delivery waits on peers outside: never on the event loop (see KeyBinderServicer.outbound).
        self._outbound_executor = (
            None if self._executor else ThreadPoolExecutor(OUTBOUND_THREADS, thread_name_prefix="keybinder-send")
        )
        # The probe gets its own thread so that a hung HSM call cannot starve it of RPC threads.
        self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="keybinder-probe")
        self._probe_task: asyncio.Task[None] | None = None
        # Maintenance (expired rows, signed audit heads) on a thread of its own: never delays the probe.
        self._sweep_executor = ThreadPoolExecutor(1, thread_name_prefix="keybinder-sweep")
        self._sweep_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.tls: ReloadingCredentials | None = None

    async def start(self) -> int:
        filter_grpc_logs()  # before the first request: grpcio may log raw header values
        if self.settings.metrics_port is not None:
            metrics.enable()  # observability: record RPC and HSM metrics (served by server.metrics)
        host, port = self.settings.host_port
        preflight(self.settings)
        files = tls_files(self.settings)
        self.tls = ReloadingCredentials(files) if files is not None else None
        self.app = build_app(self.settings)
        server = grpc.aio.server(options=server_options(self.settings, reuse_port=self._reuse_port))
        servicer = KeyBinderServicer(
            self.app.service,
            self._executor,
            self.app.partners,
            outbound=self._outbound_executor,
            client_certificates=self.settings.client_ca is not None,
        )
        self._servicer = servicer
        add_servicer(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self.tls is not None:
                bound: int = server.add_secure_port(address, self.tls.credentials())
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as err:  # grpc.aio raises where the sync server returns 0
            bound = 0
            cause: Exception | None = err
        else:
            cause = None
        if bound == 0:
            self.app.close()
            raise OSError(f"cannot listen on {host}:{port} (address in use or not available)") from cause
        await server.start()
        self._server = server
        self.port = bound
        await self._set_serving(True)
        self._probe_task = asyncio.create_task(self._probe_loop(), name="keybinder-health-probe")
        self._sweep_task = asyncio.create_task(self._sweep_loop(), name="keybinder-sweep")
        log.info("listening on %s:%d (%s)", host, bound, "TLS" if self.tls is not None else "plaintext")
        return bound

    def reload(self) -> None:
        """SIGHUP: reread the TLS files at the next handshake and forget cached partners."""
        if self.tls is not None:
            self.tls.request_reload()
        if self.app is not None:
            self.app.partners.invalidate()
            log.info("partner cache cleared")

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)
        if serving != self.serving:
            log.log(logging.INFO if serving else logging.WARNING, "health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving

    async def probe_once(self) -> bool:
        """One HSM signature and one database round trip; updates the health status."""
        assert self.app is not None
        try:
            # Bounded: a database that hangs (frozen, unreachable without a reset) must still turn health
            # NOT_SERVING and open the breaker; the stuck call finishes on its thread when it can.
            await asyncio.wait_for(
                asyncio.wrap_future(self._probe_executor.submit(self.app.probe)), PROBE_TIMEOUT_SECONDS
            )
        except TimeoutError:
            self.app.service.breaker.failed("health probe timed out")
            log.warning("health probe failed: no answer within %.0f s", PROBE_TIMEOUT_SECONDS)
            await self._set_serving(False)
            return False
        except Exception as err:  # any failure means we should not be sent traffic
            log.warning("health probe failed: %s: %s", type(err).__name__, err)
            await self._set_serving(False)
            return False
        await self._set_serving(True)
        return True

    async def _probe_loop(self) -> None:
        interval = self.settings.health_probe_seconds
        backoff = 1.0
        while True:
            if await self.probe_once():
                backoff = 1.0
                await asyncio.sleep(interval)
            else:
                # Each failed probe retries the HSM login; back off so a dead HSM is not hammered.
                await asyncio.sleep(min(backoff, interval))
                backoff = min(backoff * 2, 30.0)

    async def _sweep_loop(self) -> None:
        assert self.app is not None
        sweeper = self.app.sweeper()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            try:
                await loop.run_in_executor(self._sweep_executor, sweeper.run_once, datetime.now(UTC))
            except Exception as err:  # the next run tries again; serving goes on
                log.warning("sweep failed: %s: %s", type(err).__name__, err)

    async def stop(self) -> None:
        """Stop taking RPCs, let in-flight ones finish within the grace period, release all.

        Every step is bounded by the grace period: a thread stuck in a frozen database or HSM must not keep the
        process from exiting (``unfinished`` then names what was left behind; serve() exits regardless).
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        grace = self.settings.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        await self._health.enter_graceful_shutdown()
        # At most half the grace for picking up calls already sent; the rest for those running to finish.
        await self._drain(time.monotonic() + grace / 2)
        await server.stop(max(deadline - time.monotonic(), 0.0))
        # Past the grace, grpc has cancelled every call; threads still inside one get a moment more, then are
        # left behind (they are only waiting on a peer: nothing half-written is committed by leaving).
        release_by = max(deadline, time.monotonic()) + RELEASE_SECONDS
        # Never waited for: a sweep stuck on a hung database must not hold up the shutdown.
        self._sweep_executor.shutdown(wait=False, cancel_futures=True)
        executors = [e for e in (self._executor, self._outbound_executor, self._probe_executor) if e is not None]
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)

        def join_threads() -> None:
            for executor in executors:
                executor.shutdown(wait=True)

        steps: list[tuple[str, Callable[[], None]]] = [("threads still in a call", join_threads)]
        if self.app is not None:
            steps.append(("closing the HSM session and the database", self.app.close))
        for what, step in steps:
            if not await _bounded(step, release_by):
                self.unfinished.append(what)
        if self.unfinished:
            log.warning("shutdown: %s did not finish within the grace period", ", ".join(self.unfinished))
        self._stopped.set()
        log.info("stopped")

    async def _drain(self, deadline: float) -> None:
        """Serve on (health NOT_SERVING) until no call has started for DRAIN_QUIET_SECONDS, within the grace.

        grpc's stop() cancels every call the core has received but the Python side has not yet picked up; with
        service calls on the event loop (SQLite) a burst leaves most of them there, so a prompt stop cancelled
        57 of 64 calls in flight. Waiting for a quiet moment lets those be picked up and finish first.
        """
        if self._servicer is None:
            return
        while time.monotonic() < deadline and self._servicer.in_flight.quiet_for() < DRAIN_QUIET_SECONDS:
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        await self._stopped.wait()


def connection_cap(settings: Settings) -> int:
    """``max_connections``, or the open-file limit less a reserve: sockets must never take the descriptors the
    HSM module (SoftHSM opens its object files on every call), the database and the logs need."""
    if settings.max_connections:
        return settings.max_connections
    limit = descriptor_limit()
    return max(MIN_CONNECTIONS, limit - max(DESCRIPTOR_RESERVE, limit // 8))


def server_options(settings: Settings, *, reuse_port: bool) -> list[tuple[str, int]]:
    """grpc core options: message size, the connection cap, and timeouts that close idle or half-open peers."""
    cap = connection_cap(settings)
    log.info("at most %d client connections (open-file limit %d)", cap, descriptor_limit())
    return [
        # Up to MAX_WIRE_BYTES arrive; add_servicer's deserializer refuses more than MAX_REQUEST_BYTES unparsed.
        ("grpc.max_receive_message_length", MAX_WIRE_BYTES),
        # gRPC enables SO_REUSEPORT by default; a second server on the same port must fail loudly rather than
        # silently share it, unless it is one of our own workers.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Past the cap a new connection is accepted and closed at once: a flood costs a descriptor for a moment,
        # never the HSM's or the database's.
        ("grpc.max_allowed_incoming_connections", cap),
        # A connection that sends nothing (or never finishes TLS) is dropped after this, not after 120 s.
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.connection_idle_seconds * 1000)),
        # Pings find half-open connections (a peer that vanished without FIN) and close them.
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ]


async def _bounded(step: Callable[[], object], deadline: float) -> bool:
    """Run a blocking ``step`` on a daemon thread of its own; True if it finished before ``deadline``.

    A daemon thread, not an executor: a step stuck for good must not hold the interpreter's exit.
    """
    done = threading.Event()

    def run() -> None:
        try:
            step()
        except Exception:
            log.exception("shutdown step failed")
        finally:
            done.set()

    threading.Thread(target=run, name="keybinder-shutdown", daemon=True).start()
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return done.is_set()


def tls_files(settings: Settings) -> TlsFiles | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return TlsFiles(settings.tls_cert, settings.tls_key, settings.client_ca)


def preflight(settings: Settings) -> None:
    """Refuse a set-up that must not serve (TlsConfigError), before anything logs in to the HSM."""
    check_listen(settings.host_port[0], tls=settings.tls, allow_plaintext=settings.allow_plaintext)
    files = tls_files(settings)
    if files is not None:
        load(files)


def secret_files(settings: Settings) -> list[tuple[Path, str]]:
    """Every file holding a secret the server reads or writes, with what it is."""
    files: list[tuple[Path, str]] = []

    def source(value: str | None, what: str) -> None:
        if value and not value.startswith("env:"):
            files.append((Path(value.removeprefix("file:")), what))

    source(settings.pkcs11_uri.pin_source, "HSM PIN file")
    files.append((settings.so_pin_file, "HSM SO PIN file"))
    files.append((settings.demo_partner_key_file, "demo partner API key file"))
    if settings.tls_key is not None:
        files.append((settings.tls_key, "TLS private key"))
    if settings.email_notifier == "smtp" and settings.smtp_username:
        source(settings.smtp_password_source, "SMTP password file")
    if "webhook" in (settings.email_notifier, settings.phone_notifier):
        source(settings.webhook_secret_source, "webhook secret file")
    database = sqlite_path(settings.database)
    if database is not None:  # ID-HMACs, contacts, PIN-HMACs, the audit trail
        files.extend((Path(f"{database}{suffix}"), "database file") for suffix in ("", "-wal", "-shm"))
    return files


def _softhsm_token_dir(settings: Settings) -> Path | None:
    """The token directory SoftHSM will use, when it is SoftHSM configured by a file we can read."""
    conf = os.environ.get("SOFTHSM2_CONF")
    if conf is None or "softhsm" not in settings.pkcs11_uri.module_path:
        return None
    try:
        lines = Path(conf).read_text().splitlines()
    except OSError as err:
        raise StartupError(f"cannot read the SoftHSM configuration {conf}: {err.strerror}") from err
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def check_hsm(settings: Settings) -> None:
    """Log in to the token and find the HMAC key; the error names what is missing."""
    settings.apply_environment()
    uri = settings.pkcs11_uri
    if not Path(uri.module_path).exists():
        raise StartupError(f"the PKCS#11 module {uri.module_path} does not exist (check hsm_uri's module-path)")
    tokens = _softhsm_token_dir(settings)
    if tokens is not None and not tokens.is_dir():
        raise StartupError(
            f"the SoftHSM token directory {tokens} does not exist (directories.tokendir in "
            f"{os.environ['SOFTHSM2_CONF']}); restore it or run `keybinder init`"
        )
    # Quiet while checking: a start that fails prints its one line, not the steps that went well first.
    hsm_log = logging.getLogger("hsm")
    level = hsm_log.level
    hsm_log.setLevel(logging.WARNING)
    keys = Pkcs11KeyManager(uri)
    try:
        keys.session.open()
        if not keys.exists(settings.hmac_key_label, "secret"):
            raise StartupError(
                f"the HMAC key {settings.hmac_key_label!r} is not on token {uri.token!r}; run `keybinder init`"
            )
    except HsmError as err:
        raise StartupError(f"HSM: {err}") from err
    finally:
        keys.close()
        hsm_log.setLevel(level)


def check_database(settings: Settings) -> None:
    """The database answers and its schema is current: otherwise the server would only ever be NOT_SERVING."""
    where = redact_url(settings.database)
    try:
        pending = pending_migrations(settings.database)
    except FileNotFoundError as err:
        raise StartupError(f"{err}; run `keybinder init` (or `keybinder migrate`) first") from err
    except Exception as err:  # the driver's error: unreachable server, no such database, no permission
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StartupError(f"cannot use the database {where}: {first}") from err
    if pending:
        raise StartupError(f"the database {where} needs {pending} schema migration(s); run `keybinder migrate` first")


def check_start(settings: Settings) -> None:
    """Everything `serve` needs, checked once before any worker starts; StartupError (one line) if not.

    Order: what costs nothing first, so the cheapest mistake is the one reported.
    """
    preflight(settings)  # TLS and plaintext rules: TlsConfigError, a configuration error of its own
    try:
        settings.database  # noqa: B018 - the property checks the URL scheme
    except ValueError as err:
        raise StartupError(f"configuration error: {err}") from err
    for path, what in secret_files(settings):
        check_private(path, what)
    host, port = settings.host_port
    check_address_free(host, port)
    if settings.metrics_port:
        check_address_free(settings.metrics_host, settings.metrics_port, what="serve metrics")
    check_hsm(settings)
    check_database(settings)


async def serve(settings: Settings, on_ready: Callable[[int], None] | None = None, *, reuse_port: bool = False) -> None:
    # Handlers first: a SIGTERM that arrives as soon as we announce the port must drain, not kill.
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    server = Server(settings, reuse_port=reuse_port)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    port = await server.start()
    if on_ready is not None:
        on_ready(port)
    await stop_requested.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
    await server.stop()
    if server.unfinished:
        # Threads stuck in a peer would keep the interpreter from exiting (it joins executor threads at exit).
        logging.shutdown()
        os._exit(0)
