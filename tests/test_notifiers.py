"""SMTP and webhook notifiers against real servers started here: aiosmtpd (STARTTLS + AUTH) and http.server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from server.app import build_notifier
from server.config import Settings, load_settings
from server.domain import OtpChannel, OtpMessage
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.notifiers import SecretSourceError, read_secret
from server.notifiers.smtp import SmtpConfig, SmtpNotifier
from server.notifiers.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookConfig,
    WebhookNotifier,
    check_webhook_url,
)
from server.ports import DeliveryFailed
from tests.conftest import (
    Person,
    RpcFailure,
    RunningServer,
    bind_request,
    failure,
    md,
    new_person,
    otp_challenge,
    running,
)

SMTP_USER = "otp-mailer"
SMTP_PASSWORD = "correct horse battery staple"
WEBHOOK_SECRET = b"webhook-secret-0123456789abcdef"
OTP_IN_TEXT = re.compile(r"code is ([A-Z0-9]{6})\b")


# -- a TLS certificate for 127.0.0.1 / localhost, trusted only through its file ---------------


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    folder = tmp_path_factory.mktemp("smtp-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(folder / "cert.pem", folder / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


# -- a real SMTP server: aiosmtpd requiring STARTTLS and AUTH -------------------------------


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    message: Message
    tls: bool
    authenticated_as: str


@dataclass
class SmtpServer:
    port: int
    delivered: list[Delivered] = field(default_factory=list)

    def otp(self, index: int = -1) -> str:
        payload = self.delivered[index].message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found = OTP_IN_TEXT.search(payload.decode())
        assert found, "the e-mail carries no OTP"
        return found.group(1)


class _Capture:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else ""
        self.server.delivered.append(
            Delivered(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                message_from_bytes(envelope.content),
                session.ssl is not None,
                login,
            )
        )
        return "250 OK"


def _authenticator(smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data == LoginPassword(SMTP_USER.encode(), SMTP_PASSWORD.encode())
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


class _PortZeroController(Controller):
    """aiosmtpd's Controller on an ephemeral port: learn the port before it pokes the server."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


def _smtp_server(tls: TlsFiles | None) -> Iterator[SmtpServer]:
    server = SmtpServer(port=0)
    controller = _PortZeroController(
        _Capture(server),
        hostname="127.0.0.1",
        port=0,
        tls_context=tls.server_context() if tls else None,
        require_starttls=tls is not None,
        auth_required=tls is not None,
        auth_require_tls=True,
        authenticator=_authenticator,
    )
    controller.start()
    server.port = controller.port
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def smtp_server(tls: TlsFiles) -> Iterator[SmtpServer]:
    """STARTTLS required before anything else, then AUTH (LOGIN/PLAIN) required before MAIL."""
    yield from _smtp_server(tls)


@pytest.fixture
def plain_smtp_server() -> Iterator[SmtpServer]:
    """An SMTP server that offers no STARTTLS at all."""
    yield from _smtp_server(None)


def smtp_config(server: SmtpServer, tls: TlsFiles, **changes: Any) -> SmtpConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "from_address": "KeyBinder <otp@keybinder.test>",
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "ca_file": tls.cert,
        "timeout_seconds": 5.0,
    } | changes
    return SmtpConfig(**values)


def otp_message(channel: OtpChannel = OtpChannel.EMAIL, otp: str = "K7Q2ZP") -> OtpMessage:
    to = "alice@example.org" if channel is OtpChannel.EMAIL else "+4915112345678"
    return OtpMessage(channel, to, "tx-" + otp, otp, datetime.now(UTC))


# -- a real HTTP server playing the SMS gateway -----------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Gateway:
    """Answers each POST with the next scripted status (then ``default_status``), after a delay."""

    url: str
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    delay_seconds: float = 0.0
    received: list[Received] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def otp(self, index: int = -1) -> str:
        return str(json.loads(self.received[index].body)["otp"])


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out and hung up is part of the test, not an error to print."""


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    state: dict[str, Gateway] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            gw = state["gw"]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            gw.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
            status = gw.statuses.pop(0) if gw.statuses else gw.default_status
            if gw.delay_seconds:
                gw.released.wait(gw.delay_seconds)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", f"{gw.url}/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    state["gw"] = Gateway(url=f"http://127.0.0.1:{httpd.server_address[1]}/sms")
    thread = threading.Thread(target=httpd.serve_forever, name="test-sms-gateway", daemon=True)
    thread.start()
    try:
        yield state["gw"]
    finally:
        state["gw"].released.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def webhook(gw: Gateway, **changes: Any) -> WebhookNotifier:
    values: dict[str, Any] = {
        "url": gw.url,
        "secret": WEBHOOK_SECRET,
        "timeout_seconds": 2.0,
        "retries": 2,
        "backoff_seconds": 0.01,
    } | changes
    return WebhookNotifier(WebhookConfig(**values))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- SMTP ----------------------------------------------------------------------------------------


def test_smtp_delivers_over_starttls_with_auth(smtp_server: SmtpServer, tls: TlsFiles) -> None:
    message = otp_message()
    SmtpNotifier(smtp_config(smtp_server, tls, otp_ttl_seconds=180)).send(message)
    [mail] = smtp_server.delivered
    assert mail.tls, "the message must travel after STARTTLS"
    assert mail.authenticated_as == SMTP_USER
    assert mail.mail_from == "otp@keybinder.test"
    assert mail.rcpt_tos == ["alice@example.org"]
    assert mail.message["To"] == "alice@example.org"
    assert mail.message["Subject"] == "Your wallet binding code"
    assert re.fullmatch(r"<[^<>@\s]+@keybinder\.test>", str(mail.message["Message-ID"]).strip())
    assert smtp_server.otp() == message.otp
    body = mail.message.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert b"expires in 3 minutes" in body


def test_smtp_wrong_password_is_a_delivery_failure_without_the_password(smtp_server: SmtpServer, tls: TlsFiles) -> None:
    with pytest.raises(DeliveryFailed, match="535") as info:
        SmtpNotifier(smtp_config(smtp_server, tls, password="wrong password")).send(otp_message())
    assert "wrong password" not in str(info.value)
    assert smtp_server.delivered == []


def test_smtp_refuses_a_server_certificate_it_does_not_trust(smtp_server: SmtpServer, tls: TlsFiles) -> None:
    with pytest.raises(DeliveryFailed, match="SSLCertVerificationError"):
        SmtpNotifier(smtp_config(smtp_server, tls, ca_file=None)).send(otp_message())
    assert smtp_server.delivered == []


def test_smtp_never_falls_back_to_clear_text(plain_smtp_server: SmtpServer, tls: TlsFiles) -> None:
    with pytest.raises(DeliveryFailed, match="SMTPNotSupportedError"):
        SmtpNotifier(smtp_config(plain_smtp_server, tls)).send(otp_message())
    assert plain_smtp_server.delivered == []


def test_smtp_unreachable_server_is_a_delivery_failure() -> None:
    config = SmtpConfig(host="127.0.0.1", port=closed_port(), from_address="otp@keybinder.test", timeout_seconds=2)
    with pytest.raises(DeliveryFailed, match="ConnectionRefusedError"):
        SmtpNotifier(config).send(otp_message())


def test_smtp_notifier_does_not_send_sms(smtp_server: SmtpServer, tls: TlsFiles) -> None:
    with pytest.raises(DeliveryFailed, match="phone"):
        SmtpNotifier(smtp_config(smtp_server, tls)).send(otp_message(OtpChannel.PHONE))
    assert smtp_server.delivered == []


@pytest.mark.parametrize("to", ["alice@example.org\r\nBcc: mallory@example.org", "alice@example.org\nX: y"])
def test_smtp_refuses_header_injection_through_the_address(smtp_server: SmtpServer, tls: TlsFiles, to: str) -> None:
    message = OtpMessage(OtpChannel.EMAIL, to, "tx-1", "K7Q2ZP", datetime.now(UTC))
    with pytest.raises(DeliveryFailed, match="header"):
        SmtpNotifier(smtp_config(smtp_server, tls)).send(message)
    assert smtp_server.delivered == []


def test_smtp_config_refuses_auth_in_clear_text() -> None:
    with pytest.raises(ValueError, match="STARTTLS"):
        SmtpConfig(host="h", port=25, from_address="a@b", username="u", password="p", starttls=False)
    with pytest.raises(ValueError, match="password"):
        SmtpConfig(host="h", port=25, from_address="a@b", username="u")
    assert "p4ss" not in repr(SmtpConfig(host="h", port=25, from_address="a@b", username="u", password="p4ss"))


# -- webhook ---------------------------------------------------------------------------------------


def test_webhook_posts_signed_json(gateway: Gateway) -> None:
    message = otp_message(OtpChannel.PHONE)
    before = int(time.time())
    webhook(gateway).send(message)
    [request] = gateway.received
    body = json.loads(request.body)
    assert body == {
        "channel": "phone",
        "to": "+4915112345678",
        "transaction_id": message.transaction_id,
        "otp": message.otp,
        "message": body["message"],
        "sent_at": message.sent_at.isoformat(),
    }
    assert f"code is {message.otp}." in body["message"]
    assert request.headers["content-type"] == "application/json"
    timestamp = request.headers[TIMESTAMP_HEADER.lower()]
    assert before <= int(timestamp) <= int(time.time())
    expected = hmac.new(WEBHOOK_SECRET, timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers[SIGNATURE_HEADER.lower()], f"sha256={expected}")
    assert request.headers[IDEMPOTENCY_HEADER.lower()] == f"{message.transaction_id}:phone"


def test_webhook_retries_a_5xx_then_delivers(gateway: Gateway) -> None:
    gateway.statuses = [500, 503]
    webhook(gateway, retries=2).send(otp_message(OtpChannel.PHONE))
    assert len(gateway.received) == 3
    assert len({r.headers[IDEMPOTENCY_HEADER.lower()] for r in gateway.received}) == 1
    assert len({r.body for r in gateway.received}) == 1


def test_webhook_always_5xx_fails_after_the_retries(gateway: Gateway) -> None:
    gateway.default_status = 500
    with pytest.raises(DeliveryFailed, match=r"3 time.*HTTP 500"):
        webhook(gateway, retries=2).send(otp_message(OtpChannel.PHONE))
    assert len(gateway.received) == 3


def test_webhook_4xx_is_not_retried(gateway: Gateway) -> None:
    gateway.statuses = [400]
    with pytest.raises(DeliveryFailed, match="HTTP 400"):
        webhook(gateway, retries=3).send(otp_message(OtpChannel.PHONE))
    assert len(gateway.received) == 1


def test_webhook_429_is_retried(gateway: Gateway) -> None:
    gateway.statuses = [429]
    webhook(gateway, retries=1).send(otp_message(OtpChannel.PHONE))
    assert len(gateway.received) == 2


def test_webhook_redirect_is_not_followed(gateway: Gateway) -> None:
    gateway.statuses = [307]
    with pytest.raises(DeliveryFailed, match="HTTP 307"):
        webhook(gateway).send(otp_message(OtpChannel.PHONE))
    assert len(gateway.received) == 1


def test_webhook_timeout_is_retried_then_fails(gateway: Gateway) -> None:
    gateway.delay_seconds = 5.0
    started = time.monotonic()
    with pytest.raises(DeliveryFailed, match=r"2 time.*TimeoutError"):
        webhook(gateway, timeout_seconds=0.3, retries=1).send(otp_message(OtpChannel.PHONE))
    assert time.monotonic() - started < 3.0
    assert len(gateway.received) == 2


def test_webhook_connection_refused_is_retried_then_fails() -> None:
    notifier = WebhookNotifier(
        WebhookConfig(url=f"http://127.0.0.1:{closed_port()}/sms", secret=WEBHOOK_SECRET, retries=2, backoff_seconds=0)
    )
    with pytest.raises(DeliveryFailed, match=r"3 time.*ConnectionRefusedError"):
        notifier.send(otp_message(OtpChannel.PHONE))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://sms.example.org/send", "must be https"),
        ("ftp://127.0.0.1/x", "http"),
        ("https://user:pw@sms.example.org/", "credentials"),
        ("https:///nohost", "host"),
    ],
)
def test_webhook_url_rules(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_webhook_url(url)


def test_webhook_url_allows_https_and_loopback_http() -> None:
    for url in ("https://sms.example.org/send", "http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]/x"):
        assert check_webhook_url(url) == url


def test_webhook_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        WebhookConfig(url="https://sms.example.org/", secret=b"short")


# -- settings and secret sources ----------------------------------------------------------------


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret-from-file\n")
    assert read_secret(f"file:{tmp_path / 'pw'}", "SMTP password") == "s3cret-from-file"
    monkeypatch.setenv("KB_TEST_SECRET", "s3cret-from-env")
    assert read_secret("env:KB_TEST_SECRET", "SMTP password") == "s3cret-from-env"
    (tmp_path / "empty").write_text("\n")
    for source, why in [
        ("env:KB_TEST_UNSET_SECRET", "not set"),
        (f"file:{tmp_path / 'missing'}", "cannot read"),
        (f"file:{tmp_path / 'empty'}", "empty"),
        ("", "no source"),
    ]:
        with pytest.raises(SecretSourceError, match=why):
            read_secret(source, "SMTP password")


NOTIFIER_CONFIG_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"email_notifier": "smtp"}, "smtp_host and smtp_from"),
    ({"email_notifier": "smtp", "smtp_host": "h", "smtp_from": "a@b", "smtp_username": "u"}, "smtp_password_source"),
    (
        {
            "email_notifier": "smtp",
            "smtp_host": "h",
            "smtp_from": "a@b",
            "smtp_username": "u",
            "smtp_password_source": "env:X",
            "smtp_starttls": False,
        },
        "smtp_starttls",
    ),
    ({"phone_notifier": "webhook", "webhook_url": "https://gw.example/"}, "webhook_secret_source"),
    (
        {"phone_notifier": "webhook", "webhook_url": "http://gw.example/", "webhook_secret_source": "env:X"},
        "must be https",
    ),
    ({"phone_notifier": "smtp"}, "phone_notifier"),
]


@pytest.mark.parametrize(("values", "why"), NOTIFIER_CONFIG_ERRORS)
def test_settings_refuse_incomplete_or_unsafe_notifier_config(tmp_path: Path, values: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        load_settings(data_dir=tmp_path, **values)


def test_a_secret_pasted_as_its_source_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="never the secret itself") as info:
        load_settings(data_dir=tmp_path, smtp_password_source="hunter2-hunter2")
    assert "hunter2" not in str(info.value)


def test_a_missing_secret_fails_the_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At load time, so `keybinder serve` stops with a clear message before spawning any worker."""
    webhook: dict[str, Any] = {"phone_notifier": "webhook", "webhook_url": "https://gw.example/sms"}
    with pytest.raises(ValidationError, match="webhook HMAC secret file"):
        load_settings(data_dir=tmp_path, **webhook, webhook_secret_source=f"file:{tmp_path / 'no-such-secret'}")
    smtp: dict[str, Any] = {"email_notifier": "smtp", "smtp_host": "h", "smtp_from": "a@b", "smtp_username": "u"}
    with pytest.raises(ValidationError, match=r"SMTP password \(KB_TEST_NO_SUCH_VAR\) is not set"):
        load_settings(data_dir=tmp_path, **smtp, smtp_password_source="env:KB_TEST_NO_SUCH_VAR")


def test_the_secret_is_read_again_by_the_wiring(tmp_path: Path) -> None:
    secret = tmp_path / "webhook-secret"
    secret.write_text(WEBHOOK_SECRET.decode())
    settings = load_settings(
        data_dir=tmp_path,
        phone_notifier="webhook",
        webhook_url="https://gw.example/sms",
        webhook_secret_source=f"file:{secret}",
    )
    secret.unlink()
    with pytest.raises(SecretSourceError, match="webhook HMAC secret file"):
        build_notifier(settings)


# -- through the real gRPC server: SendBindingOtp -> delivered message -> DoKeyBinding ----------


@contextmanager
def serving(settings: Settings, **changes: Any) -> Iterator[RunningServer]:
    """Another real server on the session's token and database, with other notifier settings."""
    custom = load_settings(**(settings.model_dump() | changes))
    with running(custom) as server:
        yield server


def smtp_settings(server: SmtpServer, tls: TlsFiles, password_file: Path) -> dict[str, Any]:
    password_file.write_text(SMTP_PASSWORD + "\n")
    return {
        "email_notifier": "smtp",
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "smtp_from": "otp@keybinder.test",
        "smtp_username": SMTP_USER,
        "smtp_password_source": f"file:{password_file}",
        "smtp_ca_file": tls.cert,
    }


def webhook_settings(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("KB_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
    return {
        "phone_notifier": "webhook",
        "webhook_url": gw.url,
        "webhook_secret_source": "env:KB_TEST_WEBHOOK_SECRET",
        "webhook_timeout_seconds": 1.0,
        "webhook_retries": 2,
    }


def send(kb: RunningServer, person: Person, channel: str) -> pb.SendBindingOtpResponse:
    sent: pb.SendBindingOtpResponse = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=[channel]), metadata=md()
    )
    return sent


def bind(kb: RunningServer, person: Person, otp: str) -> pb.DoKeyBindingResponse:
    _, jwk = new_wallet_key("ec-p256")
    bound: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
    return bound


def ours(caplog: pytest.LogCaptureFixture) -> str:
    """What KeyBinder logged (aiosmtpd, the test's mail server, logs whole messages at DEBUG)."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail."))


def outbox_lines(settings: Settings) -> int:
    return len(settings.outbox.read_text().splitlines()) if settings.outbox.exists() else 0


def test_server_emails_the_otp_over_smtp_and_it_binds(
    settings: Settings,
    kb: RunningServer,
    smtp_server: SmtpServer,
    tls: TlsFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    outbox_before = outbox_lines(settings)
    with serving(settings, **smtp_settings(smtp_server, tls, tmp_path / "smtp-password")) as server:
        person = new_person(server)
        sent = send(server, person, "email")
        [mail] = smtp_server.delivered
        assert mail.rcpt_tos == [person.email]
        assert mail.tls
        assert mail.authenticated_as == SMTP_USER
        assert sent.masked_email
        assert sent.masked_email != person.email
        otp = smtp_server.otp()
        bound = bind(server, person, otp)
        assert bound.certificate.startswith("-----BEGIN CERTIFICATE-----")
    assert outbox_lines(settings) == outbox_before, "with SMTP chosen, nothing goes to the outbox"
    logged = ours(caplog)
    assert sent.transaction_id in logged, "delivery is logged (by transaction id)"
    assert otp not in logged
    assert SMTP_PASSWORD not in logged


def test_server_failing_smtp_is_send_otp_failed(
    settings: Settings, kb: RunningServer, smtp_server: SmtpServer, tls: TlsFiles, tmp_path: Path
) -> None:
    changes = smtp_settings(smtp_server, tls, tmp_path / "smtp-password")
    (tmp_path / "smtp-password").write_text("not the password\n")
    with serving(settings, **changes) as server:
        person = new_person(server)
        err = failure(lambda: send(server, person, "email"))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed")
        assert "not the password" not in err.message
    assert smtp_server.delivered == []


def test_server_texts_the_otp_through_the_webhook_after_a_5xx_and_it_binds(
    settings: Settings,
    kb: RunningServer,
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway.statuses = [500]
    with serving(settings, **webhook_settings(gateway, monkeypatch)) as server:
        person = new_person(server)
        sent = send(server, person, "phone")
        assert len(gateway.received) == 2
        body = json.loads(gateway.received[-1].body)
        assert (body["channel"], body["to"], body["transaction_id"]) == ("phone", person.phone, sent.transaction_id)
        otp = gateway.otp()
        bind(server, person, otp)
    logged = ours(caplog)
    assert "HTTP 500" in logged, "the failed first attempt is logged"
    assert otp not in logged
    assert WEBHOOK_SECRET.decode() not in logged


def test_server_failing_gateway_is_send_otp_failed_and_the_otp_is_not_usable(
    settings: Settings, kb: RunningServer, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.default_status = 500
    with serving(settings, **webhook_settings(gateway, monkeypatch)) as server:
        person = new_person(server)
        err = failure(lambda: send(server, person, "phone"))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed")
        assert len(gateway.received) == 3, "one try and two retries"
        # The gateway saw the OTP (it just answered 500); it must be dead all the same.
        otp = gateway.otp()
        assert all(json.loads(r.body)["otp"] == otp for r in gateway.received)
        refused = failure(lambda: bind(server, person, otp))
        assert (refused.code, refused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "auth_failed")
        assert otp not in refused.message


def test_server_gateway_timeout_is_send_otp_failed(
    settings: Settings, kb: RunningServer, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.delay_seconds = 5.0
    changes = webhook_settings(gateway, monkeypatch) | {"webhook_timeout_seconds": 0.3, "webhook_retries": 0}
    with serving(settings, **changes) as server:
        person = new_person(server)
        started = time.monotonic()
        err = failure(lambda: send(server, person, "phone"))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed")
        assert time.monotonic() - started < 3.0
        refused = failure(lambda: bind(server, person, gateway.otp()))
        assert refused.reason == "auth_failed"


# -- a notifier that hangs must not stall the server (issue 13, item 2) ---------------------------


@contextmanager
def silent_peer() -> Iterator[str]:
    """An HTTP "gateway" that accepts every connection and never answers a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/sms"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def health_latencies(channel: grpc.Channel, until: threading.Event, seconds: float) -> list[float]:
    """Health Check round trips (seconds), until ``until`` is set or time is up (at least one)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    stub = health_pb2_grpc.HealthStub(channel)
    while not latencies or (not until.is_set() and time.monotonic() < deadline):
        started = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    return latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_a_hanging_webhook_delays_neither_health_nor_other_calls(
    settings: Settings, kb: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with silent_peer() as url:
        monkeypatch.setenv("KB_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
        changes = {
            "phone_notifier": "webhook",
            "webhook_url": url,
            "webhook_secret_source": "env:KB_TEST_WEBHOOK_SECRET",
            "webhook_timeout_seconds": 1.0,
            "webhook_retries": 2,
            "notifier_deadline_seconds": 2.0,
        }
        with serving(settings, **changes) as server:
            person = new_person(server)
            done = threading.Event()
            outcome: list[object] = []

            def hang() -> None:
                started = time.monotonic()
                try:
                    outcome.append(failure(lambda: send(server, person, "phone")))
                finally:
                    outcome.append(time.monotonic() - started)
                    done.set()

            with grpc.insecure_channel(server.target) as channel:
                health_latencies(channel, done, 0)  # connected before the hang starts
                caller = threading.Thread(target=hang, daemon=True)
                caller.start()
                time.sleep(0.05)
                latencies = health_latencies(channel, done, 30)
            # Another partner call answers meanwhile: the loop is free.
            started = time.perf_counter()
            server.stub.GetSupportedChallengeFormats(
                pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=md(), timeout=30
            )
            other = time.perf_counter() - started
            caller.join(30)
    print(
        f"\nnotifier hang: {len(latencies)} health checks, p99 {p99(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms; SendBindingOtp answered after {outcome[-1]:.2f} s"
    )
    assert p99(latencies) < 0.050, f"health p99 {p99(latencies) * 1000:.0f} ms while the notifier hangs"
    assert other < 0.5
    err = outcome[0]
    assert isinstance(err, RpcFailure)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed")
    elapsed = outcome[1]
    assert isinstance(elapsed, float)
    assert elapsed < 2.0 + 1.0, "the delivery's total deadline bounds the call"
