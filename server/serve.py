"""The gRPC server process: grpc.aio front, blocking service calls on a thread pool."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import metrics
from server.app import App, build_app
from server.config import Settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.decoding import MAX_WIRE_BYTES, add_servicer
from server.grpc_api.servicer import KeyBinderServicer
from server.tls import ReloadingCredentials, TlsFiles, check_listen, load

log = logging.getLogger(__name__)

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
        self._health = health.aio.HealthServicer()
        threads = settings.service_threads
        # None: service calls run on the event loop thread (see Settings.service_threads).
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="keybinder-rpc") if threads else None
        # The probe gets its own thread so that a hung HSM call cannot starve it of RPC threads.
        self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="keybinder-probe")
        self._probe_task: asyncio.Task[None] | None = None
        # Maintenance (expired rows, signed audit heads) on a thread of its own: never delays the probe.
        self._sweep_executor = ThreadPoolExecutor(1, thread_name_prefix="keybinder-sweep")
        self._sweep_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.tls: ReloadingCredentials | None = None

    async def start(self) -> int:
        if self.settings.metrics_port is not None:
            metrics.enable()  # observability: record RPC and HSM metrics (served by server.metrics)
        host, port = self.settings.host_port
        preflight(self.settings)
        files = tls_files(self.settings)
        self.tls = ReloadingCredentials(files) if files is not None else None
        self.app = build_app(self.settings)
        server = grpc.aio.server(
            options=[
                # Up to MAX_WIRE_BYTES arrive; add_servicer's deserializer refuses more than
                # MAX_REQUEST_BYTES unparsed.
                ("grpc.max_receive_message_length", MAX_WIRE_BYTES),
                # gRPC enables SO_REUSEPORT by default; a second server on the same port must fail
                # loudly rather than silently share it, unless it is one of our own workers.
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ],
        )
        servicer = KeyBinderServicer(
            self.app.service, self._executor, self.app.partners, client_certificates=self.settings.client_ca is not None
        )
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
        """Stop taking RPCs, let in-flight ones finish within the grace period, release all."""
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        await self._health.enter_graceful_shutdown()
        await server.stop(self.settings.shutdown_grace_seconds)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._probe_executor.shutdown(wait=True)
        # Never waited for: a sweep stuck on a hung database must not hold up the shutdown.
        self._sweep_executor.shutdown(wait=False, cancel_futures=True)
        if self.app is not None:
            self.app.close()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


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
