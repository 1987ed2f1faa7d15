"""KeyBinder partner client in Python: OTP -> DoKeyBinding -> WLA token -> VerifyWalletToken.

Run from the repository with the project installed (`make deps`), against `make run`:
    .venv/bin/python examples/python_client.py
Environment: KEYBINDER_TARGET (127.0.0.1:50051), KEYBINDER_PARTNER_ID (demo-wallet),
KEYBINDER_DATA_DIR (.keybinder), KEYBINDER_PARTNER_API_KEY_FILE (<data dir>/demo-partner.key, where
`make setup` writes the demo partner's key), KEYBINDER_INDIVIDUAL_ID (1234567890),
KEYBINDER_OUTBOX (<data dir>/outbox.jsonl), KEYBINDER_AUDIENCE (keybinder).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from joserfc import jws
from joserfc.jwk import ECKey

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc


def read_otp(outbox: Path, transaction_id: str) -> str:
    """The development outbox holds one JSON line per message; a person would read their mail."""
    for _ in range(100):
        lines = outbox.read_text().splitlines() if outbox.exists() else []
        for line in reversed(lines):
            if json.loads(line)["transaction_id"] == transaction_id:
                return str(json.loads(line)["otp"])
        time.sleep(0.05)
    raise LookupError(f"no OTP for transaction {transaction_id} in {outbox}")


def reason(err: grpc.RpcError) -> str:
    """The eSignet reason code: google.rpc.ErrorInfo.reason in the grpc-status-details-bin trailer."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def main() -> int:
    env = os.environ
    individual_id = env.get("KEYBINDER_INDIVIDUAL_ID", "1234567890")
    audience = env.get("KEYBINDER_AUDIENCE", "keybinder")
    data_dir = Path(env.get("KEYBINDER_DATA_DIR", ".keybinder"))
    # A secret: read from a file, never taken from argv, never printed.
    key_file = Path(env.get("KEYBINDER_PARTNER_API_KEY_FILE") or data_dir / "demo-partner.key")
    try:
        api_key = key_file.read_text().strip()
    except OSError as err:
        print(f"cannot read the partner API key from {key_file}: {err.strerror}", file=sys.stderr)
        return 1
    metadata = [("partner-id", env.get("KEYBINDER_PARTNER_ID", "demo-wallet")), ("partner-api-key", api_key)]

    target = env.get("KEYBINDER_TARGET", "127.0.0.1:50051")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        try:
            sent = stub.SendBindingOtp(
                pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=["email"]), metadata=metadata
            )
            otp = read_otp(Path(env.get("KEYBINDER_OUTBOX") or data_dir / "outbox.jsonl"), sent.transaction_id)

            wallet = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
            bound = stub.DoKeyBinding(
                pb.DoKeyBindingRequest(
                    individual_id=individual_id,
                    challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
                    public_key_jwk=json.dumps(wallet.as_dict(private=False)),
                    bind_auth_factor_type="WLA",
                ),
                metadata=metadata,
            )
            print(f"bound: PSUT {bound.partner_specific_user_token}")

            now = int(time.time())
            claims = {"sub": individual_id, "aud": audience, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
            token = jws.serialize_compact(
                {"alg": "ES256", "typ": "JWT", "x5t#S256": bound.thumbprint}, json.dumps(claims), wallet
            )
            verified = stub.VerifyWalletToken(
                pb.VerifyWalletTokenRequest(token=token, individual_id=individual_id), metadata=metadata
            )
        except grpc.RpcError as err:
            code, why = err.code(), reason(err)
            hint = (
                f" (no server at {target}? start one with `make run`)" if code.name == "UNAVAILABLE" and not why else ""
            )
            print(f"failed: {code.name} [{why}] {err.details()}{hint}", file=sys.stderr)
            return 1
    print(f"WLA token valid={verified.valid} jti={verified.jti}")
    print(f"x5t#S256 {bound.thumbprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
