"""The README's walk-through and every command of docs/clients.md, run as written on a fresh data directory.

`make run` serves from a data directory that does not exist yet (as on a fresh clone), and each
```sh block of the pages is run by bash from the repository root. Three things differ from a
reader's shell, and only these: the server listens on a free port instead of 127.0.0.1:50051
(other servers may hold that one), so the address is replaced in the commands and given to the
clients through their documented variables (KEYBINDER_LISTEN, KEYBINDER_TARGET); the data
directory is a temporary one instead of .keybinder (DATA_DIR for make, KEYBINDER_DATA_DIR for
the CLI and the example clients, and replaced where a command names .keybinder/); /tmp/ is a
directory of the test's own.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SOFTHSM_MODULE, require

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_ADDRESS = "127.0.0.1:50051"


def sh_blocks(page: Path, section: str | None = None) -> list[str]:
    """The ```sh blocks of a page, or of one ``## section`` of it."""
    text = page.read_text()
    if section is not None:
        start = text.index(f"## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.M | re.S)


@dataclass
class Served:
    data_dir: Path
    scratch: Path
    target: str

    def env(self) -> dict[str, str]:
        return clean_env(self.data_dir) | {"KEYBINDER_LISTEN": self.target, "KEYBINDER_TARGET": self.target}

    def as_written(self, script: str) -> str:
        # /tmp/ first: the replacements are paths under /tmp themselves.
        return (
            script.replace("/tmp/", f"{self.scratch}/")
            .replace(DOCUMENTED_ADDRESS, self.target)
            .replace(".keybinder/", f"{self.data_dir}/")
        )

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        """One documented block, by bash, stopping at the first failing command (pipes included)."""
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.as_written(script)],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )


def clean_env(data_dir: Path) -> dict[str, str]:
    """A reader's shell: nothing of the test process's KeyBinder, SoftHSM or make settings."""
    drop = ("KEYBINDER_", "SOFTHSM2_CONF", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"DATA_DIR": str(data_dir), "KEYBINDER_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


@contextmanager
def make_run(tmp_path: Path, **settings: str) -> Iterator[Served]:
    """`make run` on a data directory that does not exist yet, one worker on a free port."""
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    require(shutil.which("make") is not None, "make")
    data_dir, scratch = tmp_path / "kb", tmp_path / "tmp"
    scratch.mkdir()
    env = clean_env(data_dir) | {"KEYBINDER_LISTEN": "127.0.0.1:0", "KEYBINDER_WORKERS": "1", **settings}
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # make, its shell and the server: stopped together below
        )
        try:
            yield Served(data_dir, scratch, f"127.0.0.1:{listening_port(proc, tmp_path / 'server.log')}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()


def listening_port(proc: subprocess.Popen[str], log: Path, seconds: float = 180) -> int:
    """The port from serve's `keybinder listening on HOST:PORT` line, after make's own output."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("keybinder listening on "):
            return int(line.rsplit(":", 1)[1])
    pytest.fail(f"make run did not serve:\n{''.join(seen)}\n{log.read_text()[-3000:]}")


def test_the_readme_walk_through(tmp_path: Path) -> None:
    """The two-minute walk-through, with the default abuse limits: its OTPs are counted as the README says."""
    first, check = sh_blocks(ROOT / "README.md", "A binding in two minutes")
    [alternative] = re.findall(r"# or: (.*)$", first, flags=re.M)
    with make_run(tmp_path) as served:
        demo = served.run(first)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "1. OTP challenge formats: ['alpha-numeric']" in demo.stdout
        assert "4. bound a new ec-p256 wallet key:" in demo.stdout
        assert "-----BEGIN CERTIFICATE-----" in demo.stdout

        other = served.run(alternative)
        assert other.returncode == 0, other.stdout + other.stderr
        assert "OTP sent to ********1234 " in other.stdout, "--channel phone sends to the phone only"
        assert "4. bound a new ed25519 wallet key:" in other.stdout

        verify = served.run(check)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout.strip() == f"{served.scratch}/wallet.pem: OK"

        # That was three OTPs for the demo individual within ten minutes: the next run is refused, as the
        # README says, in one line with the wait.
        fourth = served.run(".venv/bin/keybinder demo")
        assert fourth.returncode == 1
        assert re.fullmatch(r"too_many_attempts: .+ \(retry in \d+ s\)\n", fourth.stderr), fourth.stderr


def test_every_client_command_of_the_clients_page(tmp_path: Path) -> None:
    """Python, Node.js, `keybinder demo` and grpcurl, each block as written; the OTP limit raised as the
    README says (`KEYBINDER_OTP_SENDS_PER_INDIVIDUAL=100 make run`), since they send more than three."""
    require(shutil.which("node") is not None and shutil.which("npm") is not None, "node and npm")
    require((ROOT / ".venv" / "bin" / "grpcurl").exists(), "grpcurl in .venv (make dev-deps)")
    blocks = sh_blocks(ROOT / "docs" / "clients.md")
    assert len(blocks) == 4, "a new block on the clients page: say below what it must print"
    python, node, demo, grpcurl = blocks
    with make_run(tmp_path, KEYBINDER_OTP_SENDS_PER_INDIVIDUAL="100") as served:
        ran = {
            name: served.run(block) for name, block in zip(("python", "node", "demo", "grpcurl"), blocks, strict=True)
        }
        for name, result in ran.items():
            assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
        assert "WLA token valid=True" in ran["python"].stdout
        assert "6. the same token again is refused: token_replayed" in ran["node"].stdout
        assert "4. bound a new ec-p384 wallet key:" in ran["demo"].stdout
        out = ran["grpcurl"].stdout
        assert '"formats": [\n    "alpha-numeric"\n  ]' in out
        assert re.search(r'"transaction_id": "[\w-]+"', out), out
        assert "-----BEGIN CERTIFICATE-----" in out
        key = (served.data_dir / "demo-partner.key").read_text().strip()
        assert all(key not in r.stdout + r.stderr for r in ran.values()), "the API key is never printed"
    assert "partner-api-key: ${PARTNER_API_KEY}" in grpcurl, "the key stays off grpcurl's command line"
    assert "examples/python_client.py" in python
    assert "examples/node/client.js" in node
    assert "keybinder demo" in demo
