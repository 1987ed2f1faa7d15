"""PKCS#11 backends the HSM tests run against: SoftHSM in-process, SoftHSM behind p11-kit, openCryptoki.

Each backend is reached only through its RFC 7512 URI (module path, token, PIN source and the
module's environment), exactly as a deployment configures it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hsm import KeyKind, Pkcs11Uri

SOFTHSM = "softhsm"
P11KIT = "p11kit"
OPENCRYPTOKI = "opencryptoki"
BACKENDS = (SOFTHSM, P11KIT, OPENCRYPTOKI)
#: Backends that can hold a second token (openCryptoki's software token is a single slot).
MULTI_TOKEN_BACKENDS = (SOFTHSM, P11KIT)

P11KIT_ADDRESS_VAR = "P11_KIT_SERVER_ADDRESS"
OPENCRYPTOKI_SW_SLOT = 3
#: openCryptoki's software token ships with this SO PIN; the test token keeps it (PINs are 4-8 bytes).
OPENCRYPTOKI_DEFAULT_SO_PIN = "87654321"
OPENCRYPTOKI_TOKEN = "kb-test-ock"


def find_module(name: str) -> str | None:
    """The path of a PKCS#11 module installed by the distribution, if any."""
    for pattern in (f"/usr/lib/*/pkcs11/{name}", f"/usr/lib/pkcs11/{name}", f"/usr/lib64/pkcs11/{name}"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


P11KIT_CLIENT = find_module("p11-kit-client.so")
OPENCRYPTOKI_MODULE = find_module("libopencryptoki.so")

# Mechanisms each issuer key kind needs, and the mechanisms every backend needs for the HMAC key.
KIND_MECHANISMS: dict[KeyKind, tuple[str, ...]] = {
    KeyKind.EC_P256: ("EC_KEY_PAIR_GEN", "ECDSA"),
    KeyKind.EC_P384: ("EC_KEY_PAIR_GEN", "ECDSA"),
    KeyKind.RSA_3072: ("RSA_PKCS_KEY_PAIR_GEN", "RSA_PKCS"),
    KeyKind.ED25519: ("EC_EDWARDS_KEY_PAIR_GEN", "EDDSA"),
}
HMAC_MECHANISMS = ("GENERIC_SECRET_KEY_GEN", "SHA256_HMAC")

_OCK_WHY = "openCryptoki 3.8 software token offers no {} (checked against its mechanism list)"
#: Key kinds a backend cannot serve, with the reason. Known when tests are collected, so that no
#: test is generated for them; test_backend_mechanisms proves each entry against the module.
UNSUPPORTED_KINDS: dict[str, dict[KeyKind, str]] = {
    P11KIT: {
        KeyKind.ED25519: "p11-kit 0.24's RPC protocol does not carry CKM_EC_EDWARDS_KEY_PAIR_GEN / CKM_EDDSA"
        " (the client drops them from the remote mechanism list, though SoftHSM behind it has them)",
    },
    OPENCRYPTOKI: {
        KeyKind.EC_P256: _OCK_WHY.format("CKM_EC_KEY_PAIR_GEN / CKM_ECDSA"),
        KeyKind.EC_P384: _OCK_WHY.format("CKM_EC_KEY_PAIR_GEN / CKM_ECDSA"),
        KeyKind.ED25519: _OCK_WHY.format("CKM_EC_EDWARDS_KEY_PAIR_GEN / CKM_EDDSA"),
    },
}


@dataclass(frozen=True)
class HsmBackend:
    """One PKCS#11 implementation with a token holding the issuer key and the HMAC key."""

    name: str
    #: The main token's URI (object = the issuer key label).
    uri: Pkcs11Uri
    issuer_kind: KeyKind
    #: SO PIN for further tokens, when the backend can hold more than one.
    so_pin: str | None = None

    @property
    def unsupported(self) -> dict[KeyKind, str]:
        """Key kinds the module cannot generate or use, with the reason (proven by a test, not assumed)."""
        return UNSUPPORTED_KINDS.get(self.name, {})

    @property
    def kinds(self) -> list[KeyKind]:
        return [kind for kind in KeyKind if kind not in self.unsupported]

    @property
    def module_path(self) -> str:
        return self.uri.module_path

    def token_uri(self, token: str, pin_source: str, obj: str | None = None) -> Pkcs11Uri:
        """Another token behind the same module, with the same module environment."""
        return Pkcs11Uri(
            token=token, module_path=self.module_path, object=obj, pin_source=pin_source, module_env=self.uri.module_env
        )


class P11KitServer:
    """`p11-kit server` in a process group of its own, serving every token of a module on a socket.

    The server forks a child per connection, and a child keeps serving after its parent dies:
    only killing the whole group takes the HSM away from connected clients.
    """

    def __init__(self, socket_path: Path, provider: str, env: dict[str, str]) -> None:
        self.socket_path = socket_path
        self.provider = provider
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket_path}"

    @property
    def module_env(self) -> tuple[tuple[str, str], ...]:
        return ((P11KIT_ADDRESS_VAR, self.address),)

    def uri(self, token: str, pin_source: str, obj: str | None = None) -> Pkcs11Uri:
        assert P11KIT_CLIENT is not None
        return Pkcs11Uri(
            token=token, module_path=P11KIT_CLIENT, object=obj, pin_source=pin_source, module_env=self.module_env
        )

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.socket_path.unlink(missing_ok=True)
        p11kit = shutil.which("p11-kit")
        assert p11kit is not None
        # "pkcs11:" matches every token, uninitialised slots included, so tests can add tokens.
        self.proc = subprocess.Popen(
            [p11kit, "server", "-f", "--provider", self.provider, "-n", str(self.socket_path), "pkcs11:"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise RuntimeError(f"p11-kit server exited: {self.proc.stderr.read().decode(errors='replace')}")
            if self._accepts():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("p11-kit server did not open its socket")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """SIGKILL the server and every per-connection child, as a crashed HSM appliance would go."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        # The children are gone with the group; wait until none is left holding the module.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def opencryptoki_daemon_running() -> bool:
    return subprocess.run(["pgrep", "-x", "pkcsslotd"], capture_output=True, check=False).returncode == 0


def start_opencryptoki_daemon() -> bool:
    """Start pkcsslotd (the slot manager every openCryptoki client talks to) when it is not running.

    It needs /run/opencryptoki owned by group pkcs11, and root. Returns whether it runs now.
    """
    if opencryptoki_daemon_running():
        return True
    slotd = shutil.which("pkcsslotd") or "/usr/sbin/pkcsslotd"
    if not Path(slotd).exists() or os.geteuid() != 0:
        return False
    run_dir = Path("/run/opencryptoki")
    run_dir.mkdir(mode=0o770, exist_ok=True)
    shutil.chown(run_dir, group="pkcs11")
    # pkcsslotd daemonises itself; it is a system service and stays up for later runs.
    subprocess.run([slotd], check=False, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if opencryptoki_daemon_running():
            return True
        time.sleep(0.05)
    return False


#: "backend: kind: reason" lines recorded by the tests that prove a mechanism is missing,
#: printed in the session summary so that an unsupported kind is reported, never silently dropped.
UNSUPPORTED_REPORT: list[str] = []
