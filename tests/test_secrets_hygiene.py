"""Secrets (OTPs, PINs, the HSM PIN, tokens, raw IDs) never reach logs, error messages or argv."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from tests.conftest import (
    Person,
    RunningServer,
    bind_request,
    md,
    other_otp,
    other_pin,
    otp_challenge,
    pin_challenge,
    send_otp,
)
from tests.test_cli import DEMO_ID, start_serve


def test_a_full_flow_logs_no_secret(kb: RunningServer, person: Person, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []

    def attempt(call: object) -> None:
        try:
            call()  # type: ignore[operator]
        except grpc.RpcError as err:
            messages.append(f"{err.code()} {err.details()}")

    tx, otp = send_otp(kb, person)
    key, jwk = new_wallet_key("ec-p256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    wrong_otp, wrong_pin = other_otp(otp), other_pin(person.pin)
    attempt(lambda: kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(wrong_otp)), metadata=md()))
    attempt(lambda: kb.stub.DoKeyBinding(bind_request(person, jwk, pin_challenge(wrong_pin)), metadata=md()))
    bound = kb.stub.DoKeyBinding(
        bind_request(person, jwk, otp_challenge(otp), pin_challenge(person.pin)), metadata=md()
    )
    now = int(time.time())
    claims = {"sub": person.individual_id, "aud": "keybinder", "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
    token = jws.serialize_compact(
        {"alg": "ES256", "x5t#S256": bound.thumbprint}, json.dumps(claims), ECKey.import_key(key), algorithms=["ES256"]
    )
    request = pb.VerifyWalletTokenRequest(token=token, individual_id=person.individual_id)
    kb.stub.VerifyWalletToken(request, metadata=md())
    attempt(lambda: kb.stub.VerifyWalletToken(request, metadata=md()))  # replayed
    attempt(
        lambda: kb.stub.VerifyWalletToken(pb.VerifyWalletTokenRequest(token=token, individual_id="x"), metadata=md())
    )
    private_jwk = json.dumps(ECKey.import_key(key).as_dict(private=True))
    attempt(lambda: kb.stub.DoKeyBinding(bind_request(person, private_jwk, pin_challenge(person.pin)), metadata=md()))

    hsm_pin = (kb.app.settings.data_dir / "hsm-pin").read_text().strip()
    secrets_used: dict[str, str] = {
        "OTP": otp,
        "wrong OTP": wrong_otp,
        "PIN": person.pin,
        "wrong PIN": wrong_pin,
        "HSM PIN": hsm_pin,
        "WLA token signature": token.rsplit(".", 1)[1],
        "private key d": str(ECKey.import_key(key).as_dict(private=True)["d"]),
        "individual ID": person.individual_id,
    }
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert len(messages) == 5, messages
    for name, value in secrets_used.items():
        assert value not in logged, f"{name} reached the log"
        assert all(value not in m for m in messages), f"{name} reached an error message"
    assert tx  # the transaction id is not a secret; the OTP it stands for is


def test_the_hsm_pin_is_not_on_any_command_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.test_cli import make_data_dir

    data_dir = make_data_dir(tmp_path_factory.mktemp("argv-data"))
    server = start_serve(data_dir)
    try:
        pin = (data_dir / "hsm-pin").read_text().strip()
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert str(data_dir) in cmdline  # it is the right process
        assert pin not in cmdline
        assert DEMO_ID not in cmdline
    finally:
        assert server.stop() == 0
    assert server.proc.stderr is not None
    assert pin not in server.proc.stderr.read()


# -- grpcio's own log (issue 13, item 11) ----------------------------------------------------------


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """One HPACK "literal header field without indexing, new name" (no Huffman), lengths below 127."""
    assert len(name) < 127
    assert len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def raw_call_with_header(port: int, name: bytes, value: bytes) -> bytes:
    """A gRPC call written by hand (HTTP/2 frames), so that a header can carry bytes no gRPC client sends."""
    headers = b"".join(
        _hpack_literal(n, v)
        for n, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/keybinder.v1.KeyBinderService/GetSupportedChallengeFormats"),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"partner-id", b"test-wallet"),
            (name, value),
        ]
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0, b"")  # SETTINGS
            + _frame(1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00")  # DATA: an empty message, END_STREAM
        )
        received = b""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            if b"grpc-status" in received:
                break
    return received


def test_a_header_value_grpcio_cannot_decode_is_never_logged(
    kb: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = b"kb-secret-api-key-0123456789"
    answer = raw_call_with_header(kb.port, b"partner-api-key", secret + b"\xff\xfe")
    assert b"grpc-status" in answer, "the call was answered"
    time.sleep(0.2)
    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.exc_info[1] if r.exc_info else ''}" for r in caplog.records
    )
    assert secret.decode() not in logged
    assert "kb-secret" not in logged
