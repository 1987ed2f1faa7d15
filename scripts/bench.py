"""Benchmark: RPC throughput and latency of a real `keybinder serve`, against the raw HSM signing rate.

Starts its own server (own data directory and token) with N workers, drives it with a grpc.aio
client at a given concurrency, and prints ops/s, p50/p99 latency, server CPU per request, and
the ratio of binding throughput to the raw single-process ECDSA signing rate measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.demo import new_wallet_key  # noqa: E402
from server.gen.keybinder.v1 import keybinder_pb2 as pb  # noqa: E402
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The demo partner `init --demo-partner` registers; its API key is added once the key file exists.
PARTNER: tuple[tuple[str, str], ...] = (("partner-id", "demo-wallet"),)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [pid, *(int(p) for p in out)]


def raw_sign_rate(data_dir: Path, seconds: float) -> float:
    """ECDSA P-256 signatures/s with the issuer key, one process, one session: the HSM's own ceiling."""
    code = f"""
import time, sys
from server.config import load_settings
from hsm import Pkcs11KeyManager
s = load_settings(data_dir={str(data_dir)!r}); s.apply_environment()
km = Pkcs11KeyManager(s.pkcs11_uri)
signer = km.create_signer(s.pkcs11_uri.object)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
n, end = 0, time.perf_counter() + {seconds}
while time.perf_counter() < end:
    signer.sign(b"benchmark", ec.ECDSA(hashes.SHA256())); n += 1
print(n / {seconds})
"""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return float(out.stdout.strip())


async def drive(
    call: Callable[[int], Awaitable[object]], total: int, concurrency: int
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, latencies, errors


def report(name: str, elapsed: float, latencies: list[float], errors: int, cpu: float) -> dict[str, float]:
    ok = len(latencies)
    q = statistics.quantiles(latencies, n=100) if ok > 1 else [0.0] * 99
    row = {
        "ops_per_s": ok / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "server_cpu_ms_per_req": cpu / max(ok, 1) * 1000,
        "errors": errors,
    }
    print(
        f"{name:<28} {row['ops_per_s']:>9.0f} ops/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
        f"  server CPU {row['server_cpu_ms_per_req']:5.2f} ms/req  errors {errors}"
    )
    return row


async def run(args: argparse.Namespace, data_dir: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    if args.database_url:
        env["KEYBINDER_DATABASE_URL"] = args.database_url
    kb = [sys.executable, "-m", "server"]
    subprocess.run(
        [*kb, "init", "--demo-partner", "--data-dir", str(data_dir)], check=True, env=env, cwd=ROOT, capture_output=True
    )
    global PARTNER
    PARTNER = (*PARTNER, ("partner-api-key", (data_dir / "demo-partner.key").read_text().strip()))
    people = [
        {"individual_id": f"{7000000000 + i}", "email": f"b{i}@example.com", "phone": "5550001111", "pin": "123456"}
        for i in range(args.individuals)
    ]
    (data_dir / "people.json").write_text(json.dumps(people))
    subprocess.run(
        [*kb, "identities", "import", str(data_dir / "people.json"), "--data-dir", str(data_dir)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    raw = raw_sign_rate(data_dir, 2.0)
    print(f"{'raw HSM ECDSA P-256 sign':<28} {raw:>9.0f} sig/s  (one process, one session, same token)")

    server = subprocess.Popen(
        [*kb, "serve", "--port", "0", "--workers", str(args.workers), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env | {"KEYBINDER_LOG_LEVEL": "WARNING"},
        cwd=ROOT,
    )
    assert server.stdout is not None
    port = int(server.stdout.readline().split()[3].rsplit(":", 1)[1].split()[0])
    time.sleep(0.5)
    pids = tree(server.pid)
    results: dict[str, object] = {
        "raw_hsm_sign_per_s": raw,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "database": "postgresql" if args.database_url else "sqlite",
    }
    try:
        # One channel per 'client connection'; several so that SO_REUSEPORT spreads them across workers.
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(args.workers * 2, 1))]
        stubs = [pb_grpc.KeyBinderServiceStub(c) for c in channels]
        keys = [new_wallet_key("ec-p256")[1] for _ in range(args.bindings)]

        async def formats(i: int) -> object:
            return await stubs[i % len(stubs)].GetSupportedChallengeFormats(
                pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=PARTNER
            )

        async def bind(i: int) -> object:
            person = people[i % len(people)]
            return await stubs[i % len(stubs)].DoKeyBinding(
                pb.DoKeyBindingRequest(
                    individual_id=person["individual_id"],
                    challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=person["pin"])],
                    public_key_jwk=keys[i],
                    bind_auth_factor_type="WLA",
                ),
                metadata=PARTNER,
            )

        for name, call, total in (
            ("GetSupportedChallengeFormats", formats, args.bindings * 2),
            ("DoKeyBinding (PIN, EC P-256)", bind, args.bindings),
        ):
            await drive(call, min(total, 200), args.concurrency)  # warm-up
            if call is bind:
                keys[:] = [new_wallet_key("ec-p256")[1] for _ in range(args.bindings)]
            before = cpu_seconds(pids)
            elapsed, latencies, errors = await drive(call, total, args.concurrency)
            results[name] = report(name, elapsed, latencies, errors, cpu_seconds(pids) - before)
        bind_rate = results["DoKeyBinding (PIN, EC P-256)"]["ops_per_s"]  # type: ignore[index]
        print(f"{'bindings / raw HSM signs':<28} {bind_rate / raw:>9.2f}")
        results["binding_to_raw_sign_ratio"] = bind_rate / raw
        for c in channels:
            await c.close()
    finally:
        server.terminate()
        server.wait(30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bindings", type=int, default=2000)
    parser.add_argument("--individuals", type=int, default=200)
    parser.add_argument("--database-url", help="an empty PostgreSQL database to use instead of SQLite")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keybinder-bench-") as tmp:
        results = asyncio.run(run(args, Path(tmp) / "data"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
