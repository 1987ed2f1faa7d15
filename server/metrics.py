"""Prometheus metrics: what each serving process records, and the /metrics endpoint that exposes them.

One process (``--workers 1``): the process records into prometheus_client's default registry and serves
it. Several workers: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it
spawns them, every worker records into its own memory-mapped files there, and the supervisor serves the
sum with a ``MultiProcessCollector``. The active-bindings gauge is not recorded by anyone: the process
serving /metrics counts the database at scrape time (cached for a few seconds), so it is right whatever
worker made or revoked a binding, and costs the request path nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hsm import set_observer

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

    from server.config import Settings
    from server.stores import Store

log = logging.getLogger(__name__)

#: prometheus_client reads it when first imported: set in the supervisor before workers are spawned.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: A binding costs ~1-3 ms of CPU; the tail (HSM or database trouble) reaches seconds.
RPC_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: One PKCS#11 call on SoftHSM takes ~0.1-0.5 ms; a network HSM a few ms.
HSM_BUCKETS_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)
ACTIVE_BINDINGS_CACHE_SECONDS = 5.0
ACTIVE_BINDINGS_TIMEOUT_SECONDS = 10.0
#: The reason a lockout (or rate limit) answers with; counted by the lockouts counter as well.
LOCKOUT_REASON = "too_many_attempts"
#: At most this many distinct HSM actions get a cached child (they name key labels, a small fixed set).
MAX_CACHED_HSM_ACTIONS = 256

_QUOTED = re.compile(r"\s*(?:'[^']*'|\"[^\"]*\")")


def hsm_operation(action: str) -> str:
    """The action's kind without the key label: ``signing with key 'issuer'`` → ``signing with key``."""
    return _QUOTED.sub("", action).strip() or "unknown"


class Recorder:
    """The metrics one process records. Labelled children are cached: an RPC costs two dict lookups."""

    def __init__(self) -> None:
        # Imported here, not at module load: in a worker the multiprocess directory must be in the
        # environment before prometheus_client is first imported, and only recording processes need it.
        from prometheus_client import Counter, Histogram

        self.rpcs = Counter(
            "keybinder_rpc_requests",
            "RPCs handled, by method, gRPC status code and outcome (ok, the ErrorInfo reason, or cancelled).",
            ["method", "code", "outcome"],
        )
        self.rpc_seconds = Histogram(
            "keybinder_rpc_duration_seconds",
            "Time from receiving an RPC to its answer, by method and gRPC status code.",
            ["method", "code"],
            buckets=RPC_BUCKETS_SECONDS,
        )
        self.lockouts = Counter(
            "keybinder_lockouts", f"RPCs refused with {LOCKOUT_REASON} (lockout or rate limit), by method.", ["method"]
        )
        self.limit_refusals = Counter(
            "keybinder_limit_refusals",
            "Requests refused by an abuse limit, by limit (partner_auth_failures, global_auth_failures,"
            " individual_lockout, partner_otp_sends, individual_otp_sends, partner_nonces, individual_nonces).",
            ["limit"],
        )
        self.otps = Counter("keybinder_otps_sent", "OTPs handed to the notifier, by channel.", ["channel"])
        self.hsm_seconds = Histogram(
            "keybinder_hsm_operation_duration_seconds",
            "Time inside one PKCS#11 call (lock held), by operation.",
            ["operation"],
            buckets=HSM_BUCKETS_SECONDS,
        )
        self.hsm_errors = Counter(
            "keybinder_hsm_errors", "PKCS#11 calls that failed, by operation and error class.", ["operation", "error"]
        )
        self._rpc_children: dict[tuple[str, str, str], tuple[Counter, Histogram, Counter | None]] = {}
        self._otp_children: dict[str, Counter] = {}
        self._hsm_children: dict[str, tuple[str, Histogram]] = {}

    def rpc(self, method: str, code: str, outcome: str, seconds: float) -> None:
        key = (method, code, outcome)
        children = self._rpc_children.get(key)
        if children is None:  # a benign race: labels() is thread-safe and returns the same child
            lockouts = self.lockouts.labels(method) if outcome == LOCKOUT_REASON else None
            children = (self.rpcs.labels(method, code, outcome), self.rpc_seconds.labels(method, code), lockouts)
            self._rpc_children[key] = children
        count, latency, lockouts = children
        count.inc()
        latency.observe(seconds)
        if lockouts is not None:
            lockouts.inc()

    def limit_refused(self, limit: str) -> None:
        self.limit_refusals.labels(limit).inc()

    def otp_sent(self, channel: str) -> None:
        child = self._otp_children.get(channel)
        if child is None:
            child = self._otp_children[channel] = self.otps.labels(channel)
        child.inc()

    def hsm_call(self, action: str, seconds: float, error: BaseException | None) -> None:
        """The hsm package's SessionObserver: latency of every PKCS#11 call, and its failures."""
        children = self._hsm_children.get(action)
        if children is None:
            operation = hsm_operation(action)
            children = (operation, self.hsm_seconds.labels(operation))
            if len(self._hsm_children) < MAX_CACHED_HSM_ACTIONS:
                self._hsm_children[action] = children
        operation, latency = children
        latency.observe(seconds)
        if error is not None:
            self.hsm_errors.labels(operation, type(error).__name__).inc()


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recorder() -> Recorder | None:
    """This process's recorder, or None when metrics are off (then nothing is recorded at all)."""
    return _recorder


def enable() -> Recorder:
    """Start recording in this process (idempotent) and observe every PKCS#11 call."""
    global _recorder  # one set of metrics per process, as prometheus_client's registry is
    with _recorder_lock:
        if _recorder is None:
            _recorder = Recorder()
        set_observer(_recorder)
        return _recorder


# -- the active-bindings gauge ------------------------------------------------------------------------


class ActiveBindingsCollector:
    """``keybinder_active_bindings``, counted in the database when scraped, at most every few seconds.

    The count runs on one dedicated thread with its own store, so the scrape never touches a serving
    connection and SQLite's per-thread connection is reused. A failed count leaves the gauge out of that
    scrape (an absent series, not a wrong number) and is retried after the cache period.
    """

    NAME = "keybinder_active_bindings"
    HELP = "Bindings currently active (counted in the database at scrape time, cached a few seconds)."

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        cache_seconds: float = ACTIVE_BINDINGS_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_store = open_store
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._store: Store | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="keybinder-metrics-db")
        self._lock = threading.Lock()
        self._value: int | None = None
        self._at = -math.inf

    def describe(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        value = self.current()
        if value is not None:
            yield GaugeMetricFamily(self.NAME, self.HELP, value=value)

    def current(self) -> int | None:
        with self._lock:
            now = self._clock()
            if now - self._at >= self._cache_seconds:
                self._at = now
                try:
                    self._value = self._executor.submit(self._count).result(ACTIVE_BINDINGS_TIMEOUT_SECONDS)
                except Exception as err:  # the endpoint must keep answering when the database does not
                    log.warning("cannot count active bindings: %s: %s", type(err).__name__, err)
                    self._value = None
            return self._value

    def _count(self) -> int:
        if self._store is None:
            self._store = self._open_store()
        return self._store.count_active_bindings()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def close(self) -> None:
        self._executor.submit(self._close_store).result(ACTIVE_BINDINGS_TIMEOUT_SECONDS)
        self._executor.shutdown(wait=True)


# -- the /metrics endpoint ------------------------------------------------------------------------------


@dataclass
class MetricsExporter:
    """The HTTP server answering /metrics on its own port (a daemon thread); ``close`` stops it."""

    httpd: WSGIServer
    thread: threading.Thread
    bindings: ActiveBindingsCollector

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        self.bindings.close()


def start_exporter(settings: Settings, multiprocess_dir: Path | None = None) -> MetricsExporter:
    """Serve /metrics on ``settings.metrics_host:metrics_port``: this process's metrics, or (with
    ``multiprocess_dir``) the sum over every worker that recorded there, plus the active-bindings gauge."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from server.stores import open_store

    assert settings.metrics_port is not None
    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)  # this process's metrics, with its process_* and python_* ones
    url = settings.database
    bindings = ActiveBindingsCollector(lambda: open_store(url))
    registry.register(bindings)
    try:
        httpd, thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as err:
        bindings.close()
        raise OSError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {err}") from err
    exporter = MetricsExporter(httpd, thread, bindings)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, exporter.port)
    return exporter


# -- multiprocess bookkeeping (the supervisor) ----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """A fresh, empty directory for this supervisor's workers, set in the environment they inherit.

    Under ``<data_dir>/metrics/<supervisor pid>``, so that two supervisors sharing a data directory keep
    apart; directories of supervisors that died without cleaning up are removed first.
    """
    root = data_dir / "metrics"
    root.mkdir(mode=0o700, exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and int(old.name) != os.getpid() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)  # a previous owner of this pid
    path.mkdir(mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def worker_died(pid: int, multiprocess_dir: Path) -> None:
    """Forget a dead worker's live gauges; its counters and histograms stay in the sums, as they should."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(multiprocess_dir))  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(path: Path) -> None:
    os.environ.pop(MULTIPROC_ENV, None)
    shutil.rmtree(path, ignore_errors=True)
