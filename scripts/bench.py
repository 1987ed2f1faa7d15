"""Benchmark: DoKeyBinding end to end over gRPC against the raw HSM signing rate, in one run.

For each database (SQLite, and PostgreSQL when reachable) and each worker count (1 and 2) it starts a
real `keybinder serve` (own data directory, own SoftHSM token, own database), then drives it with a
grpc.aio client at 1 and at 64 requests in flight: PIN challenge, a fresh EC P-256 wallet key and a
distinct individual for every binding. It prints binds/s, p50/p99 latency, server CPU milliseconds per
bind (utime+stime of every server process, from /proc), for PostgreSQL the CPU of the database's
backends per bind (those serving the bench's own database, from /proc), the peak RSS of each worker
(VmHWM), the error count, and the ratio of binds/s to the raw HSM ECDSA P-256 signing rate measured in
the same run (one process, one session, same token type).

For PostgreSQL it then counts round trips and transactions per bind: one more server (1 worker) talks
to the database through a counting proxy in this process, which reads the protocol: every Sync or
simple Query the client sends waits for one ReadyForQuery (a round trip), and every ReadyForQuery that
reports "idle" ends a transaction (an autocommitted statement or a COMMIT).

`--soak SECONDS` instead runs one configuration for that long at 64 in flight and samples the worker's
RSS every 10 s, to show whether memory grows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.gen.keybinder.v1 import keybinder_pb2 as pb  # noqa: E402
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc  # noqa: E402
from server.grpc_api.demo import new_wallet_key  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PARTNER_ID = "demo-wallet"  # registered by `init --demo-partner`
PIN = "629047"
KB = [sys.executable, "-m", "server"]
#: Extra environment of the measured server (--rpc-threads).
SERVER_ENV: dict[str, str] = {}


# -- processes ----------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        if (fields := _stat(pid)) is not None:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def backend_pids(database: str) -> list[int]:
    """The PostgreSQL backends connected to ``database`` (their title is "postgres: … user database host …")."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and f" {database} " in title:
            pids.append(int(entry.name))
    return pids


def memory_kib(pid: int, field: str) -> int:
    """VmHWM (peak) or VmRSS (now) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker_pids(root: int) -> list[int]:
    """The processes that serve: the workers, or the server itself when it runs alone."""
    pids = []
    for pid in process_tree(root)[1:]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:  # multiprocessing workers (not its resource tracker)
            pids.append(pid)
    return pids or [root]


# -- set-up -----------------------------------------------------------------------------------


def raw_sign_rate(data_dir: Path, env: dict[str, str], seconds: float) -> float:
    """ECDSA P-256 signatures/s with the issuer key, one process, one session: the HSM's own ceiling."""
    code = f"""
import time
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from server.config import load_settings
from hsm import Pkcs11KeyManager
s = load_settings(data_dir={str(data_dir)!r}); s.apply_environment()
signer = Pkcs11KeyManager(s.pkcs11_uri).create_signer(s.pkcs11_uri.object)
n, end = 0, time.perf_counter() + {seconds}
while time.perf_counter() < end:
    signer.sign(b"benchmark", ec.ECDSA(hashes.SHA256())); n += 1
print(n / {seconds})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return float(out.stdout.strip())


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str | None]:
    """A fresh database on the PostgreSQL server of ``admin_url``, dropped afterwards (None: unreachable)."""
    try:
        import psycopg

        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except Exception as err:
        print(f"PostgreSQL at {admin_url} unreachable ({type(err).__name__}); its rows are left out")
        yield None
        return
    name = f"kb_bench_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepare(data_dir: Path, env: dict[str, str], individuals: int) -> list[str]:
    subprocess.run(
        [*KB, "init", "--demo-partner", "--data-dir", str(data_dir)], check=True, env=env, cwd=ROOT, capture_output=True
    )
    ids = [f"{7000000000 + i}" for i in range(individuals)]
    people = data_dir / "people.json"
    people.write_text(json.dumps([{"individual_id": i, "pin": PIN} for i in ids]))
    subprocess.run(
        [*KB, "identities", "import", str(people), "--data-dir", str(data_dir)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    people.unlink()
    return ids


def partner_metadata(data_dir: Path) -> tuple[tuple[str, str], ...]:
    return (("partner-id", PARTNER_ID), ("partner-api-key", (data_dir / "demo-partner.key").read_text().strip()))


@contextlib.contextmanager
def server(data_dir: Path, env: dict[str, str], workers: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [*KB, "serve", "--port", "0", "--workers", str(workers), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env | {"KEYBINDER_LOG_LEVEL": "WARNING"} | SERVER_ENV,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("keybinder listening on"):
            raise RuntimeError(f"serve did not start: {line!r}")
        yield proc, int(line.split()[3].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(60)


# -- load -------------------------------------------------------------------------------------


@dataclass
class Row:
    database: str
    workers: int
    in_flight: int
    binds: int
    errors: int
    binds_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_bind: float
    db_cpu_ms_per_bind: float | None
    client_cpu_ms_per_bind: float
    peak_rss_mib_per_worker: list[float]
    ratio_to_raw_sign: float


class Load:
    """Bindings of fresh EC P-256 keys for distinct individuals, ``in_flight`` at a time."""

    def __init__(self, port: int, metadata: tuple[tuple[str, str], ...], channels: int) -> None:
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
        self.stubs = [pb_grpc.KeyBinderServiceStub(c) for c in self.channels]
        self.metadata = metadata

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def run(
        self, individuals: list[str], in_flight: int, *, until: float | None = None
    ) -> tuple[float, list[float], int, float]:
        """Elapsed seconds, latencies, errors, and this (client) process's CPU seconds while it ran."""
        keys = [new_wallet_key("ec-p256")[1] for _ in individuals] if until is None else []
        latencies: list[float] = []
        errors = 0
        counter = iter(range(len(individuals))) if until is None else _forever()

        async def client() -> None:
            nonlocal errors
            for i in counter:
                if until is not None and time.monotonic() > until:
                    return
                request = pb.DoKeyBindingRequest(
                    individual_id=individuals[i % len(individuals)],
                    challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=PIN)],
                    public_key_jwk=keys[i % len(keys)] if until is None else new_wallet_key("ec-p256")[1],
                    bind_auth_factor_type="WLA",
                )
                start = time.perf_counter()
                try:
                    await self.stubs[i % len(self.stubs)].DoKeyBinding(request, metadata=self.metadata, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        return time.perf_counter() - began, latencies, errors, time.process_time() - cpu


def _forever() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def quantiles(latencies: list[float]) -> tuple[float, float]:
    if len(latencies) < 2:
        return (latencies[0] * 1000 if latencies else 0.0), 0.0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def print_row(row: Row) -> None:
    rss = "/".join(f"{r:.0f}" for r in row.peak_rss_mib_per_worker)
    print(
        f"{row.database:<10} {row.workers:>2} worker(s) {row.in_flight:>3} in flight"
        f"  {row.binds_per_s:7.0f} binds/s  p50 {row.p50_ms:7.1f} ms  p99 {row.p99_ms:7.1f} ms"
        f"  CPU {row.server_cpu_ms_per_bind:5.2f} ms/bind"
        + (f" (+ database {row.db_cpu_ms_per_bind:4.2f})" if row.db_cpu_ms_per_bind is not None else "")
        + f" (client {row.client_cpu_ms_per_bind:4.2f})"
        f"  peak RSS {rss} MiB  errors {row.errors}"
        f"  ratio {row.ratio_to_raw_sign:.3f}",
        flush=True,
    )


# -- round trips and transactions per bind (PostgreSQL) -----------------------------------------


class CountingProxy:
    """A TCP proxy in front of PostgreSQL that reads the wire protocol (v3) in both directions.

    Client to server: after the untyped startup packet every message is a type byte and a length;
    each Sync ("S") or simple Query ("Q") ends a request that waits for the server's ReadyForQuery,
    so they count the round trips. Server to client: each ReadyForQuery ("Z") carries the
    transaction status, and an "I" (idle) after a request means a transaction ended: an autocommitted
    statement, or the COMMIT/ROLLBACK of an explicit one. Needs sslmode=disable (and no GSS
    encryption), so the bytes can be read.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.round_trips = 0
        self.transactions = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A loop of its own, on a thread of its own: the bench's loop blocks (waiting for the server to
        # stop, reading the statistics), and the server's last statements must still get through.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        try:
            await asyncio.gather(self._frontend(client_r, server_w), self._backend(server_r, client_w))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            client_w.close()
            server_w.close()

    async def _frontend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(8)
        length, code = struct.unpack("!ii", head)
        if code != 196608:  # protocol 3.0; an SSL or GSS request would encrypt what follows
            raise RuntimeError("the counting proxy needs sslmode=disable&gssencmode=disable")
        writer.write(head + await reader.readexactly(length - 8))
        while True:
            kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!i", head)[0] - 4)
            if kind in (b"S", b"Q"):
                self.round_trips += 1
            writer.write(kind + head + body)
            await writer.drain()

    async def _backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            kind = await reader.readexactly(1)
            head = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!i", head)[0] - 4)
            if kind == b"Z":
                if body == b"I" and not first:
                    self.transactions += 1
                first = False  # the ReadyForQuery after authentication ends no transaction
            writer.write(kind + head + body)
            await writer.drain()


def prepare_more(data_dir: Path, env: dict[str, str], args: argparse.Namespace) -> list[str]:
    """Fresh individuals for the counting run, imported into the same database."""
    ids = [f"{7900000000 + i}" for i in range(args.count_binds + 100)]
    people = data_dir / "people-count.json"
    people.write_text(json.dumps([{"individual_id": i, "pin": PIN} for i in ids]))
    subprocess.run(
        [*KB, "identities", "import", str(people), "--data-dir", str(data_dir)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    people.unlink()
    return ids


async def count_round_trips(data_dir: Path, env: dict[str, str], url: str, individuals: list[str]) -> dict[str, float]:
    """Round trips and transactions per bind, through CountingProxy (1 worker, 8 in flight)."""
    parts = urlsplit(url)
    proxy = CountingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    proxied = f"postgresql://{user}127.0.0.1:{proxy.port}{parts.path}?sslmode=disable&gssencmode=disable"
    try:
        with server(data_dir, env | {"KEYBINDER_DATABASE_URL": proxied}, 1) as (_proc, port):
            load = Load(port, partner_metadata(data_dir), channels=1)
            try:
                await load.run(individuals[:100], 8)  # warm-up: the pool's connections, prepared statements
                before = await asyncio.to_thread(write_volume, url)
                trips, xacts = proxy.round_trips, proxy.transactions
                _elapsed, latencies, errors, _cpu = await load.run(individuals[100:], 8)
                trips, xacts = proxy.round_trips - trips, proxy.transactions - xacts
                after = await asyncio.to_thread(write_volume, url)
                binds = max(len(latencies), 1)
                result = {
                    "binds": float(len(latencies)),
                    "errors": float(errors),
                    "round_trips": trips / binds,
                    "transactions": xacts / binds,
                    **{f"{k}_per_bind": (after[k] - before[k]) / binds for k in before if k != "row_bytes"},
                    "row_bytes": after["row_bytes"],
                }
            finally:
                await load.close()
    finally:
        proxy.close()
    print(
        f"postgresql per bind ({len(latencies)} binds, 8 in flight, health probes included):"
        f" {result['round_trips']:.2f} round trips, {result['transactions']:.2f} transactions;"
        f" rows {result['rows_inserted_per_bind']:.2f} inserted, {result['rows_updated_per_bind']:.2f} updated;"
        f" tables + indexes grow {result['table_bytes_per_bind']:.0f} bytes"
        f" (rows {result['row_bytes']:.0f} bytes: binding, wallet key, audit entry)",
        flush=True,
    )
    return result


def write_volume(url: str) -> dict[str, float]:
    """The database's inserted/updated row counters, the size of its tables with their indexes, and the
    average stored size of one binding + wallet key + audit entry row."""
    import psycopg

    # An idle backend that flushed its counters less than a second ago holds the next ones for up to
    # 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL): wait that out, so every counted row is in the view.
    time.sleep(11.0)
    with psycopg.connect(url, autocommit=True) as conn:
        inserted, updated = conn.execute(
            "SELECT tup_inserted, tup_updated FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone() or (0, 0)
        size = conn.execute(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = 'public' AND c.relname NOT LIKE '%yoyo%'"
        ).fetchone()
        row = conn.execute(
            "SELECT (SELECT avg(pg_column_size(b.*)) FROM bindings b) + (SELECT avg(pg_column_size(w.*))"
            " FROM wallet_keys w) + (SELECT avg(pg_column_size(a.*)) FROM audit_log a)"
        ).fetchone()
        row_bytes = float(row[0]) if row and row[0] is not None else 0.0
    return {
        "rows_inserted": float(inserted),
        "rows_updated": float(updated),
        "table_bytes": float(size[0] if size else 0),
        "row_bytes": row_bytes,
    }


# -- the runs ---------------------------------------------------------------------------------


async def measure(
    data_dir: Path,
    env: dict[str, str],
    database: str,
    workers: int,
    individuals: list[str],
    args: argparse.Namespace,
    raw: float,
    db_name: str | None,
) -> list[Row]:
    rows = []
    with server(data_dir, env, workers) as (proc, port):
        load = Load(port, partner_metadata(data_dir), channels=max(2 * workers, 1))
        try:
            plan = [(1, args.binds_serial), (64, args.binds)]
            warm, rest = individuals[: args.warmup], individuals[args.warmup :]
            await load.run(warm, 16)
            for in_flight, count in plan:
                batch, rest = rest[:count], rest[count:]
                pids = process_tree(proc.pid)
                before = cpu_seconds(pids)
                # Backends that close during the batch take their CPU with them; the pool keeps its own.
                db_before = cpu_seconds(backend_pids(db_name)) if db_name else 0.0
                elapsed, latencies, errors, client_cpu = await load.run(batch, in_flight)
                cpu = cpu_seconds(process_tree(proc.pid)) - before
                db_cpu = cpu_seconds(backend_pids(db_name)) - db_before if db_name else None
                p50, p99 = quantiles(latencies)
                rate = len(latencies) / elapsed
                rows.append(
                    Row(
                        database=database,
                        workers=workers,
                        in_flight=in_flight,
                        binds=len(latencies),
                        errors=errors,
                        binds_per_s=rate,
                        p50_ms=p50,
                        p99_ms=p99,
                        server_cpu_ms_per_bind=cpu / max(len(latencies), 1) * 1000,
                        db_cpu_ms_per_bind=db_cpu / max(len(latencies), 1) * 1000 if db_cpu is not None else None,
                        client_cpu_ms_per_bind=client_cpu / max(len(latencies), 1) * 1000,
                        peak_rss_mib_per_worker=[memory_kib(p, "VmHWM") / 1024 for p in worker_pids(proc.pid)],
                        ratio_to_raw_sign=rate / raw,
                    )
                )
                print_row(rows[-1])
        finally:
            await load.close()
    return rows


async def matrix(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF" and not k.startswith("KEYBINDER_")}
    per_run = args.warmup + args.binds_serial + args.binds
    rows: list[Row] = []
    raw_rates: list[float] = []
    counts: dict[str, float] | None = None
    databases: list[tuple[str, contextlib.AbstractContextManager[str | None]]] = []
    if "sqlite" in args.databases:
        databases.append(("sqlite", contextlib.nullcontext("")))
    if args.postgres and "postgresql" in args.databases:
        databases.append(("postgresql", postgres_database(args.postgres)))
    for name, database in databases:
        with database as url:
            if url is None:
                continue
            data_dir = tmp / name
            db_env = env | ({"KEYBINDER_DATABASE_URL": url} if url else {})
            individuals = prepare(data_dir, db_env, per_run * len(args.workers))
            raw = raw_sign_rate(data_dir, db_env, 2.0)
            raw_rates.append(raw)
            print(f"raw HSM ECDSA P-256 sign ({name} run's token): {raw:,.0f} sig/s", flush=True)
            for n, workers in enumerate(args.workers):
                share = individuals[n * per_run : (n + 1) * per_run]
                db_name = urlsplit(url).path.lstrip("/") if url else None
                rows.extend(await measure(data_dir, db_env, name, workers, share, args, raw, db_name))
            if url and args.count_binds:
                counts = await count_round_trips(data_dir, db_env, url, prepare_more(data_dir, db_env, args))
    return {
        "machine": machine(),
        "raw_hsm_sign_per_s": raw_rates,
        "rows": [asdict(r) for r in rows],
        "postgresql_per_bind": counts,
    }


async def soak(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF" and not k.startswith("KEYBINDER_")}
    data_dir = tmp / "soak"
    individuals = prepare(data_dir, env, 2000)
    samples: list[tuple[float, float]] = []
    with server(data_dir, env, 1) as (proc, port):
        load = Load(port, partner_metadata(data_dir), channels=2)
        try:
            await load.run(individuals[:500], 16)  # warm-up: caches, pools, allocator arenas
            start = time.monotonic()
            end = start + args.soak

            async def sample() -> None:
                while time.monotonic() < end:
                    rss = memory_kib(proc.pid, "VmRSS") / 1024
                    samples.append((time.monotonic() - start, rss))
                    print(f"  t={samples[-1][0]:5.0f} s  RSS {rss:6.1f} MiB", flush=True)
                    await asyncio.sleep(10)

            (elapsed, latencies, errors, _client_cpu), _ = await asyncio.gather(
                load.run(individuals, 64, until=end), sample()
            )
        finally:
            await load.close()
        hwm = memory_kib(proc.pid, "VmHWM") / 1024
    first, last = samples[0][1], samples[-1][1]
    p50, p99 = quantiles(latencies)
    result = {
        "machine": machine(),
        "seconds": elapsed,
        "binds": len(latencies),
        "errors": errors,
        "binds_per_s": len(latencies) / elapsed,
        "p50_ms": p50,
        "p99_ms": p99,
        "rss_first_mib": first,
        "rss_last_mib": last,
        "rss_peak_mib": hwm,
        "growth_percent": (last - first) / first * 100,
        "samples": samples,
    }
    print(
        f"soak: {len(latencies)} binds in {elapsed:.0f} s ({result['binds_per_s']:.0f}/s, p50 {p50:.1f} ms,"
        f" p99 {p99:.1f} ms, {errors} errors); RSS {first:.1f} -> {last:.1f} MiB"
        f" ({result['growth_percent']:+.1f} %), peak {hwm:.1f} MiB"
    )
    return result


def machine() -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    parser.add_argument(
        "--databases",
        nargs="+",
        choices=["sqlite", "postgresql"],
        default=["sqlite", "postgresql"],
        help="the stores to run (default both)",
    )
    parser.add_argument("--binds", type=int, default=3000, help="bindings measured at 64 in flight")
    parser.add_argument("--binds-serial", type=int, default=300, help="bindings measured at 1 in flight")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server URL; a fresh database is created on it and dropped ('' to leave PostgreSQL out)",
    )
    parser.add_argument(
        "--rpc-threads", type=int, help="the server's rpc_threads (default: its own choice per database)"
    )
    parser.add_argument(
        "--count-binds",
        type=int,
        default=500,
        help="bindings through the counting proxy for round trips per bind (PostgreSQL; 0 to leave out)",
    )
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="RSS growth run instead of the matrix")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.rpc_threads is not None:
        SERVER_ENV["KEYBINDER_RPC_THREADS"] = str(args.rpc_threads)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="keybinder-bench-") as tmp:
        results = asyncio.run(soak(args, Path(tmp)) if args.soak else matrix(args, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
