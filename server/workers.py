"""Several serving processes on one port (SO_REUSEPORT), supervised: restarted when they die, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any

from server import metrics
from server.config import Settings
from server.process import reserve_address

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 60.0
#: A worker that dies sooner than this after starting is restarted with a growing delay.
QUICK_DEATH_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 30.0


def _worker_main(values: dict[str, Any], index: int, ready: Any, log_level: str, parent: int) -> None:
    """Entry point of one worker process (spawned, so nothing of the parent's HSM state is inherited)."""
    from hsm import HsmError
    from server.logs import configure_logging
    from server.process import die_with_parent, owner_only_files
    from server.serve import serve

    die_with_parent(parent)
    owner_only_files()
    # Until serve() installs its handler, a SIGHUP forwarded by the supervisor must not kill a starting worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings(**values)
    configure_logging(log_level, settings.log_format, worker=index)
    try:
        asyncio.run(serve(settings, lambda port: ready.put((index, os.getpid(), port)), reuse_port=True))
    except (HsmError, OSError) as err:
        # Checked before the workers started (serve.check_start): this changed since. One line, not a traceback.
        log.error("worker %d cannot serve: %s", index, err)
        sys.exit(1)


@dataclass
class _Worker:
    index: int
    process: SpawnProcess
    started: float
    restarts: int = 0


def run_workers(settings: Settings, count: int, on_ready: Callable[[int], None]) -> int:
    """Start ``count`` workers, restart any that die, and drain them all on SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold an HSM login
    host, port = settings.host_port
    reserved, port = reserve_address(host, port)
    values = settings.model_copy(update={"listen": f"{host}:{port}", "workers": 1}).model_dump()
    ready = ctx.Queue()
    stopping = False
    # Observability: workers record into files in a fresh directory (set in the environment they inherit
    # before any is spawned); this process sums them on /metrics.
    metrics_dir = metrics.prepare_multiprocess_dir(settings.data_dir) if settings.metrics_port is not None else None
    exporter = metrics.start_exporter(settings, metrics_dir) if metrics_dir is not None else None

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    reload_requested = False

    def request_reload(signum: int, frame: object) -> None:
        nonlocal reload_requested
        reload_requested = True

    # SIGHUP (reload TLS certificate, clear partner cache) goes to every worker: each owns its server.
    signal.signal(signal.SIGHUP, request_reload)

    def spawn(index: int, restarts: int = 0) -> _Worker:
        process = ctx.Process(
            target=_worker_main,
            args=(values, index, ready, settings.log_level, os.getpid()),
            name=f"keybinder-worker-{index}",
        )
        process.start()
        return _Worker(index, process, time.monotonic(), restarts)

    workers = {i: spawn(i) for i in range(count)}
    try:
        started: set[int] = set()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while len(started) < count:
            if stopping or time.monotonic() > deadline or any(not w.process.is_alive() for w in workers.values()):
                log.error("workers failed to start")
                return 1
            try:
                index, pid, _ = ready.get(timeout=0.2)
            except queue.Empty:
                continue
            started.add(index)
            log.info("worker %d (pid %d) serving", index, pid)
        on_ready(port)
        while not stopping:
            time.sleep(0.2)
            if reload_requested:
                reload_requested = False
                log.info("SIGHUP: asking %d workers to reload", len(workers))
                for worker in workers.values():
                    if worker.process.is_alive() and worker.process.pid is not None:
                        os.kill(worker.process.pid, signal.SIGHUP)
            while not ready.empty():
                index, pid, _ = ready.get_nowait()
                log.info("worker %d (pid %d) serving again", index, pid)
            for index, worker in list(workers.items()):
                if worker.process.is_alive() or stopping:
                    continue
                lived = time.monotonic() - worker.started
                delay = 0.0 if lived > QUICK_DEATH_SECONDS else min(2.0**worker.restarts, MAX_RESTART_DELAY_SECONDS)
                log.warning(
                    "worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                    index,
                    worker.process.pid,
                    worker.process.exitcode,
                    lived,
                    delay,
                )
                if metrics_dir is not None and worker.process.pid is not None:
                    metrics.worker_died(worker.process.pid, metrics_dir)
                time.sleep(delay)
                workers[index] = spawn(index, worker.restarts + 1 if lived <= QUICK_DEATH_SECONDS else 0)
        return 0
    finally:
        log.info("draining %d workers", len(workers))
        for worker in workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_seconds + 5
        for worker in workers.values():
            worker.process.join(max(deadline - time.monotonic(), 0.1))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
        reserved.close()
        if exporter is not None:
            exporter.close()
        if metrics_dir is not None:
            metrics.remove_multiprocess_dir(metrics_dir)
        log.info("stopped")
