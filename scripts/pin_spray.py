"""PIN spraying as the outside review did it: one partner, five common PINs for each of many IDs, from several
client threads for a fixed time against a running server. Prints the attempts made, the attempts the server
evaluated (answered auth_failed) and refused unread (too_many_attempts), per minute (BENCHMARKS.md).

Usage: python scripts/pin_spray.py --target 127.0.0.1:50051 --partner demo-wallet --key-file .keybinder/demo-partner.key
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key

PINS = ("123456", "111111", "000000", "123123", "654321")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--partner", default="demo-wallet")
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    metadata = (("partner-id", args.partner), ("partner-api-key", args.key_file.read_text().strip()))
    jwk = new_wallet_key("ec-p256")[1]
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + args.seconds

    def spray() -> None:
        with grpc.insecure_channel(args.target) as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            while time.monotonic() < end:
                individual = f"{secrets.randbelow(10**10):010d}"
                for pin in PINS:
                    request = pb.DoKeyBindingRequest(
                        individual_id=individual,
                        challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=pin)],
                        public_key_jwk=jwk,
                        bind_auth_factor_type="WLA",
                    )
                    try:
                        stub.DoKeyBinding(request, metadata=metadata, timeout=10)
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name
                    with lock:
                        codes[code] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=spray) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    minutes = (time.monotonic() - started) / 60
    attempts = sum(codes.values())
    evaluated = codes["UNAUTHENTICATED"] + codes["OK"]
    print(f"{attempts} attempts in {minutes * 60:.1f} s: {dict(codes)}")
    print(f"attempts/min {attempts / minutes:.0f}; evaluated/min {evaluated / minutes:.0f}")


if __name__ == "__main__":
    main()
