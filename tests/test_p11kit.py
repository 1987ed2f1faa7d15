"""KeyBinder on a network HSM: SoftHSM served by `p11-kit server`, reached through p11-kit-client.so.

The server is configured with a p11-kit URI only; nothing in KeyBinder knows it is remote. The
restart test kills the whole HSM server process group under load and starts it again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from server.config import Settings
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.issuer_admin import issuer_chain_pem
from tests.conftest import (
    SOFTHSM_MODULE,
    RunningServer,
    bind_request,
    failure,
    md,
    new_person,
    otp_challenge,
    running,
    send_otp,
)
from tests.hsm_backends import P11KIT_CLIENT, HsmBackend, P11KitServer
from tests.test_cli import cli_env, kb_cli, make_data_dir, partner_md
from tests.test_faults import bind_request as fault_bind_request
from tests.test_faults import binding_rows, health, start, wait_for

# -- bindings through p11-kit, in-process server ---------------------------------------------------


@pytest.fixture(scope="module")
def kb_remote(settings: Settings, p11kit_backend: HsmBackend, kb: RunningServer) -> Iterator[RunningServer]:
    """A second server on the session's data, configured with the p11-kit URI of the same token."""
    remote = settings.model_copy(update={"hsm_uri": str(p11kit_backend.uri)})
    with running(remote) as server:
        yield server


def test_server_uses_the_module_its_uri_names(kb_remote: RunningServer) -> None:
    assert kb_remote.app.keys.uri.module_path == P11KIT_CLIENT
    assert kb_remote.app.keys.uri.module_env[0][0] == "P11_KIT_SERVER_ADDRESS"


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048", "ed25519"])
def test_binding_through_p11kit(kb: RunningServer, kb_remote: RunningServer, key_type: str) -> None:
    # Registered through the in-process SoftHSM server, bound through the remote one: the HMAC
    # key behind p11-kit is the same key, so the individual is found.
    from server.grpc_api.demo import new_wallet_key

    person = new_person(kb)
    _, otp = send_otp(kb_remote, person)
    private, jwk = new_wallet_key(key_type)
    resp = kb_remote.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
    cert = x509.load_pem_x509_certificate(resp.certificate.encode())
    issuer = x509.load_pem_x509_certificates(issuer_chain_pem(kb_remote.app.store).encode())[0]
    cert.verify_directly_issued_by(issuer)
    assert cert.public_key() == private.public_key()


def test_concurrent_bindings_through_p11kit(kb: RunningServer, kb_remote: RunningServer) -> None:
    from server.grpc_api.demo import new_wallet_key

    # One binding per person: a newer OTP for the same person replaces the older one.
    people = [new_person(kb) for _ in range(12)]
    issuer = x509.load_pem_x509_certificates(issuer_chain_pem(kb_remote.app.store).encode())[0]

    def bind_one(i: int) -> x509.Certificate:
        person = people[i]
        _, otp = send_otp(kb_remote, person)
        _, jwk = new_wallet_key("ec-p256")
        resp = kb_remote.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md(), timeout=30)
        return x509.load_pem_x509_certificate(resp.certificate.encode())

    with ThreadPoolExecutor(6) as pool:
        certs = list(pool.map(bind_one, range(len(people))))
    for cert in certs:
        cert.verify_directly_issued_by(issuer)
    assert len({c.serial_number for c in certs}) == len(people)


# -- the HSM server killed and restarted under a running KeyBinder ---------------------------------


@dataclass(frozen=True)
class Outcome:
    step: str  # "otp" or "bind"
    code: grpc.StatusCode
    reason: str
    certificate: str


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


LOOP_ID = "5550001111"


class BindingLoop:
    """Bindings one after another on their own channel, every outcome recorded."""

    def __init__(self, data_dir: Path, target: str) -> None:
        self.data_dir = data_dir
        self.target = target
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="binding-loop", daemon=True)

    def __enter__(self) -> BindingLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def ok_count(self) -> int:
        return sum(1 for o in self.outcomes if o.code is grpc.StatusCode.OK)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            while not self._stop.is_set():
                try:
                    req = fault_bind_request(self.data_dir, stub, LOOP_ID)
                except grpc.RpcError as err:
                    self.outcomes.append(Outcome("otp", err.code(), reason_of(err), ""))
                    time.sleep(0.05)
                    continue
                try:
                    resp = stub.DoKeyBinding(req, metadata=partner_md(self.data_dir), timeout=20)
                except grpc.RpcError as err:
                    self.outcomes.append(Outcome("bind", err.code(), reason_of(err), ""))
                    time.sleep(0.05)
                    continue
                self.outcomes.append(Outcome("bind", grpc.StatusCode.OK, "", resp.certificate))


@pytest.fixture
def remote_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, P11KitServer]]:
    """A data directory whose SoftHSM token is served by a p11-kit server of its own."""
    data_dir = make_data_dir(tmp_path_factory.mktemp("p11kit-data"))
    # The binding loop's individual: its own, so an OTP the test sends another individual never replaces the
    # loop's outstanding one (a new OTP invalidates the previous, by design).
    loop_people = data_dir.parent / "loop-identities.json"
    loop_people.write_text(json.dumps([{"individual_id": LOOP_ID, "email": "loop@example.net"}]))
    result = kb_cli("identities", "import", str(loop_people), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    env = cli_env() | {"SOFTHSM2_CONF": str(data_dir / "softhsm2.conf")}
    hsm = P11KitServer(tmp_path_factory.mktemp("p11kit-restart") / "sock", SOFTHSM_MODULE, env)
    hsm.start()
    try:
        yield data_dir, hsm
    finally:
        hsm.kill()


def mapped_modules(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_hsm_server_restart_under_load(remote_data: tuple[Path, P11KitServer]) -> None:
    data_dir, hsm = remote_data
    uri = hsm.uri("keybinder", f"file:{data_dir / 'hsm-pin'}", "keybinder-issuer")
    rows_at_start = binding_rows(data_dir)
    proc, port = start(data_dir, "--workers", "1", "--hsm-uri", str(uri))
    try:
        # Only the client module is in the process: every PKCS#11 call crosses the socket.
        maps = mapped_modules(proc.pid)
        assert "p11-kit-client.so" in maps
        assert "libsofthsm2.so" not in maps
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, BindingLoop(data_dir, f"127.0.0.1:{port}") as loop:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            assert wait_for(lambda: loop.ok_count() >= 3, 30), loop.outcomes
            pending = fault_bind_request(data_dir, stub)  # OTP sent while the HSM is still up

            hsm.kill()  # the whole process group: the forked per-connection servers die too
            err = failure(lambda: stub.DoKeyBinding(pending, metadata=partner_md(data_dir), timeout=20))
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
            assert wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)
            rows_in_gap = binding_rows(data_dir)
            failures_before = len([o for o in loop.outcomes if o.code is not grpc.StatusCode.OK])
            assert wait_for(
                lambda: len([o for o in loop.outcomes if o.code is not grpc.StatusCode.OK]) >= failures_before + 3, 30
            )
            assert binding_rows(data_dir) == rows_in_gap, "nothing may be written while the HSM is away"
            ok_before_restart = loop.ok_count()

            hsm.start()  # same socket, a new server process: KeyBinder is not restarted
            recovered = wait_for(lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING, 30)
            assert recovered, "KeyBinder did not re-initialise the module after the HSM came back"
            assert wait_for(lambda: loop.ok_count() >= ok_before_restart + 3, 30), loop.outcomes[-5:]
        assert proc.poll() is None, "KeyBinder must survive the HSM restart"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)

    binds = [o for o in loop.outcomes if o.step == "bind"]
    # Every failed binding failed as retryable key_binding_failed; nothing else leaked out.
    assert {(o.code, o.reason) for o in binds if o.code is not grpc.StatusCode.OK} <= {
        (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
    }
    assert {o.code for o in loop.outcomes if o.step == "otp"} <= {grpc.StatusCode.UNAVAILABLE}
    # No binding is half-written: one complete row per success (plus the first bindings'), each
    # with a certificate the issuer signed.
    ok = [o for o in binds if o.code is grpc.StatusCode.OK]
    with sqlite3.connect(data_dir / "keybinder.db") as conn:
        rows = conn.execute("SELECT certificate_pem, cert_thumbprint FROM bindings").fetchall()
        chain = [r[0] for r in conn.execute("SELECT certificate_pem FROM issuers").fetchall()]
    assert len(rows) == rows_at_start + len(ok)
    issuer = x509.load_pem_x509_certificate(chain[0].encode())
    certs = {x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()) for pem, _ in rows}
    for outcome in ok:
        cert = x509.load_pem_x509_certificate(outcome.certificate.encode())
        cert.verify_directly_issued_by(issuer)
        assert cert.fingerprint(hashes.SHA256()) in certs
    # It logged in again (a new generation) and never printed the PIN.
    assert "generation 2" in stderr
    assert (data_dir / "hsm-pin").read_text().strip() not in stderr
