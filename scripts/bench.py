"""Benchmark: DoKeyBinding end to end over gRPC against the raw HSM signing rate, in one run.

For each database (SQLite, and PostgreSQL when reachable) and each worker count (1 and 2) it starts a
real `keybinder serve` (own data directory, own SoftHSM token, own database), then drives it with a
grpc.aio client at 1 and at 64 requests in flight: PIN challenge, a fresh EC P-256 wallet key and a
distinct individual for every binding. It prints binds/s, p50/p99 latency, server CPU milliseconds per
bind (utime+stime of every server process, from /proc), the peak RSS of each worker (VmHWM), the
error count, and the ratio of binds/s to the raw HSM ECDSA P-256 signing rate measured in the same
run (one process, one session, same token type).

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.demo import new_wallet_key  # noqa: E402
from server.gen.keybinder.v1 import keybinder_pb2 as pb  # noqa: E402
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc  # noqa: E402

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
        f"  CPU {row.server_cpu_ms_per_bind:5.2f} ms/bind (client {row.client_cpu_ms_per_bind:4.2f})"
        f"  peak RSS {rss} MiB  errors {row.errors}"
        f"  ratio {row.ratio_to_raw_sign:.3f}",
        flush=True,
    )


# -- the runs ---------------------------------------------------------------------------------


async def measure(
    data_dir: Path,
    env: dict[str, str],
    database: str,
    workers: int,
    individuals: list[str],
    args: argparse.Namespace,
    raw: float,
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
                elapsed, latencies, errors, client_cpu = await load.run(batch, in_flight)
                cpu = cpu_seconds(process_tree(proc.pid)) - before
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
    databases: list[tuple[str, contextlib.AbstractContextManager[str | None]]] = [
        ("sqlite", contextlib.nullcontext("")),
    ]
    if args.postgres:
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
                rows.extend(await measure(data_dir, db_env, name, workers, share, args, raw))
    return {
        "machine": machine(),
        "raw_hsm_sign_per_s": raw_rates,
        "rows": [asdict(r) for r in rows],
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
