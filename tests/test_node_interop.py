"""The example clients in other languages against the real server: Node.js (@grpc/grpc-js) and Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from tests.conftest import PARTNER, PARTNER_KEYS, Person, RunningServer, md, unregistered

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
NPM_STAMP = NODE_DIR / "node_modules" / ".installed"


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """``node client.js`` with its pinned dependencies installed (npm ci, as `make node-deps` does)."""
    from tests.conftest import require

    node, npm = shutil.which("node"), shutil.which("npm")
    require(node is not None and npm is not None, "node and npm")
    assert node is not None
    assert npm is not None
    lock = NODE_DIR / "package-lock.json"
    if not NPM_STAMP.exists() or NPM_STAMP.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
        NPM_STAMP.touch()
    return [node, str(NODE_DIR / "client.js")]


def partner_key_file(kb: RunningServer) -> Path:
    """The test partner's API key in a 0600 file, as a partner would keep it."""
    path = kb.app.settings.data_dir / "node-partner.key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(PARTNER_KEYS[PARTNER] + "\n")
    return path


def client_env(kb: RunningServer, person: Person | None = None, individual_id: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBINDER_")}
    env |= {
        "KEYBINDER_TARGET": kb.target,
        "KEYBINDER_PARTNER_ID": PARTNER,
        "KEYBINDER_PARTNER_API_KEY_FILE": str(partner_key_file(kb)),
        "KEYBINDER_INDIVIDUAL_ID": individual_id or (person.individual_id if person else ""),
        "KEYBINDER_OUTBOX": str(kb.app.settings.outbox),
    }
    return env


def test_node_client_binds_and_verifies_a_wla_token(node_client: list[str], kb: RunningServer, person: Person) -> None:
    run = subprocess.run(
        [*node_client, "--json"], env=client_env(kb, person), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"node client failed:\n{run.stdout}\n{run.stderr}"
    assert "6. the same token again is refused: token_replayed" in run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])

    # The binding the Node client made really exists, seen from Python through the same contract.
    binding = kb.stub.GetBinding(pb.GetBindingRequest(thumbprint=result["thumbprint"]), metadata=md())
    assert binding.status == pb.BINDING_STATUS_ACTIVE
    assert binding.bind_auth_factor_type == "WLA"
    assert binding.partner_specific_user_token == result["partner_specific_user_token"]
    cert = x509.load_pem_x509_certificate(binding.certificate.encode())
    assert cert.subject.rfc4514_string() == f"CN={result['partner_specific_user_token']}"
    assert result["subject"] == f"CN={result['partner_specific_user_token']}"
    assert person.individual_id not in run.stdout, "the client prints no raw individual ID"


def test_node_client_exits_non_zero_with_the_reason_on_failure(node_client: list[str], kb: RunningServer) -> None:
    run = subprocess.run(
        node_client,
        env=client_env(kb, individual_id=unregistered().individual_id),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "FAILED_PRECONDITION [send_otp_failed]" in run.stderr


def test_node_client_sends_the_partner_headers(node_client: list[str], tmp_path: Path) -> None:
    """partner-id and, from its file, partner-api-key reach the server; the key is never printed."""
    seen: list[dict[str, str]] = []

    def record(request: pb.SendBindingOtpRequest, context: grpc.ServicerContext) -> pb.SendBindingOtpResponse:
        seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "recorded the headers")
        raise AssertionError("unreachable")

    handler = grpc.method_handlers_generic_handler(
        "keybinder.v1.KeyBinderService",
        {
            "GetSupportedChallengeFormats": grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.GetSupportedChallengeFormatsResponse(formats=["alpha-numeric"]),
                request_deserializer=pb.GetSupportedChallengeFormatsRequest.FromString,
                response_serializer=pb.GetSupportedChallengeFormatsResponse.SerializeToString,
            ),
            "SendBindingOtp": grpc.unary_unary_rpc_method_handler(
                record,
                request_deserializer=pb.SendBindingOtpRequest.FromString,
                response_serializer=pb.SendBindingOtpResponse.SerializeToString,
            ),
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        key_file = tmp_path / "partner-api-key"
        key_file.write_text("kb-test-api-key-0123456789\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBINDER_")} | {
            "KEYBINDER_TARGET": f"127.0.0.1:{port}",
            "KEYBINDER_PARTNER_ID": "wallet-x",
            "KEYBINDER_PARTNER_API_KEY_FILE": str(key_file),
        }
        run = subprocess.run(node_client, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.stop(None)
    assert run.returncode == 1
    assert "UNAUTHENTICATED" in run.stderr
    [headers] = seen
    assert headers["partner-id"] == "wallet-x"
    assert headers["partner-api-key"] == "kb-test-api-key-0123456789"
    assert "kb-test-api-key" not in run.stdout + run.stderr


def test_python_example_client(kb: RunningServer, person: Person) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_client.py")],
        env=client_env(kb, person),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, f"python client failed:\n{run.stdout}\n{run.stderr}"
    thumbprint = run.stdout.strip().splitlines()[-1].split()[-1]
    binding = kb.stub.GetBinding(pb.GetBindingRequest(thumbprint=thumbprint), metadata=md())
    assert binding.status == pb.BINDING_STATUS_ACTIVE
