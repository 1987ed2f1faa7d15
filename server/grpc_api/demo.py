"""Example client: the whole binding flow against a running server, as a partner would call it."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from joserfc.jwk import ECKey, OKPKey, RSAKey

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc

WalletPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def new_wallet_key(key_type: str) -> tuple[WalletPrivateKey, str]:
    """A fresh wallet key pair and its public JWK text."""
    key: WalletPrivateKey
    if key_type == "ec-p256":
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECKey.import_key(key.public_key()).as_dict()
    elif key_type == "ec-p384":
        key = ec.generate_private_key(ec.SECP384R1())
        jwk = ECKey.import_key(key.public_key()).as_dict()
    elif key_type == "rsa-2048":
        key = rsa.generate_private_key(65537, 2048)
        jwk = RSAKey.import_key(key.public_key()).as_dict()
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        jwk = OKPKey.import_key(key.public_key()).as_dict()
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key, json.dumps(jwk)


def read_otp(outbox: Path, transaction_id: str, timeout_seconds: float = 5.0) -> str:
    """The OTP the outbox notifier wrote for ``transaction_id``."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if outbox.exists():
            for line in reversed(outbox.read_text().splitlines()):
                message = json.loads(line)
                if message["transaction_id"] == transaction_id:
                    return str(message["otp"])
        time.sleep(0.05)
    raise LookupError(f"no OTP for transaction {transaction_id} in {outbox}")


@dataclass(frozen=True, slots=True)
class DemoTls:
    """Connect with TLS: the CA to trust, and optionally a client certificate and key (mTLS)."""

    ca_cert: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def channel(self, target: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            self.ca_cert.read_bytes(),
            self.client_key.read_bytes() if self.client_key is not None else None,
            self.client_cert.read_bytes() if self.client_cert is not None else None,
        )
        return grpc.secure_channel(target, credentials)


#: Long enough for a loaded machine; a server that does not answer in this time is reported, not waited for.
CALL_TIMEOUT_SECONDS = 15.0


def describe_error(err: grpc.RpcError, target: str) -> str:
    """One line for an RPC error: ``reason: message (retry in N s)``, or what to do when no server answers."""
    status = rpc_status.from_call(err)
    reason, retry = "", ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            delay = error_details_pb2.RetryInfo()
            detail.Unpack(delay)
            retry = f" (retry in {max(delay.retry_delay.seconds, 1)} s)"
    code = err.code()
    if not reason and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"no KeyBinder server answers at {target}: start one with `make run` (or `keybinder serve`)"
    return f"{reason or code.name.lower()}: {err.details()}{retry}"


def run_demo(
    target: str,
    individual_id: str,
    partner: str,
    key_type: str,
    outbox: Path,
    *,
    api_key: str,
    tls: DemoTls | None = None,
    channels: tuple[str, ...] = ("email", "phone"),
) -> int:
    """Walk through a binding; prints each step, or one line saying what failed. The exit status."""
    # The API key travels as metadata, read from a file by the caller: never a command-line argument.
    metadata = (("partner-id", partner), ("partner-api-key", api_key))
    with tls.channel(target) if tls is not None else grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        try:
            formats = stub.GetSupportedChallengeFormats(
                pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"),
                metadata=metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            print(f"1. OTP challenge formats: {list(formats.formats)}")
            sent = stub.SendBindingOtp(
                pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=list(channels)),
                metadata=metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            to = " and ".join(m for m in (sent.masked_email, sent.masked_mobile) if m)
            print(f"2. OTP sent to {to} (transaction {sent.transaction_id})")
            otp = read_otp(outbox, sent.transaction_id)
            print(f"3. read the OTP from {outbox}")
            _, jwk = new_wallet_key(key_type)
            bound = stub.DoKeyBinding(
                pb.DoKeyBindingRequest(
                    individual_id=individual_id,
                    challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
                    public_key_jwk=jwk,
                    bind_auth_factor_type="WLA",
                ),
                metadata=metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as err:
            print(describe_error(err, target), file=sys.stderr)
            return 1
        except LookupError as err:
            print(f"{err}: does the server write to this outbox (same --data-dir)?", file=sys.stderr)
            return 1
    cert = x509.load_pem_x509_certificate(bound.certificate.encode())
    print(f"4. bound a new {key_type} wallet key:")
    print(f"   subject     {cert.subject.rfc4514_string()}")
    print(f"   issuer      {cert.issuer.rfc4514_string()}")
    print(f"   serial      {cert.serial_number:x}")
    print(f"   valid until {bound.expires_at.ToDatetime().isoformat()}Z")
    print(f"   x5t#S256    {bound.thumbprint}")
    print(bound.certificate, end="")
    return 0
