"""The eSignet plugin (integrations/esignet) against a real `keybinder serve`: its JUnit tests, run here.

The driver starts a server of its own (own data directory and SoftHSM token, mTLS on a free port), registers
the partner, enrols the individuals and runs the JUnit console launcher with everything the Java tests need
in the environment (the partner API key in a 0600 file, never on a command line). Each test below asserts
the outcome of one group of Java tests, read from the launcher's XML report.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import Settings
from tests.conftest import require
from tests.test_cli import kb_cli
from tests.test_partners import Serve, issued_key
from tests.test_tls import make_ca, make_leaf

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "integrations" / "esignet"
BUILD = PLUGIN / "build"
PARTNER = "esignet-wallet"
#: Individuals by the role the Java tests give them (TestSupport.person).
ROLES = ("binding", "wla", "supersede", "errors")
#: Issue 11's settings: with them the partner runs under eSignet's WLA profile and RSA keys only.
ESIGNET_PROFILE = "wla_profile_by_partner" in Settings.model_fields
RSA_ONLY = "allowed_key_types_by_partner" in Settings.model_fields
#: Java tests that need the eSignet WLA profile (an Inji token has no jti and lives 5 h).
NEEDS_ESIGNET_PROFILE = {"injiTokenIsAcceptedOnceThenRefusedAsReplayed"}
#: Debian's libnetty-tcnative-jni as build.sh copies it: Debian's Netty has no JDK ALPN, so TLS goes through OpenSSL.
JNI_DIR = BUILD / "jni"
SUMMARY = re.compile(r"\[\s*(\d+) tests (found|successful|failed|aborted|skipped)\s*\]")


def _newest(paths: Iterator[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def build_plugin() -> None:
    """`make esignet-plugin` builds it before the tests; run the same script here when it is missing or stale."""
    for tool in ("java", "javac", "protoc", "grpc_java_plugin"):
        require(shutil.which(tool) is not None, f"{tool} (`make esignet-plugin` installs it)")
    jar = BUILD / "keybinder-esignet-plugin.jar"
    sources = _newest(PLUGIN.joinpath("src").rglob("*.java"))
    if jar.exists() and jar.stat().st_mtime >= max(sources, (PLUGIN / "build.sh").stat().st_mtime):
        return
    site = next(Path(p) for p in sys.path if (Path(p) / "google" / "rpc" / "error_details.proto").exists())
    run = subprocess.run(
        ["bash", str(PLUGIN / "build.sh"), str(site)], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, f"the plugin did not build:\n{run.stdout}\n{run.stderr}"


@dataclass(frozen=True)
class JavaRun:
    stdout: str
    stderr: str
    outcomes: dict[str, dict[str, str]]  # class -> test method -> passed | failed | skipped (+ message)
    log: str
    people: dict[str, dict[str, str]]
    api_key: str
    outbox: str

    def summary(self) -> dict[str, int]:
        return {kind: int(count) for count, kind in SUMMARY.findall(self.stdout)}


def write_config(path: Path) -> None:
    """Issue 11's per-partner settings when the server has them (the names are fixed by that issue)."""
    lines = []
    if ESIGNET_PROFILE:
        lines.append(f'wla_profile_by_partner = {{ {PARTNER} = "esignet" }}')
    if RSA_ONLY:
        lines.append(f'allowed_key_types_by_partner = {{ {PARTNER} = ["RSA"] }}')
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def java_run(tmp_path_factory: pytest.TempPathFactory) -> JavaRun:
    build_plugin()
    work = tmp_path_factory.mktemp("esignet-plugin")
    data_dir = work / "data"
    init = kb_cli("init", data_dir=data_dir)
    assert init.returncode == 0, init.stderr
    api_key = issued_key(kb_cli("partners", "add", PARTNER, data_dir=data_dir))
    key_file = work / "partner-api-key"
    key_file.touch(mode=0o600)
    key_file.write_text(api_key + "\n")

    people = {
        role: {
            "individual_id": f"{secrets.randbelow(9 * 10**11) + 10**11}",
            "email": f"{role}{secrets.token_hex(3)}@example.org",
            "phone": f"+4915{secrets.randbelow(10**8):08d}",
            "pin": f"{secrets.randbelow(10**6):06d}",
            "name": role.title(),
        }
        for role in ROLES
    }
    identities = work / "identities.json"
    identities.write_text(json.dumps(list(people.values())))
    imported = kb_cli("identities", "import", str(identities), data_dir=data_dir)
    assert imported.returncode == 0, imported.stderr
    people_file = work / "people.json"
    people_file.write_text(json.dumps(people))

    ca = make_ca("eSignet plugin test CA")
    server_cert, server_key = make_leaf(ca, "localhost", server=True).write(work, "server")
    client_cert, client_key = make_leaf(ca, "esignet", server=False).write(work, "client")
    ca_file = work / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    config = work / "keybinder.toml"
    write_config(config)

    server = Serve(
        data_dir,
        work / "serve.log",
        *("--workers", "1", "--config", str(config)),
        *("--tls-cert", str(server_cert), "--tls-key", str(server_key), "--client-ca", str(ca_file)),
    )
    reports = work / "reports"
    log_file = work / "plugin.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBINDER_")} | {
        "KEYBINDER_TEST_TARGET": f"localhost:{server.port}",
        "KEYBINDER_TEST_CA_FILE": str(ca_file),
        "KEYBINDER_TEST_CLIENT_CERT": str(client_cert),
        "KEYBINDER_TEST_CLIENT_KEY": str(client_key),
        "KEYBINDER_TEST_PARTNER_ID": PARTNER,
        "KEYBINDER_TEST_PARTNER_API_KEY_FILE": str(key_file),
        "KEYBINDER_TEST_OUTBOX": str(data_dir / "outbox.jsonl"),
        "KEYBINDER_TEST_PEOPLE": str(people_file),
        "KEYBINDER_TEST_WLA_PROFILE": "esignet" if ESIGNET_PROFILE else "strict",
        "KEYBINDER_TEST_SERVER_RSA_ONLY": str(RSA_ONLY).lower(),
        "KEYBINDER_TEST_LOG_FILE": str(log_file),
    }
    classpath = ":".join(
        [
            str(BUILD / "test-classes"),
            str(BUILD / "keybinder-esignet-plugin.jar"),
            str(BUILD / "lib" / "*"),
            str(BUILD / "test-lib" / "*"),
            str(BUILD / "test-lib" / "standin-classes"),
        ]
    )
    try:
        run = subprocess.run(
            [
                "java",
                f"-Djava.library.path={JNI_DIR}",
                "-cp",
                classpath,
                "org.junit.platform.console.ConsoleLauncher",
                "--disable-banner",
                "--disable-ansi-colors",
                "--details=tree",
                "--scan-class-path",
                str(BUILD / "test-classes"),
                "--config=junit.jupiter.testclass.order.default=org.junit.jupiter.api.ClassOrderer$OrderAnnotation",
                "--reports-dir",
                str(reports),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        assert server.stop() == 0, (work / "serve.log").read_text()
    outcomes: dict[str, dict[str, str]] = {}
    for report in reports.glob("*.xml"):
        for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - our launcher wrote it just now
            name = case.get("name", "").removesuffix("()")
            cls = case.get("classname", "").rsplit(".", 1)[-1]
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                outcome = "failed: " + (problem.get("message") or problem.text or "")[:2000]
            elif case.find("skipped") is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            outcomes.setdefault(cls, {})[name] = outcome
    return JavaRun(
        run.stdout,
        run.stderr,
        outcomes,
        log_file.read_text() if log_file.exists() else "",
        people,
        api_key,
        str(data_dir / "outbox.jsonl"),
    )


def assert_passed(run: JavaRun, cls: str, *, except_: frozenset[str] = frozenset()) -> None:
    cases = run.outcomes.get(cls)
    assert cases, f"no {cls} results in the launcher's report:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    bad = {name: outcome for name, outcome in cases.items() if outcome != "passed" and name not in except_}
    assert not bad, f"{cls}: {json.dumps(bad, indent=1)}\n{run.stdout[-6000:]}"


def test_the_whole_java_suite_ran_and_the_launcher_agrees(java_run: JavaRun) -> None:
    summary = java_run.summary()
    # The launcher's own count lines, for the record (pytest -s shows them).
    print("\n".join(line for line in java_run.stdout.splitlines() if SUMMARY.search(line)))
    found = sum(len(cases) for cases in java_run.outcomes.values())
    assert summary.get("found", 0) == found >= 19, java_run.stdout[-4000:]
    assert summary.get("skipped", 0) == 0
    assert summary.get("aborted", 0) == 0
    expected_failures = 0 if ESIGNET_PROFILE else len(NEEDS_ESIGNET_PROFILE)
    assert summary.get("failed", 0) == expected_failures, java_run.stdout[-6000:]
    assert set(java_run.outcomes) == {
        "BindingFlowTest",
        "WlaLoginTest",
        "ErrorMappingTest",
        "ErrorTableTest",
        "HeaderForwardingTest",
        "LogHygieneTest",
    }


def test_binding_as_esignet_drives_it(java_run: JavaRun) -> None:
    assert_passed(java_run, "BindingFlowTest")


def test_every_error_path_maps_to_an_esignet_code(java_run: JavaRun) -> None:
    assert_passed(java_run, "ErrorMappingTest")


def test_every_row_of_the_error_table(java_run: JavaRun) -> None:
    assert_passed(java_run, "ErrorTableTest")
    assert len(java_run.outcomes["ErrorTableTest"]) >= 39, "one case per row of README's table"


def test_only_the_partner_headers_are_forwarded_and_formats_are_cached(java_run: JavaRun) -> None:
    assert_passed(java_run, "HeaderForwardingTest")


def test_wla_refusals_carry_esignet_codes(java_run: JavaRun) -> None:
    assert_passed(java_run, "WlaLoginTest", except_=frozenset(NEEDS_ESIGNET_PROFILE))


@pytest.mark.xfail(
    not ESIGNET_PROFILE,
    reason="the server has no wla_profile_by_partner yet (issue 11): it refuses an Inji token without jti",
    strict=True,
)
def test_an_inji_wla_login_is_accepted_once(java_run: JavaRun) -> None:
    for name in NEEDS_ESIGNET_PROFILE:
        assert java_run.outcomes["WlaLoginTest"][name] == "passed", java_run.outcomes["WlaLoginTest"][name]


def test_nothing_secret_in_the_plugin_log(java_run: JavaRun) -> None:
    assert_passed(java_run, "LogHygieneTest")
    # Checked again here, independently of the Java side: the API key, every individual ID, every OTP sent.
    log = java_run.log + java_run.stdout + java_run.stderr
    assert "KeyBinderGrpcBinder" in java_run.log, "the plugin's log was captured"
    assert java_run.api_key not in log
    for person in java_run.people.values():
        assert person["individual_id"] not in log
        assert person["email"] not in log
        assert person["phone"] not in log
    otps = [json.loads(line)["otp"] for line in Path(java_run.outbox).read_text().splitlines() if line.strip()]
    assert len(otps) >= 10
    for otp in otps:
        assert not re.search(rf"(?<![A-Za-z0-9_-]){re.escape(otp)}(?![A-Za-z0-9_-])", log), "an OTP is in the log"
