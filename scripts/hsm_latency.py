"""HSM signing latency: inline in the calling thread against a hop to a worker thread, per module URI.

A network HSM adds a round trip to every PKCS#11 call. This measures what that costs for ECDSA
P-256 issuer signatures through `hsm.Pkcs11KeyManager`, and whether handing each signature to a
worker thread (as the gRPC server does for every RPC) costs anything next to it:

  inline          sign in the calling thread, one after another
  thread          each signature handed to a 1-thread executor, the caller waits for it
  loop-inline-cN  N asyncio tasks signing directly on the event loop (each blocks the loop)
  loop-thread-cN  N asyncio tasks awaiting run_in_executor (the server's way)

Without --uri it builds a throw-away SoftHSM token with a P-256 key and measures it twice: in
process, and behind `p11-kit server` through p11-kit-client.so. With --uri it measures that URI
(its object is the key; it must exist). Never run it on a shared machine during tests.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

from hsm import (  # noqa: E402
    KeyKind,
    Pkcs11KeyManager,
    Pkcs11Uri,
    init_token,
)

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
KEY_LABEL = "latency-p256"


def quantiles_us(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1e6, q[98] * 1e6


def report(backend: str, mode: str, count: int, elapsed: float, samples: list[float]) -> None:
    p50, p99 = quantiles_us(samples)
    print(f"{backend:<10} {mode:<16} {count / elapsed:>8.0f} sig/s   p50 {p50:7.0f} us   p99 {p99:7.0f} us")


def measure(backend: str, uri: Pkcs11Uri, count: int, concurrency: int) -> None:
    keys = Pkcs11KeyManager(uri)
    try:
        assert uri.object is not None
        signer = keys.create_signer(uri.object)

        def sign() -> None:
            if isinstance(signer, ec.EllipticCurvePrivateKey):
                signer.sign(b"latency", ec.ECDSA(hashes.SHA256()))
            elif isinstance(signer, rsa.RSAPrivateKey):
                signer.sign(b"latency", padding.PKCS1v15(), hashes.SHA256())
            else:
                signer.sign(b"latency")

        for _ in range(min(200, count)):  # warm up: login, handle lookup, connections
            sign()
        run_sync(backend, "inline", count, sign)
        with ThreadPoolExecutor(1) as pool:
            run_sync(backend, "thread", count, lambda: pool.submit(sign).result())
        asyncio.run(run_async(backend, count, concurrency, sign))
    finally:
        keys.close()


def run_sync(backend: str, mode: str, count: int, call: Callable[[], object]) -> None:
    samples = []
    began = time.perf_counter()
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    report(backend, mode, count, time.perf_counter() - began, samples)


async def run_async(backend: str, count: int, concurrency: int, sign: Callable[[], None]) -> None:
    with ThreadPoolExecutor(concurrency) as pool:
        for mode in ("loop-inline", "loop-thread"):
            began = time.perf_counter()
            samples = await drive_loop(mode, count, concurrency, sign, pool)
            report(backend, f"{mode}-c{concurrency}", count, time.perf_counter() - began, samples)


async def drive_loop(
    mode: str, count: int, concurrency: int, sign: Callable[[], None], pool: ThreadPoolExecutor
) -> list[float]:
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    remaining = iter(range(count))

    async def task() -> None:
        for _ in remaining:
            start = time.perf_counter()
            if mode == "loop-inline":
                sign()
                await asyncio.sleep(0)  # let the other tasks in, as a real server would
            else:
                await loop.run_in_executor(pool, sign)
            samples.append(time.perf_counter() - start)

    await asyncio.gather(*(task() for _ in range(concurrency)))
    return samples


@contextmanager
def throwaway_token() -> Iterator[tuple[Path, Pkcs11Uri]]:
    """A SoftHSM token in a temporary directory with one P-256 key; yields (conf, uri)."""
    with tempfile.TemporaryDirectory(prefix="hsm-latency-") as tmp:
        tokens = Path(tmp, "tokens")
        tokens.mkdir()
        conf = Path(tmp, "softhsm2.conf")
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin_file = Path(tmp, "pin")
        pin_file.write_text(secrets.token_hex(8))
        pin_file.chmod(0o600)
        init_token(SOFTHSM, "latency", so_pin=secrets.token_hex(8), user_pin=pin_file.read_text())
        uri = Pkcs11Uri("latency", SOFTHSM, KEY_LABEL, pin_source=f"file:{pin_file}")
        keys = Pkcs11KeyManager(uri)
        try:
            keys.create_key(KEY_LABEL, KeyKind.EC_P256)
        finally:
            keys.close()
        yield conf, uri


def accepts(socket_path: Path) -> bool:
    """The socket file appears at bind(); only a connect shows that the server listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


@contextmanager
def p11kit_server(conf: Path, socket_path: Path) -> Iterator[str]:
    """`p11-kit server` for SoftHSM in its own process group; yields its address."""
    p11kit = shutil.which("p11-kit")
    if p11kit is None:
        raise SystemExit("p11-kit is not installed (make hsm-deps)")
    proc = subprocess.Popen(
        [p11kit, "server", "-f", "--provider", SOFTHSM, "-n", str(socket_path), "pkcs11:"],
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not accepts(socket_path):
            if time.monotonic() > deadline:
                raise SystemExit("p11-kit server did not start")
            time.sleep(0.02)
        yield f"unix:path={socket_path}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="pkcs11: URI of an existing key (object=label, pin-source=...)")
    parser.add_argument("--count", type=int, default=3000, help="signatures per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="asyncio tasks in the loop-* modes")
    args = parser.parse_args()
    if args.uri:
        uri = Pkcs11Uri.parse(args.uri)
        if uri.object is None:
            parser.error("the URI must name the key (object=...)")
        measure(Path(uri.module_path).name, uri, args.count, args.concurrency)
        return
    clients = sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so"))
    if not clients:
        raise SystemExit("p11-kit-client.so is not installed (make hsm-deps)")
    with throwaway_token() as (conf, uri):
        measure("softhsm", uri, args.count, args.concurrency)
        with p11kit_server(conf, conf.parent / "p11kit.sock") as address:
            remote = Pkcs11Uri(
                uri.token,
                clients[0],
                uri.object,
                pin_source=uri.pin_source,
                module_env=(("P11_KIT_SERVER_ADDRESS", address),),
            )
            measure("p11kit", remote, args.count, args.concurrency)


if __name__ == "__main__":
    main()
