"""TLS and mTLS on real `keybinder serve` processes: certificates made with `cryptography`, reload, plaintext rules."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from server.config import load_settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.partners import certificate_fingerprint
from server.stores.sqlite import SqliteStore
from server.tls import ReloadingCredentials, TlsConfigError, TlsFiles, check_listen, is_loopback, load
from tests.conftest import failure
from tests.test_cli import DEMO_ID, KEYBINDER, _id_hmac, cli_env, kb_cli, make_data_dir, partner_md
from tests.test_partners import Serve, issued_key, wait_until

Metadata = tuple[tuple[str, str], ...]


# -- certificates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``name``.pem and ``name``.key (0600) atomically, as a certificate manager would."""
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        replace_file(key, self.key_pem, mode=0o600)
        replace_file(cert, self.cert_pem)
        return cert, key


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def make_leaf(ca: Issued, name: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


# -- clients ---------------------------------------------------------------------------------------------


def tls_channel(port: int, ca: Issued, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.cert_pem, client.key_pem if client else None, client.cert_pem if client else None
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def tls_formats(port: int, ca: Issued, metadata: Metadata = (), client: Issued | None = None) -> object:
    with tls_channel(port, ca, client) as channel:
        return pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=metadata, timeout=5
        )


def handshake_fails(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError as err:
        return bool(err.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def accepted(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError:
        return False
    return True


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("tls-data"))


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("KeyBinder test CA")


@pytest.fixture(scope="module")
def client_ca() -> Issued:
    return make_ca("Partner client CA")


# -- settings and the plaintext rule ----------------------------------------------------------------


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        load_settings(data_dir=tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="client_ca"):
        load_settings(data_dir=tmp_path, client_ca=tmp_path / "ca.pem")
    s = load_settings(data_dir=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    assert s.tls
    assert not s.allow_plaintext


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104 - the address under test
        ("::", False),
        ("10.1.2.3", False),
        ("", False),
        ("192.0.2.1", False),
    ],
)
def test_only_loopback_may_be_plaintext(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_listen(host, tls=False, allow_plaintext=False)
    else:
        with pytest.raises(TlsConfigError, match="refusing to serve plaintext"):
            check_listen(host, tls=False, allow_plaintext=False)
    check_listen(host, tls=True, allow_plaintext=False)
    check_listen(host, tls=False, allow_plaintext=True)


def test_serve_refuses_plaintext_on_all_interfaces(data_dir: Path) -> None:
    result = kb_cli("serve", "--listen", "0.0.0.0:0", "--workers", "1", data_dir=data_dir)
    assert result.returncode == 2
    assert "refusing to serve plaintext on 0.0.0.0" in result.stderr
    assert "--allow-plaintext" in result.stderr


def test_allow_plaintext_serves_on_all_interfaces(data_dir: Path, tmp_path: Path) -> None:
    server = Serve(data_dir, tmp_path / "serve.log", "--listen", "0.0.0.0:0", "--workers", "1", "--allow-plaintext")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
                pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=partner_md(data_dir), timeout=5
            )
        assert list(response.formats) == ["number"]
    finally:
        assert server.stop() == 0
    assert "(plaintext)" in server.stderr()


def test_bad_tls_files_are_refused_before_serving(data_dir: Path, tmp_path: Path, ca: Issued) -> None:
    cert, key = make_leaf(ca, "server", server=True).write(tmp_path, "server")
    _, other_key = make_leaf(ca, "other", server=True).write(tmp_path, "other")
    (tmp_path / "garbage.pem").write_text("not a certificate")
    cases = [
        (["--tls-cert", str(cert)], "tls_cert and tls_key go together"),
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], "does not belong to the certificate"),
        (["--tls-cert", str(tmp_path / "garbage.pem"), "--tls-key", str(key)], "holds no PEM certificate"),
        (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "garbage.pem")], "holds no unencrypted PEM private key"),
        (["--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", str(key)], "cannot read a TLS file"),
        (["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(tmp_path / "garbage.pem")], "CA"),
    ]
    for args, message in cases:
        result = kb_cli("serve", "--port", "0", "--workers", "1", *args, data_dir=data_dir)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        # The key file's contents never reach the error output.
        assert "PRIVATE KEY" not in result.stderr


# -- TLS on a real server -----------------------------------------------------------------------------


def test_tls_serves_and_reloads_a_changed_certificate(data_dir: Path, tmp_path: Path, ca: Issued) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_leaf(ca, "server-1", server=True).write(certs, "server")
    server = Serve(data_dir, tmp_path / "serve.log", "--workers", "1", "--tls-cert", str(cert), "--tls-key", str(key))
    md = partner_md(data_dir)
    try:
        assert tls_formats(server.port, ca, md)
        # No plaintext on a TLS port, and no TLS client that does not trust the CA.
        assert handshake_fails(lambda: _plain_formats(server.port, md))
        stranger = make_ca("Stranger CA")
        assert handshake_fails(lambda: tls_formats(server.port, stranger, md))
        # Credentials are still needed over TLS.
        assert failure(lambda: tls_formats(server.port, ca)).reason == "required_header_missing"

        # Renewal by a certificate manager: a certificate from another CA, written atomically.
        new_ca = make_ca("KeyBinder renewed CA")
        make_leaf(new_ca, "server-2", server=True).write(certs, "server")
        assert wait_until(lambda: accepted(lambda: tls_formats(server.port, new_ca, md)))
        assert handshake_fails(lambda: tls_formats(server.port, ca, md))

        # A half-finished renewal (new certificate, old key) is not loaded: the server keeps what it has.
        third_ca = make_ca("KeyBinder third CA")
        third = make_leaf(third_ca, "server-3", server=True)
        replace_file(cert, third.cert_pem)
        assert accepted(lambda: tls_formats(server.port, new_ca, md))
        assert handshake_fails(lambda: tls_formats(server.port, third_ca, md))
        assert wait_until(lambda: "TLS: not reloading" in server.stderr())
        replace_file(key, third.key_pem, mode=0o600)  # the key arrives
        assert wait_until(lambda: accepted(lambda: tls_formats(server.port, third_ca, md)))
    finally:
        assert server.stop() == 0
    log = server.stderr()
    assert "listening on 127.0.0.1" in log
    assert "(TLS)" in log
    assert log.count("TLS: reloaded certificate") == 2
    assert "PRIVATE KEY" not in log


def _plain_formats(port: int, md: Metadata) -> object:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=md, timeout=5
        )


def test_sighup_forces_a_reload_on_every_worker(data_dir: Path, tmp_path: Path, ca: Issued) -> None:
    cert, key = make_leaf(ca, "server-hup", server=True).write(tmp_path, "server")
    server = Serve(data_dir, tmp_path / "serve.log", "--workers", "2", "--tls-cert", str(cert), "--tls-key", str(key))
    md = partner_md(data_dir)
    try:
        assert tls_formats(server.port, ca, md)
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: server.stderr().count("TLS: reload requested") == 2)
        # The files are reread at the next handshake of each worker, even though they did not change.
        assert wait_until(
            lambda: (
                accepted(lambda: tls_formats(server.port, ca, md))
                and server.stderr().count("TLS: reloaded certificate") == 2
            ),
            seconds=15,
        )
        assert server.proc.poll() is None, "SIGHUP must not stop the server"
    finally:
        assert server.stop() == 0


def test_reloading_credentials_skip_unchanged_files(tmp_path: Path, ca: Issued) -> None:
    cert, key = make_leaf(ca, "server", server=True).write(tmp_path, "server")
    creds = ReloadingCredentials(TlsFiles(cert, key))
    assert creds.fetch() is None  # nothing changed: gRPC keeps its configuration
    creds.request_reload()
    assert creds.fetch() is not None
    assert creds.fetch() is None
    make_leaf(ca, "server-2", server=True).write(tmp_path, "server")
    assert creds.fetch() is not None
    assert creds.subject == "CN=server-2"
    cert.unlink()  # a missing file keeps the current certificate
    assert creds.fetch() is None
    assert creds.reloads == 2
    with pytest.raises(TlsConfigError):
        load(TlsFiles(cert, key))


# -- mTLS ---------------------------------------------------------------------------------------------


def test_mtls_client_certificate_authenticates_a_partner(
    data_dir: Path, tmp_path: Path, ca: Issued, client_ca: Issued
) -> None:
    cert, key = make_leaf(ca, "server-mtls", server=True).write(tmp_path, "server")
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem)
    wallet = make_leaf(client_ca, "mtls-wallet", server=False)
    wallet_cert, _ = wallet.write(tmp_path, "wallet")
    unregistered = make_leaf(client_ca, "someone", server=False)
    foreign = make_leaf(make_ca("Foreign CA"), "mtls-wallet", server=False)
    result = kb_cli("partners", "add", "mtls-wallet", "--client-cert", str(wallet_cert), data_dir=data_dir)
    issued_key(result)
    listing = kb_cli("partners", "list", data_dir=data_dir).stdout
    [row] = [line.split() for line in listing.splitlines() if line.startswith("mtls-wallet ")]
    assert row[2] == certificate_fingerprint(wallet.cert_pem)
    # One certificate, one partner.
    taken = kb_cli("partners", "add", "copycat", "--client-cert", str(wallet_cert), data_dir=data_dir)
    assert taken.returncode == 1
    assert "registered to another partner" in taken.stderr

    server = Serve(
        data_dir,
        tmp_path / "serve.log",
        "--workers",
        "1",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--client-ca",
        str(tmp_path / "client-ca.pem"),
        env={"KEYBINDER_PARTNER_CACHE_SECONDS": "0"},
    )
    demo = partner_md(data_dir)
    try:
        # The certificate alone is enough; the headers, if sent, must name the same partner.
        assert tls_formats(server.port, ca, (), wallet)
        assert tls_formats(server.port, ca, (("partner-id", "mtls-wallet"),), wallet)
        mismatch = failure(lambda: tls_formats(server.port, ca, (("partner-id", "demo-wallet"),), wallet))
        assert (mismatch.reason, mismatch.message) == (
            "invalid_partner",
            "the partner-id header does not match the client certificate",
        )
        # A binding made with the certificate alone belongs to that partner.
        thumbprint = _bind(server.port, ca, wallet, data_dir)
        store = SqliteStore(data_dir / "keybinder.db")
        try:
            bindings = store.bindings_for(_id_hmac(data_dir), "mtls-wallet")
        finally:
            store.close()
        assert [b.cert_thumbprint for b in bindings] == [thumbprint]

        # A certificate of the client CA that no partner registered: the API key decides.
        assert failure(lambda: tls_formats(server.port, ca, (), unregistered)).reason == "required_header_missing"
        assert tls_formats(server.port, ca, demo, unregistered)
        # No client certificate, or one from another CA: no TLS session at all.
        assert handshake_fails(lambda: tls_formats(server.port, ca, demo))
        assert handshake_fails(lambda: tls_formats(server.port, ca, demo, foreign))

        # Disabling the partner disables its certificate.
        assert kb_cli("partners", "disable", "mtls-wallet", data_dir=data_dir).returncode == 0
        assert failure(lambda: tls_formats(server.port, ca, (), wallet)).reason == "invalid_partner"
        assert kb_cli("partners", "enable", "mtls-wallet", data_dir=data_dir).returncode == 0
        # Removing the certificate mapping: the certificate no longer names a partner.
        assert kb_cli("partners", "set-cert", "mtls-wallet", data_dir=data_dir).returncode == 0
        assert failure(lambda: tls_formats(server.port, ca, (), wallet)).reason == "required_header_missing"
        assert kb_cli("partners", "set-cert", "mtls-wallet", str(wallet_cert), data_dir=data_dir).returncode == 0
        assert tls_formats(server.port, ca, (), wallet)
    finally:
        assert server.stop() == 0
    assert "client certificates required (mTLS)" in server.stderr()


def _bind(port: int, ca: Issued, client: Issued, data_dir: Path) -> str:
    from server.grpc_api.demo import new_wallet_key, read_otp

    with tls_channel(port, ca, client) as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        sent = stub.SendBindingOtp(pb.SendBindingOtpRequest(individual_id=DEMO_ID, otp_channels=["email"]), timeout=10)
        otp = read_otp(data_dir / "outbox.jsonl", sent.transaction_id)
        _, jwk = new_wallet_key("ec-p256")
        response = stub.DoKeyBinding(
            pb.DoKeyBindingRequest(
                individual_id=DEMO_ID,
                challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
                public_key_jwk=jwk,
                bind_auth_factor_type="WLA",
            ),
            timeout=10,
        )
    return str(response.thumbprint)


def test_health_stays_open_over_mtls_and_demo_runs_over_tls(
    data_dir: Path, tmp_path: Path, ca: Issued, client_ca: Issued
) -> None:
    cert, key = make_leaf(ca, "server-demo", server=True).write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem)
    client = make_leaf(client_ca, "demo-client", server=False)
    client_cert, client_key = client.write(tmp_path, "client")
    server = Serve(
        data_dir,
        tmp_path / "serve.log",
        "--workers",
        "1",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--client-ca",
        str(tmp_path / "client-ca.pem"),
    )
    try:
        with tls_channel(server.port, ca, client) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        # The demo client over mTLS, with the demo partner's key from its file (the certificate is not registered).
        result = subprocess.run(
            [
                *KEYBINDER,
                "demo",
                "--target",
                f"localhost:{server.port}",
                "--individual-id",
                DEMO_ID,
                "--ca-cert",
                str(tmp_path / "ca.pem"),
                "--client-cert",
                str(client_cert),
                "--client-key",
                str(client_key),
                "--data-dir",
                str(data_dir),
            ],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "BEGIN CERTIFICATE" in result.stdout
    finally:
        assert server.stop() == 0
