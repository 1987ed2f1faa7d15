"""Production shape under stress: kill -9 of every worker under load, and PostgreSQL restarted under load
(a throwaway cluster of the test's own; the shared server on 5432 is never restarted)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key
from server.stores.postgres import POOL_TIMEOUT_SECONDS
from tests.conftest import SOFTHSM_MODULE, fresh_database, require
from tests.test_cli import KEYBINDER, cli_env, kb_cli, partner_md

PEOPLE = [f"{8100000000 + i}" for i in range(12)]
PIN = "482913"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_database("kb_durable") as url:
        yield url


def make_data_dir(path: Path, pg_url: str) -> Path:
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    (path / "keybinder.toml").write_text(f'database_url = "{pg_url}"\n')
    assert kb_cli("init", "--demo-partner", "--config", str(path / "keybinder.toml"), data_dir=path).returncode == 0
    people = path / "people.json"
    people.write_text(json.dumps([{"individual_id": p, "pin": PIN} for p in PEOPLE]))
    result = kb_cli("identities", "import", str(people), "--config", str(path / "keybinder.toml"), data_dir=path)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("durable-data"), pg_url)


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb in a temporary directory, a free port), so that the restart
    test never touches the shared server on 5432. As root the cluster runs as the postgres user (initdb
    refuses root)."""

    def __init__(self, root: Path) -> None:
        versions = (
            sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) if Path("/usr/lib/postgresql").is_dir() else []
        )
        require(bool(versions), "PostgreSQL server binaries (initdb) for a throwaway cluster")
        self.bin = versions[-1].parent
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True)
        assert result.returncode == 0, f"{tool} failed: {result.stderr[-2000:]}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    # Not under pytest's tmp dir: that is private to root (0700), and the cluster runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="kb-own-pg-"))
    root.chmod(0o755)
    try:
        cluster = OwnPostgres(root)
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(AssertionError):
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(data_dir: Path, workers: int = 2) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--port", "0", "--workers", str(workers), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env() | {"KEYBINDER_CONFIG": str(data_dir / "keybinder.toml"), "KEYBINDER_HEALTH_PROBE_SECONDS": "0.5"},
        start_new_session=True,  # its own process group, so the whole tree can be killed at once
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on"):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"serve did not start: {line!r}")
    return proc, int(line.split()[3].rsplit(":", 1)[1])


@dataclass
class Load:
    """Client threads binding fresh keys with PIN challenges, recording what the server acknowledged."""

    port: int
    metadata: tuple[tuple[str, str], ...]
    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, index: int) -> None:
        keys = [new_wallet_key("ec-p256")[1] for _ in range(300)]
        n = 0
        while not self.stop.is_set() and n < len(keys):
            person = PEOPLE[(index * 7 + n) % len(PEOPLE)]
            request = pb.DoKeyBindingRequest(
                individual_id=person,
                challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=PIN)],
                public_key_jwk=keys[n],
                bind_auth_factor_type="WLA",
            )
            n += 1
            try:
                with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                    response = pb_grpc.KeyBinderServiceStub(channel).DoKeyBinding(
                        request, metadata=self.metadata, timeout=10
                    )
            except grpc.RpcError as err:
                with self.lock:
                    self.failures.append((err.code(), reason(err)))
                time.sleep(0.05)
                continue
            with self.lock:
                self.acknowledged.append((person, response.thumbprint))

    def start(self, threads: int) -> None:
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def check_database(pg_url: str, acknowledged: list[tuple[str, str]]) -> None:
    """Every acknowledged binding is there, and nobody has two active bindings."""
    with psycopg.connect(pg_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT cert_thumbprint FROM bindings")}
        doubles = conn.execute(
            "SELECT id_hmac, count(*) FROM bindings WHERE status = 'active'"
            " GROUP BY id_hmac, partner_id, auth_factor_type HAVING count(*) > 1"
        ).fetchall()
    missing = [t for _, t in acknowledged if t not in stored]
    assert not missing, f"{len(missing)} acknowledged bindings lost"
    assert not doubles


def wait_serving(port: int, metadata: tuple[tuple[str, str], ...], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
                    pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=metadata, timeout=2
                )
            return
        except grpc.RpcError:
            time.sleep(0.2)
    pytest.fail("server did not come back")


def test_kill_9_of_every_worker_loses_no_acknowledged_binding(data_dir: Path, pg_url: str) -> None:
    proc, port = start(data_dir)
    load = Load(port, partner_md(data_dir))
    load.start(4)
    try:
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)  # supervisor and every worker, mid-flight
        proc.wait(10)
    finally:
        load.finish()
    assert len(load.acknowledged) > 20, "the load never got going"
    restarted, port = start(data_dir)
    try:
        wait_serving(port, partner_md(data_dir))
        check_database(pg_url, load.acknowledged)
    finally:
        os.killpg(restarted.pid, signal.SIGTERM)
        restarted.wait(30)


def test_postgres_restart_under_load(tmp_path: Path, own_postgres: OwnPostgres) -> None:
    own_data = make_data_dir(tmp_path, own_postgres.url)
    proc, port = start(own_data)
    load = Load(port, partner_md(own_data))
    load.start(3)
    try:
        time.sleep(1.5)
        before = len(load.acknowledged)
        own_postgres.stop()
        try:
            # Longer than the pool's wait (POOL_TIMEOUT_SECONDS), so requests in the gap must fail, cleanly.
            time.sleep(POOL_TIMEOUT_SECONDS + 2)
        finally:
            own_postgres.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(load.acknowledged) < before + 20:
            time.sleep(0.2)
    finally:
        load.finish()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert len(load.acknowledged) >= before + 20, "the pool did not recover after the restart"
    assert load.failures, "the outage was not noticed"
    unexpected = [f for f in load.failures if f != (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")]
    assert not unexpected, f"failures other than UNAVAILABLE/key_binding_failed: {unexpected[:5]}"
    check_database(own_postgres.url, load.acknowledged)
