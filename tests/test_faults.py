"""Faults on the real server process: the HSM token disappears and comes back, a worker is killed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key, read_otp
from tests.conftest import failure
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, make_data_dir, partner_md


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory of its own: these tests pull its token out from under the server."""
    return make_data_dir(tmp_path_factory.mktemp("fault-data"))


def start(data_dir: Path, *extra: str, probe_seconds: float = 0.3) -> tuple[subprocess.Popen[str], int]:
    env = cli_env() | {"KEYBINDER_HEALTH_PROBE_SECONDS": str(probe_seconds)}
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--port", "0", "--data-dir", str(data_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on "):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r} {proc.communicate(timeout=10)[1]}")
    return proc, int(line.split()[3].rsplit(":", 1)[1])


def wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def health(channel: grpc.Channel) -> int:
    try:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)
    except grpc.RpcError:
        return -1


def bind_request(
    data_dir: Path, stub: pb_grpc.KeyBinderServiceStub, individual_id: str = DEMO_ID
) -> pb.DoKeyBindingRequest:
    sent = stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=["email"]), metadata=partner_md(data_dir)
    )
    otp = read_otp(data_dir / "outbox.jsonl", sent.transaction_id)
    return pb.DoKeyBindingRequest(
        individual_id=individual_id,
        challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
        public_key_jwk=new_wallet_key("ec-p256")[1],
        bind_auth_factor_type="WLA",
    )


def binding_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "keybinder.db") as conn:
        return int(conn.execute("SELECT count(*) FROM bindings").fetchone()[0])


@pytest.fixture
def served(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], grpc.Channel]]:
    proc, port = start(data_dir, "--workers", "1")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield proc, channel
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_token_directory_gone_then_back(data_dir: Path, served: tuple[subprocess.Popen[str], grpc.Channel]) -> None:
    proc, channel = served
    stub = pb_grpc.KeyBinderServiceStub(channel)
    assert stub.DoKeyBinding(bind_request(data_dir, stub), metadata=partner_md(data_dir)).certificate
    pending = bind_request(data_dir, stub)  # OTP sent while the HSM is still there
    rows = binding_rows(data_dir)
    tokens, away = data_dir / "tokens", data_dir / "tokens.away"
    tokens.rename(away)
    try:
        err = failure(lambda: stub.DoKeyBinding(pending, metadata=partner_md(data_dir)))
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
        assert binding_rows(data_dir) == rows, "nothing may be written while the HSM is away"
        assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        away.rename(tokens)
    # No restart: the worker re-initialises the module, logs in again and finds its keys again.
    recovered = wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING)
    if not recovered:
        proc.send_signal(signal.SIGTERM)
        pytest.fail(proc.communicate(timeout=30)[1][-3000:])
    assert stub.DoKeyBinding(bind_request(data_dir, stub), metadata=partner_md(data_dir)).certificate
    assert proc.poll() is None


def test_killed_worker_is_replaced(data_dir: Path) -> None:
    proc, port = start(data_dir, "--workers", "2")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            assert stub.DoKeyBinding(bind_request(data_dir, stub), metadata=partner_md(data_dir)).certificate
            children = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)
            assert wait_for(
                lambda: (
                    len(
                        [
                            p
                            for p in subprocess.run(
                                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
                            ).stdout.split()
                            if int(p) != workers[0] and "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()
                        ]
                    )
                    == 2
                )
            )
        # A fresh connection may land on either worker; every one of them must serve.
        for _ in range(6):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.KeyBinderServiceStub(channel)
                assert stub.DoKeyBinding(
                    bind_request(data_dir, stub), metadata=partner_md(data_dir), timeout=15
                ).certificate
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "restarting" in log
    assert "draining 2 workers" in log
