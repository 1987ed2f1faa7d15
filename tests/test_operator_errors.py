"""An operator's mistakes get one line that says what to do, a non-zero exit and no traceback.

Each case runs the `keybinder` command line as an operator would (a fresh process, a clean environment).
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.test_cli import KEYBINDER, cli_env


def keybinder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYBINDER, *args], capture_output=True, text=True, env=env or cli_env(), timeout=120, check=False
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single line the command printed on stderr (asserted: one line, the exit code, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode == code, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["issuer", "show"],
        ["identities", "add", "5550001111", "--email", "a@example.org"],
        ["identities", "import", "examples/demo-identities.json"],
        ["migrate"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_data_directory_init_never_made(tmp_path: Path, command: list[str]) -> None:
    wrong = tmp_path / "typo"
    line = one_line(keybinder(*command, "--data-dir", str(wrong)), 1)
    assert line == f"error: no KeyBinder state in {wrong} — run `keybinder init`"
    assert not wrong.exists(), "nothing is created in a mistyped directory (migrate made an empty database)"


def test_a_database_file_elsewhere_is_named(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "kb.db"
    line = one_line(keybinder("keys", "list", "--database-url", f"sqlite:///{db}"), 1)
    assert line == f"error: no KeyBinder state at {db} — run `keybinder init`"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("otp_ttl_secnds = 90\n", r"otp_ttl_secnds: unknown setting \(did you mean otp_ttl_seconds\?\)"),
        ('cert_validity_days = "a year"\n', r"cert_validity_days: Input should be a valid integer"),
        ("otp_ttl_seconds = 5\n", r"otp_ttl_seconds: Input should be greater than or equal to 10"),
        ('proof_of_possession_by_partner = { w = "maybe" }\n', r"proof_of_possession_by_partner\.w: Input should be"),
        ("[listen\n", r"not valid TOML: "),
    ],
    ids=["unknown-key", "bad-type", "out-of-range", "nested", "syntax"],
)
def test_a_toml_mistake_names_the_file_the_key_and_the_fault(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "keybinder.toml"
    config.write_text(toml)
    line = one_line(keybinder("keys", "list", "--config", str(config), "--data-dir", str(tmp_path)), 2)
    assert re.fullmatch(rf"configuration error: {re.escape(str(config))}: {expected}.*", line), line
    assert "pydantic" not in line


def test_an_environment_mistake_names_the_variable(tmp_path: Path) -> None:
    env = cli_env() | {"KEYBINDER_OTP_TTL_SECONDS": "three minutes"}
    line = one_line(keybinder("keys", "list", "--data-dir", str(tmp_path), env=env), 2)
    assert line.startswith("configuration error: KEYBINDER_OTP_TTL_SECONDS: otp_ttl_seconds: Input should be")
    assert "three minutes" not in line, "values are not echoed: a misplaced secret would be"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--listen", "localhost"], "command line: listen: must be host:port"),
        (["--database-url", "mysql://db/kb"], "command line: database_url: the database URL must be"),
    ],
    ids=["listen", "database-url"],
)
def test_a_bad_flag_is_one_line(tmp_path: Path, flags: list[str], expected: str) -> None:
    line = one_line(keybinder("serve", *flags, "--data-dir", str(tmp_path)), 2)
    assert line.startswith(f"configuration error: {expected}")


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_dir(tmp_path: Path, key: str) -> Path:
    (tmp_path / "demo-partner.key").write_text(key + "\n")
    return tmp_path


def test_demo_without_a_server_says_to_start_one(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = keybinder("demo", "--target", target, "--data-dir", str(demo_dir(tmp_path, "kb_x")))
    assert (
        one_line(result, 1)
        == f"no KeyBinder server answers at {target}: start one with `make run` (or `keybinder serve`)"
    )


def test_demo_prints_the_reason_not_a_protobuf_repr(kb: RunningServer, tmp_path: Path) -> None:
    result = keybinder("demo", "--target", kb.target, "--data-dir", str(demo_dir(tmp_path, "kb_not-the-key")))
    line = one_line(result, 1)
    assert line == "invalid_partner: unknown or disabled partner, or wrong API key"
    assert "type.googleapis.com" not in result.stdout + result.stderr


def test_demo_without_the_demo_partner_key_says_how_to_make_it(tmp_path: Path) -> None:
    line = one_line(keybinder("demo", "--data-dir", str(tmp_path)), 1)
    assert line.startswith(f"error: cannot read the partner API key from {tmp_path / 'demo-partner.key'}")
    assert line.endswith("run `keybinder init --demo-partner`")


@pytest.mark.parametrize("command", [["serve"], ["demo"]])
def test_option_help_shows_defaults_without_stray_dots(command: list[str]) -> None:
    result = subprocess.run(
        [*KEYBINDER, *command, "--help"],
        capture_output=True,
        text=True,
        env=cli_env() | {"COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
        check=True,
    )
    # Rich markup ate "[default: …]" written into help texts, leaving "State directory ." behind.
    assert not re.search(r"\w \.(\s|$)", result.stdout, flags=re.M), result.stdout
    assert "--data-dir" in result.stdout
    data_dir_line = next(line for line in result.stdout.splitlines() if "--data-dir" in line)
    assert "[default: (.keybinder)]" in data_dir_line
