"""The real server on PostgreSQL: init, two worker processes, bindings and WLA verification."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key, read_otp
from server.stores.postgres import PostgresStore
from tests.conftest import SOFTHSM_MODULE, fresh_database, require
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, kb_cli

PARTNER = "pg-wallet"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_database("kb_server") as url:
        yield url


@pytest.fixture(scope="module")
def pg_data_dir(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Path:
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    path = tmp_path_factory.mktemp("pg-data")
    (path / "keybinder.toml").write_text(f'database_url = "{pg_url}"\n')
    for _ in range(2):  # the second init must reuse everything
        result = kb_cli("init", "--config", str(path / "keybinder.toml"), data_dir=path)
        assert result.returncode == 0, result.stderr
    assert "created" not in result.stdout
    # A partner registered through the CLI, in PostgreSQL; its key is printed once.
    result = kb_cli("partners", "add", PARTNER, "--config", str(path / "keybinder.toml"), data_dir=path)
    assert result.returncode == 0, result.stderr
    (path / "pg-wallet.key").write_text(result.stdout.split("api key ", 1)[1].split()[0])
    people = path / "people.json"
    people.write_text(json.dumps([{"individual_id": DEMO_ID, "email": "p@example.org", "pin": "815062"}]))
    result = kb_cli("identities", "import", str(people), "--config", str(path / "keybinder.toml"), data_dir=path)
    assert result.returncode == 0, result.stderr
    return path


def test_server_on_postgres_binds_and_verifies(pg_data_dir: Path, pg_url: str) -> None:
    md = (("partner-id", PARTNER), ("partner-api-key", (pg_data_dir / "pg-wallet.key").read_text()))
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--port", "0", "--workers", "2", "--data-dir", str(pg_data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env() | {"KEYBINDER_CONFIG": str(pg_data_dir / "keybinder.toml")},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("keybinder listening on"), proc.stderr.read() if proc.stderr else line
        port = int(line.split()[3].rsplit(":", 1)[1])
        thumbprints = []
        for _ in range(4):  # new connections, so both workers take part
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.KeyBinderServiceStub(channel)
                sent = stub.SendBindingOtp(
                    pb.SendBindingOtpRequest(individual_id=DEMO_ID, otp_channels=["email"]), metadata=md
                )
                otp = read_otp(pg_data_dir / "outbox.jsonl", sent.transaction_id)
                key, jwk = new_wallet_key("ec-p256")
                assert isinstance(key, ec.EllipticCurvePrivateKey)
                bound = stub.DoKeyBinding(
                    pb.DoKeyBindingRequest(
                        individual_id=DEMO_ID,
                        challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
                        public_key_jwk=jwk,
                        bind_auth_factor_type="WLA",
                    ),
                    metadata=md,
                )
                thumbprints.append(bound.thumbprint)
                now = int(time.time())
                claims = {"sub": DEMO_ID, "aud": "keybinder", "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
                token = jws.serialize_compact(
                    {"alg": "ES256", "x5t#S256": bound.thumbprint},
                    json.dumps(claims),
                    ECKey.import_key(key),
                    algorithms=["ES256"],
                )
                verified = stub.VerifyWalletToken(
                    pb.VerifyWalletTokenRequest(token=token, individual_id=DEMO_ID), metadata=md
                )
                assert verified.valid
                assert verified.thumbprint == bound.thumbprint
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    store = PostgresStore(pg_url)
    try:
        found = [store.binding_by_thumbprint(t) for t in thumbprints]
        assert [str(b.status) if b else None for b in found] == ["superseded", "superseded", "superseded", "active"]
        assert store.count_rows("wla_jtis") == 4
    finally:
        store.close()
