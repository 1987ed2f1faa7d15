"""The keybinder CLI as an operator runs it: init, identities, issuer show, two serve processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key, read_otp
from server.provisioning import DEMO_PARTNER
from server.stores.sqlite import SqliteStore
from tests.conftest import LOOSE_LIMITS, SOFTHSM_MODULE, require

KEYBINDER = [sys.executable, "-m", "server"]
DEMO_ID = "9876543210"


def cli_env() -> dict[str, str]:
    """The environment of a fresh shell: no SoftHSM config inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF" and not k.startswith("KEYBINDER_")}
    env["PYTHONUNBUFFERED"] = "1"
    # Servers started here send many OTPs to one demo individual: keep the abuse limits out of the way.
    env |= {f"KEYBINDER_{name.upper()}": str(value) for name, value in LOOSE_LIMITS.items()}
    return env


def kb_cli(*args: str, data_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYBINDER, *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        check=False,
    )


def make_data_dir(path: Path) -> Path:
    """`keybinder init` and an identity import into ``path``, as an operator would do it."""
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    result = kb_cli("init", "--demo-partner", data_dir=path)
    assert result.returncode == 0, result.stderr
    identities = path.parent / "identities.json"
    bob = {"individual_id": DEMO_ID, "email": "bob@example.net", "phone": "5550001234", "pin": "590417", "name": "B"}
    identities.write_text(json.dumps([bob]))
    result = kb_cli("identities", "import", str(identities), data_dir=path)
    assert result.returncode == 0, result.stderr
    assert "1 new" in result.stdout
    return path


def partner_md(data_dir: Path) -> tuple[tuple[str, str], ...]:
    """Metadata of the demo partner that `init --demo-partner` registered in ``data_dir``."""
    return (("partner-id", DEMO_PARTNER), ("partner-api-key", (data_dir / "demo-partner.key").read_text().strip()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("cli-data"))


def test_init_creates_everything_then_reuses_it(data_dir: Path) -> None:
    assert (data_dir / "softhsm2.conf").exists()
    assert (data_dir / "keybinder.db").exists()
    for secret in ("hsm-pin", "hsm-so-pin"):
        assert (data_dir / secret).stat().st_mode & 0o077 == 0, f"{secret} must be owner-only"
    again = kb_cli("init", data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    for item in ("token", "database", "HMAC key", "issuer"):
        assert f"reused   {item}" in again.stdout
    # The PIN files' contents never appear in what init prints.
    pin = (data_dir / "hsm-pin").read_text().strip()
    assert pin not in again.stdout + again.stderr


def test_issuer_show_prints_the_stored_chain(data_dir: Path) -> None:
    result = kb_cli("issuer", "show", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    certs = x509.load_pem_x509_certificates(result.stdout.encode())
    assert len(certs) == 1
    bc = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        assert [r.certificate_pem for r in store.issuers()] == [result.stdout]
    finally:
        store.close()


def test_identity_import_stores_no_clear_id_or_pin(data_dir: Path) -> None:
    raw = (data_dir / "keybinder.db").read_bytes()
    wal = data_dir / "keybinder.db-wal"
    if wal.exists():
        raw += wal.read_bytes()
    assert DEMO_ID.encode() not in raw
    assert b"590417" not in raw
    assert b"bob@example.net" in raw  # the contact is needed in clear to deliver OTPs


def test_identity_import_is_idempotent_and_reports_updates(data_dir: Path) -> None:
    identities = data_dir.parent / "identities.json"
    result = kb_cli("identities", "import", str(identities), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "0 new, 1 updated" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read"),
        ('{"individual_id": "1"}', "JSON array"),
        ('[{"email": "a@b.c"}]', "individual_id"),
        ('[{"individual_id": "1", "shoe_size": "9"}]', "shoe_size"),
        ('[{"individual_id": "bad id!"}]', "malformed"),
        ('[{"individual_id": "1", "pin": "12ab56"}]', "6 digits"),
    ],
    ids=["not-json", "not-array", "no-id", "unknown-key", "bad-id", "bad-pin"],
)
def test_identity_import_rejects_bad_files(data_dir: Path, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = kb_cli("identities", "import", str(path), data_dir=data_dir)
    assert result.returncode != 0
    assert message in result.stderr
    assert "12ab56" not in result.stderr


def test_a_bad_entry_anywhere_imports_nothing(data_dir: Path, tmp_path: Path) -> None:
    entries = [{"individual_id": "5550007777", "email": "first@example.com"}, {"individual_id": "bad id!"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(entries))
    before = _count_identities(data_dir)
    result = kb_cli("identities", "import", str(path), data_dir=data_dir)
    assert result.returncode != 0
    assert "entry 1" in result.stderr
    assert _count_identities(data_dir) == before, "the valid first entry must not have been imported"


def _count_identities(data_dir: Path) -> int:
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        return store.count_identities()
    finally:
        store.close()


def test_identities_add_reads_the_pin_from_stdin_not_argv(data_dir: Path) -> None:
    result = kb_cli(
        "identities", "add", "5550009999", "--email", "c@example.com", "--with-pin", data_dir=data_dir, stdin="864209\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "added"
    assert "864209" not in result.stdout + result.stderr


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    port: int

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def start_serve(data_dir: Path) -> ServeProcess:
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--port", "0", "--workers", "1", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"serve did not start: {line!r} {err}")
    return ServeProcess(proc, int(line.rsplit(":", 1)[1]))


@pytest.fixture
def two_servers(data_dir: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    first = start_serve(data_dir)
    try:
        second = start_serve(data_dir)
    except BaseException:
        first.proc.kill()
        raise
    try:
        yield first, second
    finally:
        for server in (first, second):
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)


def bind_via(port: int, data_dir: Path) -> pb.DoKeyBindingResponse:
    metadata = partner_md(data_dir)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        sent = stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=DEMO_ID, otp_channels=["phone"]), metadata=metadata, timeout=10
        )
        otp = read_otp(data_dir / "outbox.jsonl", sent.transaction_id)
        _, jwk = new_wallet_key("ec-p256")
        return stub.DoKeyBinding(  # type: ignore[no-any-return]
            pb.DoKeyBindingRequest(
                individual_id=DEMO_ID,
                challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
                public_key_jwk=jwk,
                bind_auth_factor_type="WLA",
            ),
            metadata=metadata,
            timeout=10,
        )


def test_two_serve_processes_share_token_and_database(
    data_dir: Path, two_servers: tuple[ServeProcess, ServeProcess], tmp_path: Path
) -> None:
    first, second = two_servers
    assert first.port != second.port
    issuer_pem = kb_cli("issuer", "show", data_dir=data_dir).stdout
    (tmp_path / "issuer.pem").write_text(issuer_pem)
    responses = [bind_via(first.port, data_dir), bind_via(second.port, data_dir), bind_via(first.port, data_dir)]
    for index, response in enumerate(responses):
        path = tmp_path / f"wallet{index}.pem"
        path.write_text(response.certificate)
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "issuer.pem"), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    # Same individual and partner through either process: one PSUT, and only the newest binding active.
    assert len({r.partner_specific_user_token for r in responses}) == 1
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        states = sorted(str(b.status) for b in store.bindings_for(_id_hmac(data_dir), DEMO_PARTNER))
    finally:
        store.close()
    assert states.count("active") == 1
    assert states.count("superseded") >= 2
    for server in (first, second):
        assert server.stop() == 0
        assert server.proc.stderr is not None
        log = server.proc.stderr.read()
        # Each process logged in to the token itself, and shut down cleanly on SIGTERM.
        assert "logged in to token 'keybinder'" in log
        assert "stopped" in log


def _id_hmac(data_dir: Path) -> bytes:
    """The stored ID-HMAC of DEMO_ID, found by asking a fresh process (it logs in to the token itself)."""
    code = (
        "import sys; from server.app import build_app; from server.config import load_settings;"
        f"a = build_app(load_settings(data_dir={str(data_dir)!r}));"
        f"sys.stdout.write(a.service.id_hmac({DEMO_ID!r}).hex()); a.close()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True, timeout=60
    )
    return bytes.fromhex(out.stdout)


def test_serve_refuses_a_port_in_use(data_dir: Path) -> None:
    server = start_serve(data_dir)
    try:
        clash = subprocess.run(
            [*KEYBINDER, "serve", "--port", str(server.port), "--workers", "1", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
            check=False,
        )
        assert clash.returncode != 0
        assert "cannot listen" in clash.stderr
    finally:
        assert server.stop() == 0


def test_serve_fails_clearly_without_a_token(tmp_path: Path) -> None:
    started = time.monotonic()
    result = kb_cli("serve", "--port", "0", "--workers", "1", data_dir=tmp_path / "empty")
    assert result.returncode != 0
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
