"""Prometheus metrics: after a known sequence of RPCs the scraped counters equal what was done, with one
serving process and with two workers (real processes, the real /metrics port, sums across workers)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from hsm import KeyNotFoundError
from server import metrics
from server.config import load_settings
from server.errors import TooManyAttemptsError
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key, read_otp
from server.stores import Store, open_store
from tests.conftest import Person, RunningServer, bind_request, md, other_otp, otp_challenge, send_otp
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, kb_cli, make_data_dir

STARTUP_SECONDS = 60.0
#: New connections made to spread calls over the workers (SO_REUSEPORT picks one per connection).
SPREAD_CALLS = 20

Series = tuple[str, tuple[tuple[str, str], ...]]


def scrape(port: int) -> dict[Series, float]:
    """Every sample on /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(samples: dict[Series, float], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The non-zero samples of one metric, by labels."""
    return {labels: value for (n, labels), value in samples.items() if n == name and value}


@dataclass
class MetricsServer:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    log_path: Path

    def log_lines(self) -> list[dict[str, object]]:
        """stderr is not a terminal, so (log_format auto) every line is a JSON object."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def start_metrics_serve(data_dir: Path, workers: int, log_path: Path) -> MetricsServer:
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                *KEYBINDER,
                "serve",
                "--port",
                "0",
                "--workers",
                str(workers),
                "--metrics-port",
                "0",
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=cli_env(),
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on "):
        proc.kill()
        proc.wait(10)
        pytest.fail(f"serve did not start: {line!r} {log_path.read_text()}")
    # The endpoint is up before the servers announce themselves; port 0 is resolved in the log.
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log_path.read_text())
    assert found is not None, log_path.read_text()
    return MetricsServer(proc, int(line.split()[3].rsplit(":", 1)[1]), int(found.group(1)), log_path)


@pytest.fixture
def serve_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetricsServer]:
    """A fresh data directory (no binding yet) and `keybinder serve --workers N --metrics-port 0`."""
    data_dir = make_data_dir(tmp_path / "data")
    for partner in ("metrics-a", "metrics-b"):
        added = kb_cli("partners", "add", partner, data_dir=data_dir)
        assert added.returncode == 0, added.stderr
        PARTNER_KEYS[partner] = next(
            line.split()[-1] for line in added.stdout.splitlines() if line.startswith("api key")
        )
    server = start_metrics_serve(data_dir, request.param, tmp_path / "serve.log")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


#: API keys of the partners registered in each fresh data directory (by serve_process).
PARTNER_KEYS: dict[str, str] = {}


def call(port: int, fn: str, request: object, partner: str | None = "metrics-a") -> object:
    """One RPC on a new connection (so that the kernel may pick another worker); errors are returned."""
    metadata = () if partner is None else (("partner-id", partner), ("partner-api-key", PARTNER_KEYS[partner]))
    # A channel-local subchannel pool: a new TCP connection even while another channel is open.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        try:
            return getattr(stub, fn)(request, metadata=metadata, timeout=15)
        except grpc.RpcError as err:
            return err


def run_sequence(server: MetricsServer, data_dir: Path) -> dict[tuple[str, str, str], int]:
    """A known mix of successes and refusals; returns the expected count per (method, code, outcome)."""
    port = server.port
    otps = {}
    for partner, channels in (("metrics-a", ["email", "phone"]), ("metrics-b", ["phone"])):
        sent = call(
            port, "SendBindingOtp", pb.SendBindingOtpRequest(individual_id=DEMO_ID, otp_channels=channels), partner
        )
        assert isinstance(sent, pb.SendBindingOtpResponse), sent
        otps[partner] = read_otp(data_dir / "outbox.jsonl", sent.transaction_id)
    bad_channel = call(port, "SendBindingOtp", pb.SendBindingOtpRequest(individual_id=DEMO_ID, otp_channels=["fax"]))
    assert isinstance(bad_channel, grpc.RpcError)
    assert bad_channel.code() == grpc.StatusCode.INVALID_ARGUMENT

    def bind(partner: str, otp: str) -> object:
        _, jwk = new_wallet_key("ec-p256")
        req = pb.DoKeyBindingRequest(
            individual_id=DEMO_ID,
            challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
            public_key_jwk=jwk,
            bind_auth_factor_type="WLA",
        )
        return call(port, "DoKeyBinding", req, partner)

    refused = bind("metrics-a", other_otp(otps["metrics-a"]))
    assert isinstance(refused, grpc.RpcError)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    for partner, otp in otps.items():
        assert isinstance(bind(partner, otp), pb.DoKeyBindingResponse)
    formats = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP")
    no_partner = call(port, "GetSupportedChallengeFormats", formats, partner=None)
    assert isinstance(no_partner, grpc.RpcError)
    assert no_partner.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(SPREAD_CALLS):
        assert isinstance(call(port, "GetSupportedChallengeFormats", formats), pb.GetSupportedChallengeFormatsResponse)
    return {
        ("SendBindingOtp", "OK", "ok"): 2,
        ("SendBindingOtp", "INVALID_ARGUMENT", "invalid_otp_channel"): 1,
        ("DoKeyBinding", "UNAUTHENTICATED", "auth_failed"): 1,
        ("DoKeyBinding", "OK", "ok"): 2,
        ("GetSupportedChallengeFormats", "UNAUTHENTICATED", "required_header_missing"): 1,
        ("GetSupportedChallengeFormats", "OK", "ok"): SPREAD_CALLS,
    }


def rpc_counts(samples: dict[Series, float]) -> dict[tuple[str, str, str], int]:
    counts = series(samples, "keybinder_rpc_requests_total")
    return {(d["method"], d["code"], d["outcome"]): int(v) for labels, v in counts.items() for d in [dict(labels)]}


def check_scrape(samples: dict[Series, float], expected: dict[tuple[str, str, str], int]) -> None:
    assert rpc_counts(samples) == expected
    by_code: dict[tuple[tuple[str, str], ...], float] = {}
    for (method, code, _), n in expected.items():
        key = (("code", code), ("method", method))
        by_code[key] = by_code.get(key, 0) + n
    assert series(samples, "keybinder_rpc_duration_seconds_count") == by_code
    assert series(samples, "keybinder_otps_sent_total") == {(("channel", "email"),): 1, (("channel", "phone"),): 2}
    assert series(samples, "keybinder_lockouts_total") == {}
    # One active binding per partner: the refused attempt made none.
    assert samples[("keybinder_active_bindings", ())] == 2
    # Every binding signed a certificate in the HSM (the health probe signs too), and nothing failed there.
    signing = samples.get(("keybinder_hsm_operation_duration_seconds_count", (("operation", "signing with key"),)))
    assert signing is not None
    assert signing >= 2
    assert samples.get(("keybinder_hsm_operation_duration_seconds_count", (("operation", "HMAC with key"),)), 0) > 0
    assert series(samples, "keybinder_hsm_errors_total") == {}


@pytest.mark.parametrize("serve_process", [1], indirect=True, ids=["one-process"])
def test_one_process_counts_every_rpc(serve_process: MetricsServer) -> None:
    data_dir = serve_process.log_path.parent / "data"
    expected = run_sequence(serve_process, data_dir)
    samples = scrape(serve_process.metrics_port)
    check_scrape(samples, expected)
    assert ("process_cpu_seconds_total", ()) in samples  # the process's own metrics come along
    assert serve_process.stop() == 0
    access = [line for line in serve_process.log_lines() if line["logger"] == "keybinder.access"]
    assert len(access) == sum(expected.values())


@pytest.mark.parametrize("serve_process", [2], indirect=True, ids=["two-workers"])
def test_two_workers_sum_on_the_supervisors_endpoint(serve_process: MetricsServer) -> None:
    data_dir = serve_process.log_path.parent / "data"
    metrics_dir = data_dir / "metrics" / str(serve_process.proc.pid)
    assert metrics_dir.is_dir()
    expected = run_sequence(serve_process, data_dir)
    check_scrape(scrape(serve_process.metrics_port), expected)

    # Both workers served part of the sequence (so the endpoint really summed them).
    access = [line for line in serve_process.log_lines() if line["logger"] == "keybinder.access"]
    assert len(access) == sum(expected.values())
    pids = {int(str(line["pid"])) for line in access}
    assert {line["worker"] for line in access} == {0, 1}
    assert len(pids) == 2

    # A worker that dies keeps its counts in the sums; its replacement adds to them.
    victim = pids.pop()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + STARTUP_SECONDS
    while "serving again" not in serve_process.log_path.read_text():
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.2)
    check_scrape(scrape(serve_process.metrics_port), expected)
    formats = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN")
    for _ in range(3):
        assert isinstance(
            call(serve_process.port, "GetSupportedChallengeFormats", formats), pb.GetSupportedChallengeFormatsResponse
        )
    expected[("GetSupportedChallengeFormats", "OK", "ok")] += 3
    assert rpc_counts(scrape(serve_process.metrics_port)) == expected

    assert serve_process.stop() == 0
    assert not metrics_dir.exists(), "the supervisor removes its workers' metric files"


def test_hsm_operation_drops_the_key_label() -> None:
    assert metrics.hsm_operation("signing with key 'keybinder-issuer'") == "signing with key"
    assert metrics.hsm_operation('generating ec-p256 key "x y"') == "generating ec-p256 key"
    assert metrics.hsm_operation("'only a label'") == "unknown"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_lockouts_are_counted_as_rpc_outcomes(
    kb: RunningServer, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.enable()  # recording is per process: the test server records from now on
    labels = {"method": "SendBindingOtp", "code": "RESOURCE_EXHAUSTED", "outcome": "too_many_attempts"}
    before = sample("keybinder_rpc_requests_total", **labels)
    lockouts = sample("keybinder_lockouts_total", method="SendBindingOtp")

    def locked_out(*args: object) -> None:
        raise TooManyAttemptsError("too many attempts; try again later", retry_after_seconds=60)

    monkeypatch.setattr(kb.app.service, "send_binding_otp", locked_out)
    request = pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email"])
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            kb.stub.SendBindingOtp(request, metadata=md())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample("keybinder_rpc_requests_total", **labels) == before + 2
    assert sample("keybinder_lockouts_total", method="SendBindingOtp") == lockouts + 2


def test_hsm_latency_and_errors_are_observed(kb: RunningServer, person: Person) -> None:
    metrics.enable()
    signing = sample("keybinder_hsm_operation_duration_seconds_count", operation="signing with key")
    errors = sample("keybinder_hsm_errors_total", operation="reading public key", error="KeyNotFoundError")
    _, otp = send_otp(kb, person)
    _, jwk = new_wallet_key("ec-p256")
    kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
    assert sample("keybinder_hsm_operation_duration_seconds_count", operation="signing with key") >= signing + 1
    assert sample("keybinder_hsm_operation_duration_seconds_sum", operation="signing with key") > 0
    with pytest.raises(KeyNotFoundError):
        kb.app.keys.get_public_key("no-such-key")  # a real PKCS#11 lookup that finds nothing
    assert sample("keybinder_hsm_errors_total", operation="reading public key", error="KeyNotFoundError") == errors + 1


def test_active_bindings_are_counted_at_scrape_time_and_cached(kb: RunningServer, person: Person) -> None:
    now = [0.0]
    url = kb.app.settings.database
    collector = metrics.ActiveBindingsCollector(lambda: open_store(url), cache_seconds=5, clock=lambda: now[0])
    try:
        first = collector.current()
        assert first == kb.app.store.count_active_bindings()
        _, otp = send_otp(kb, person)
        _, jwk = new_wallet_key("ec-p256")
        kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
        now[0] = 4.9
        assert collector.current() == first, "within the cache period the last count is served"
        now[0] = 5.0
        assert collector.current() == first + 1
        [family] = list(collector.collect())
        assert family.name == "keybinder_active_bindings"
        assert family.samples[0].value == first + 1
    finally:
        collector.close()


def test_an_unreachable_database_leaves_the_gauge_out() -> None:
    def broken() -> Store:
        raise OSError("database down")

    collector = metrics.ActiveBindingsCollector(broken, cache_seconds=0)
    try:
        assert collector.current() is None
        assert list(collector.collect()) == []
    finally:
        collector.close()


def test_metrics_are_off_unless_a_port_is_set(tmp_path: Path) -> None:
    defaults = load_settings(data_dir=tmp_path)
    assert defaults.metrics_port is None
    assert defaults.metrics_host == "127.0.0.1"
    assert load_settings(data_dir=tmp_path, metrics_port=0).metrics_port == 0
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match="metrics_port"):
            load_settings(data_dir=tmp_path, metrics_port=bad)


def test_a_busy_metrics_port_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "keybinder.db").touch(mode=0o600)  # past serve's check for a data directory init made: the port fails
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = kb_cli(
            "serve", "--port", "0", "--workers", "1", "--metrics-port", str(busy.getsockname()[1]), data_dir=tmp_path
        )
    assert result.returncode != 0
    assert "cannot serve metrics" in result.stderr
    assert "Traceback" not in result.stderr
