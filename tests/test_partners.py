"""Partner authentication through the real server: API keys, the cache, the CLI, the demo partner."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server import partners as partners_module
from server.config import load_settings
from server.domain import Partner
from server.errors import BackendUnavailableError, InvalidPartnerError, RequiredHeaderMissingError
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.servicer import API_KEY_HEADER, PARTNER_ID_HEADER, KeyBinderServicer
from server.partners import (
    API_KEY_PREFIX,
    IssuedKey,
    PartnerAuthenticator,
    add_partner,
    hash_api_key,
    new_api_key,
)
from server.ports import StoreUnavailable
from server.provisioning import DEMO_PARTNER
from server.serve import SERVICE_NAME
from server.stores.sqlite import SqliteStore
from tests.conftest import PARTNER, PARTNER_KEYS, Person, RunningServer, failure, md, send_otp
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, kb_cli, make_data_dir

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
Metadata = tuple[tuple[str, str], ...]
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["KeyBinderService"].methods]


def call_empty(kb: RunningServer, method: str, metadata: Metadata) -> object:
    """Call any KeyBinderService RPC with an empty request: authentication comes before the request is read."""
    descriptor = pb.DESCRIPTOR.services_by_name["KeyBinderService"].methods_by_name[method]
    request_cls = message_factory.GetMessageClass(descriptor.input_type)
    response_cls = message_factory.GetMessageClass(descriptor.output_type)
    rpc = kb.channel.unary_unary(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    return rpc(request_cls(), metadata=metadata, timeout=10)


def row_counts(kb: RunningServer) -> dict[str, int]:
    tables = ("individuals", "otps", "bindings", "wallet_keys", "wla_jtis", "binding_nonces", "partners")
    return {t: kb.app.store.count_rows(t) for t in tables}


def formats(kb: RunningServer, metadata: Metadata) -> object:
    return kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=metadata, timeout=10
    )


@pytest.fixture
def no_cache(kb: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test sees every partner change at once (the server reads the partner on each request)."""
    monkeypatch.setattr(kb.app.partners, "cache_seconds", 0)
    kb.app.partners.invalidate()


@pytest.fixture
def partner(kb: RunningServer, no_cache: None) -> IssuedKey:
    """A partner of the test's own, registered through the same function the CLI uses."""
    return add_partner(kb.app.store, f"own-{os.urandom(4).hex()}", datetime.now(UTC))


# -- every RPC of the service needs credentials ------------------------------------------------------

BAD_CREDENTIALS = [
    pytest.param((), "required_header_missing", id="nothing"),
    pytest.param((("partner-id", PARTNER),), "required_header_missing", id="no-api-key"),
    pytest.param((("partner-id", PARTNER), ("partner-api-key", "")), "required_header_missing", id="empty-api-key"),
    pytest.param((("partner-api-key", PARTNER_KEYS[PARTNER]),), "required_header_missing", id="no-partner-id"),
    pytest.param((("partner-id", PARTNER), ("partner-api-key", new_api_key())), "invalid_partner", id="wrong-key"),
    pytest.param(
        (("partner-id", PARTNER), ("partner-api-key", PARTNER_KEYS["other-partner"])),
        "invalid_partner",
        id="another-partners-key",
    ),
    pytest.param(
        (("partner-id", "never-registered"), ("partner-api-key", PARTNER_KEYS[PARTNER])),
        "invalid_partner",
        id="unknown-partner",
    ),
    pytest.param(
        (("partner-id", PARTNER), ("partner-api-key", PARTNER_KEYS[PARTNER] + "x")), "invalid_partner", id="key+1"
    ),
    pytest.param(
        (("partner-id", PARTNER), ("partner-api-key", PARTNER_KEYS[PARTNER][:-1])), "invalid_partner", id="key-1"
    ),
    pytest.param((("partner-id", PARTNER), ("partner-api-key", "kb_" + "k" * 4000)), "invalid_partner", id="huge-key"),
    pytest.param(
        (("partner-id", PARTNER), ("partner-id", "other-partner"), ("partner-api-key", PARTNER_KEYS[PARTNER])),
        "invalid_partner",
        id="two-partner-ids",
    ),
    pytest.param(
        (
            ("partner-id", PARTNER),
            ("partner-api-key", PARTNER_KEYS[PARTNER]),
            ("partner-api-key", PARTNER_KEYS["other-partner"]),
        ),
        "invalid_partner",
        id="two-api-keys",
    ),
    pytest.param((("partner-id", "bad partner!"), ("partner-api-key", "kb_x")), "invalid_partner", id="malformed-id"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("metadata", "reason"), BAD_CREDENTIALS)
def test_every_rpc_refuses_bad_credentials(kb: RunningServer, method: str, metadata: Metadata, reason: str) -> None:
    before = row_counts(kb)
    f = failure(lambda: call_empty(kb, method, metadata))
    assert (f.code, f.reason, f.domain) == (UNAUTHENTICATED, reason, "keybinder")
    # One message per reason, whatever was wrong: nobody learns which partner ids exist.
    if reason == "invalid_partner" and "malformed" not in f.message and "repeated" not in f.message:
        assert f.message == "unknown or disabled partner, or wrong API key"
    for _, value in metadata:
        if value.startswith(API_KEY_PREFIX):
            assert value not in f.message
    assert row_counts(kb) == before


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


def test_the_right_key_is_accepted_on_every_rpc(kb: RunningServer) -> None:
    """Past authentication: each RPC fails (if at all) on its empty request, never on the partner."""
    reasons = {}
    for method in METHODS:
        try:
            call_empty(kb, method, md())
        except grpc.RpcError as err:
            reasons[method] = reason_of(err)
        else:
            reasons[method] = "ok"
    assert set(reasons) == set(METHODS)
    assert not {"required_header_missing", "invalid_partner"} & set(reasons.values()), reasons
    assert reasons["GetSupportedChallengeFormats"] == reasons["GetIssuerCertificates"] == "ok"


def test_health_and_reflection_need_no_credentials(kb: RunningServer) -> None:
    status = health_pb2_grpc.HealthStub(kb.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(kb.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    assert SERVICE_NAME in {s.name for r in responses for s in r.list_services_response.service}


def test_a_refused_partner_spends_no_otp(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    req = pb.DoKeyBindingRequest(
        individual_id=person.individual_id,
        challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)],
        public_key_jwk="{}",
        bind_auth_factor_type="WLA",
    )
    wrong = (("partner-id", PARTNER), ("partner-api-key", new_api_key()))
    assert failure(lambda: kb.stub.DoKeyBinding(req, metadata=wrong)).reason == "invalid_partner"
    assert kb.app.store.otp_state(tx) == ("pending", 0)


# -- disable, rotate, cache ----------------------------------------------------------------------------


def key_md(issued: IssuedKey) -> Metadata:
    return (("partner-id", issued.partner_id), ("partner-api-key", issued.api_key))


def test_disable_enable_and_rotate(kb: RunningServer, partner: IssuedKey) -> None:
    store = kb.app.store
    assert formats(kb, key_md(partner))
    assert store.set_partner_enabled(partner.partner_id, False, datetime.now(UTC))
    assert failure(lambda: formats(kb, key_md(partner))).reason == "invalid_partner"
    assert store.set_partner_enabled(partner.partner_id, True, datetime.now(UTC))
    assert formats(kb, key_md(partner))
    rotated = partners_module.rotate_key(store, partner.partner_id, datetime.now(UTC))
    assert rotated.api_key != partner.api_key
    assert failure(lambda: formats(kb, key_md(partner))).reason == "invalid_partner"
    assert formats(kb, key_md(rotated))
    with pytest.raises(ValueError, match="no partner"):
        partners_module.rotate_key(store, "nobody-at-all", datetime.now(UTC))


def test_a_disable_takes_effect_within_the_cache_time(
    kb: RunningServer, partner: IssuedKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 0.5
    monkeypatch.setattr(kb.app.partners, "cache_seconds", ttl)
    assert formats(kb, key_md(partner))  # now cached
    kb.app.store.set_partner_enabled(partner.partner_id, False, datetime.now(UTC))
    disabled_at = time.monotonic()
    assert formats(kb, key_md(partner)), "the cached record answers until it expires"
    while True:
        try:
            formats(kb, key_md(partner))
        except grpc.RpcError:
            break
        assert time.monotonic() - disabled_at < ttl + 0.5, "still accepted after the cache time"
        time.sleep(0.02)
    assert time.monotonic() - disabled_at >= ttl * 0.5


class PartnerCall:
    """What the servicer reads of an incoming call: the partner headers, and no client certificate."""

    def __init__(self, partner_id: str, api_key: str) -> None:
        self.metadata = ((PARTNER_ID_HEADER, partner_id), (API_KEY_HEADER, api_key))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


class Checker:
    """The servicer's partner check (KeyBinderServicer.authenticate) over an authenticator the test builds."""

    def __init__(self, kb: RunningServer, auth: PartnerAuthenticator) -> None:
        self.servicer = KeyBinderServicer(kb.app.service, None, auth)

    def __call__(self, partner_id: str, api_key: str) -> str:
        return asyncio.run(self.check(partner_id, api_key))

    async def check(self, partner_id: str, api_key: str) -> str:
        return await self.servicer.authenticate(PartnerCall(partner_id, api_key))


def test_cache_bound_is_exact_with_a_fake_clock(kb: RunningServer) -> None:
    """The servicer's check on the real store, with a clock the test moves."""
    now = [1000.0]
    auth = PartnerAuthenticator(kb.app.store, cache_seconds=5, clock=lambda: now[0])
    authenticate = Checker(kb, auth)
    issued = add_partner(kb.app.store, f"clock-{os.urandom(4).hex()}", datetime.now(UTC))
    assert authenticate(issued.partner_id, issued.api_key) == issued.partner_id
    kb.app.store.set_partner_enabled(issued.partner_id, False, datetime.now(UTC))
    now[0] += 4.999
    assert authenticate(issued.partner_id, issued.api_key) == issued.partner_id
    now[0] += 0.002
    with pytest.raises(InvalidPartnerError):
        authenticate(issued.partner_id, issued.api_key)
    # Unknown ids are cached too (a flood of made-up ids costs one query each per cache time), up to a bound.
    assert auth.cached("id:made-up") == (False, None)
    with pytest.raises(InvalidPartnerError):
        authenticate("made-up", "kb_x")
    assert auth.cached("id:made-up") == (True, None)
    for n in range(partners_module.MAX_CACHE_ENTRIES + 1):
        auth.fetch(f"id:flood-{n}")
    assert len(auth._cache) <= partners_module.MAX_CACHE_ENTRIES


def test_a_rotated_key_works_within_a_second_and_wrong_keys_cannot_flood_the_store(kb: RunningServer) -> None:
    now = [1000.0]
    reads: list[str] = []

    class CountingStore:
        def get_partner(self, partner_id: str) -> Partner | None:
            reads.append(partner_id)
            return kb.app.store.get_partner(partner_id)

    auth = PartnerAuthenticator(CountingStore(), cache_seconds=60, clock=lambda: now[0])  # type: ignore[arg-type]
    authenticate = Checker(kb, auth)
    issued = add_partner(kb.app.store, f"rotating-{os.urandom(4).hex()}", datetime.now(UTC))
    assert authenticate(issued.partner_id, issued.api_key) == issued.partner_id
    rotated = partners_module.rotate_key(kb.app.store, issued.partner_id, datetime.now(UTC))
    # Within a second of the last read, the cached record decides: the new key waits, no extra read.
    now[0] += partners_module.REFRESH_AFTER_SECONDS / 2
    for _ in range(100):
        with pytest.raises(InvalidPartnerError):
            authenticate(issued.partner_id, rotated.api_key)
    assert len(reads) == 1
    # After a second, a refused key is checked against the store once: the new key works, the old one not.
    now[0] += partners_module.REFRESH_AFTER_SECONDS
    assert authenticate(issued.partner_id, rotated.api_key) == issued.partner_id
    assert len(reads) == 2
    for _ in range(100):
        with pytest.raises(InvalidPartnerError):
            authenticate(issued.partner_id, issued.api_key)
    assert len(reads) == 2


def test_header_checks_come_in_order() -> None:
    check = PartnerAuthenticator.check_headers
    with pytest.raises(RequiredHeaderMissingError, match="partner-id"):
        check(None, "kb_x")
    with pytest.raises(InvalidPartnerError, match="malformed"):
        check("bad id", None)
    with pytest.raises(RequiredHeaderMissingError, match="partner-api-key"):
        check("good-id", None)
    assert check("good-id", "kb_x") == ("good-id", "kb_x")


def test_the_key_comparison_is_constant_time_even_for_unknown_partners(
    kb: RunningServer, no_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []

    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("server.partners.hmac.compare_digest", recording)
    assert formats(kb, md())
    failure(lambda: formats(kb, (("partner-id", PARTNER), ("partner-api-key", "kb_wrong"))))
    failure(lambda: formats(kb, (("partner-id", "nobody-here"), ("partner-api-key", "kb_wrong"))))
    # Three requests, three comparisons of two 32-byte hashes: the unknown partner is compared too.
    assert len(compared) == 3
    assert all(len(a) == len(b) == 32 for a, b in compared)


def test_an_unreachable_database_is_retryable_not_internal(kb: RunningServer) -> None:
    class DownStore:
        def get_partner(self, partner_id: str) -> Partner | None:
            raise StoreUnavailable("connection refused")

    authenticate = Checker(kb, PartnerAuthenticator(DownStore(), cache_seconds=0))  # type: ignore[arg-type]
    with pytest.raises(BackendUnavailableError):
        authenticate(PARTNER, PARTNER_KEYS[PARTNER])


def test_a_cached_check_is_cheap(kb: RunningServer) -> None:
    """Server CPU per request matters: a cache hit is a dict lookup, one SHA-256 and one comparison."""
    authenticate = Checker(kb, PartnerAuthenticator(kb.app.store, cache_seconds=60))
    key = PARTNER_KEYS[PARTNER]
    authenticate(PARTNER, key)
    n = 20_000

    async def checks() -> float:
        start = time.perf_counter()
        for _ in range(n):
            await authenticate.check(PARTNER, key)
        return time.perf_counter() - start

    per_check = asyncio.run(checks()) / n
    # About 2 microseconds on one core here; the bound leaves room for a loaded machine.
    assert per_check < 50e-6, f"{per_check * 1e6:.1f} us per check"


# -- keys and records never print --------------------------------------------------------------------------


def test_keys_are_random_prefixed_and_stored_as_hashes_only(kb: RunningServer) -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith(API_KEY_PREFIX) and len(k) == 46 for k in keys)
    issued = add_partner(kb.app.store, f"hashed-{os.urandom(4).hex()}", datetime.now(UTC))
    stored = kb.app.store.get_partner(issued.partner_id)
    assert stored is not None
    assert stored.api_key_hash == hash_api_key(issued.api_key)
    assert issued.api_key.encode() not in kb.app.settings.database_path.read_bytes()
    assert issued.api_key not in repr(issued)
    assert stored.api_key_hash.hex() not in repr(stored)
    with pytest.raises(ValueError, match="already exists"):
        add_partner(kb.app.store, issued.partner_id, datetime.now(UTC))
    assert kb.app.store.get_partner(issued.partner_id) == stored


def test_api_keys_never_reach_logs_or_errors(
    kb: RunningServer, no_cache: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = md()
    wrong_key = new_api_key()
    attempts: list[Metadata] = [
        good,
        (("partner-id", PARTNER), ("partner-api-key", wrong_key)),
        (("partner-id", "not-registered"), ("partner-api-key", wrong_key)),
        (("partner-id", "bad id!"), ("partner-api-key", wrong_key)),
    ]
    messages = []
    for metadata in attempts:
        try:
            formats(kb, metadata)
        except grpc.RpcError as err:
            messages.append(f"{err.code()} {err.details()} {err.debug_error_string()}")
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert len(messages) == 3
    for key in (PARTNER_KEYS[PARTNER], wrong_key):
        assert key not in logged
        assert all(key not in m for m in messages)


def test_settings_print_the_database_password_masked(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path, database_url="postgresql://kb:s3cret-pw@db.internal:5432/kb")
    assert s.database_url.endswith("@db.internal:5432/kb")  # the value itself is intact
    for text in (repr(s), str(s), f"{s!r}"):
        assert "s3cret-pw" not in text
        assert "kb:***@db.internal" in text


# -- the CLI and real serve processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("partners-data"))


def issued_key(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return lines["api"].removeprefix("key ")


def test_partners_cli(data_dir: Path) -> None:
    key = issued_key(kb_cli("partners", "add", "cli-wallet", data_dir=data_dir))
    assert key.startswith(API_KEY_PREFIX)
    taken = kb_cli("partners", "add", "cli-wallet", data_dir=data_dir)
    assert taken.returncode == 1
    assert "already exists" in taken.stderr
    bad = kb_cli("partners", "add", "bad id!", data_dir=data_dir)
    assert bad.returncode == 1
    assert "partner id" in bad.stderr
    listing = kb_cli("partners", "list", data_dir=data_dir)
    assert listing.returncode == 0
    header, *lines = listing.stdout.splitlines()
    assert header.split() == ["PARTNER", "STATE", "CLIENT", "CERT", "SHA-256", "UPDATED"]
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert rows == {"cli-wallet": "enabled", DEMO_PARTNER: "enabled"}
    assert key not in listing.stdout
    assert kb_cli("partners", "disable", "cli-wallet", data_dir=data_dir).returncode == 0
    assert ["cli-wallet", "disabled"] in [
        line.split()[:2] for line in kb_cli("partners", "list", data_dir=data_dir).stdout.splitlines()
    ]
    assert kb_cli("partners", "enable", "cli-wallet", data_dir=data_dir).returncode == 0
    rotated = issued_key(kb_cli("partners", "rotate-key", "cli-wallet", data_dir=data_dir))
    assert rotated != key
    for command in ("disable", "enable", "rotate-key"):
        missing = kb_cli("partners", command, "nobody", data_dir=data_dir)
        assert missing.returncode == 1
        assert "no partner 'nobody'" in missing.stderr
    db = (data_dir / "keybinder.db").read_bytes()
    assert key.encode() not in db
    assert rotated.encode() not in db


def test_init_creates_the_demo_partner_once(data_dir: Path) -> None:
    key_file = data_dir / "demo-partner.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text()
    again = kb_cli("init", "--demo-partner", data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    assert f"reused   demo partner '{DEMO_PARTNER}'" in again.stdout
    assert key_file.read_text() == key
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        partner = store.get_partner(DEMO_PARTNER)
    finally:
        store.close()
    assert partner is not None
    assert partner.api_key_hash == hash_api_key(key.strip())


def test_the_demo_partner_survives_a_new_database_and_recovers_a_lost_key(tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    key = (data_dir / "demo-partner.key").read_text()
    # The database is recreated (e.g. a fresh PostgreSQL): the key file registers the partner again.
    with sqlite3.connect(data_dir / "keybinder.db") as conn:
        conn.execute("DELETE FROM partners")
    conn.close()
    assert kb_cli("init", "--demo-partner", data_dir=data_dir).returncode == 0
    assert (data_dir / "demo-partner.key").read_text() == key
    # The key file is lost: a new key is issued and written; the old one no longer works.
    (data_dir / "demo-partner.key").unlink()
    assert kb_cli("init", "--demo-partner", data_dir=data_dir).returncode == 0
    new_key = (data_dir / "demo-partner.key").read_text()
    assert new_key != key
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        partner = store.get_partner(DEMO_PARTNER)
    finally:
        store.close()
    assert partner is not None
    assert partner.api_key_hash == hash_api_key(new_key.strip())


class Serve:
    """`keybinder serve` in a process of its own, stderr in a file the test can read while it runs."""

    def __init__(self, data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [*KEYBINDER, "serve", "--port", "0", "--data-dir", str(data_dir), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=cli_env() | (env or {}),
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("keybinder listening on "):
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"serve did not start: {line!r} {log.read_text()}")
        self.port = int(line.split()[3].rsplit(":", 1)[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def stderr(self) -> str:
        return self.log.read_text()


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def plain_formats(port: int, metadata: Metadata) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=metadata, timeout=10
        )


def refused(call: Callable[[], object]) -> str:
    return failure(call).reason


def test_disable_and_rotate_reach_a_running_server(data_dir: Path, tmp_path: Path) -> None:
    """Partners changed with the CLI while `keybinder serve` runs: within the cache time, or at once on SIGHUP."""
    key = issued_key(kb_cli("partners", "add", "live-wallet", data_dir=data_dir))
    md_live = (("partner-id", "live-wallet"), ("partner-api-key", key))
    server = Serve(data_dir, tmp_path / "serve.log", "--workers", "2", env={"KEYBINDER_PARTNER_CACHE_SECONDS": "1"})
    try:
        assert plain_formats(server.port, md_live)
        assert kb_cli("partners", "disable", "live-wallet", data_dir=data_dir).returncode == 0
        start = time.monotonic()
        assert wait_until(lambda: _refused_quietly(server.port, md_live), seconds=5)
        assert time.monotonic() - start < 1 + 1.5  # the cache time plus slack for two processes on a busy machine
        assert kb_cli("partners", "enable", "live-wallet", data_dir=data_dir).returncode == 0
        new_key = issued_key(kb_cli("partners", "rotate-key", "live-wallet", data_dir=data_dir))
        md_new = (("partner-id", "live-wallet"), ("partner-api-key", new_key))
        assert wait_until(lambda: _accepted_quietly(server.port, md_new) and _refused_quietly(server.port, md_live))
    finally:
        assert server.stop() == 0
    assert key not in server.stderr()


def test_sighup_clears_the_partner_cache_on_every_worker(data_dir: Path, tmp_path: Path) -> None:
    key = issued_key(kb_cli("partners", "add", "hup-wallet", data_dir=data_dir))
    md_hup = (("partner-id", "hup-wallet"), ("partner-api-key", key))
    server = Serve(data_dir, tmp_path / "serve.log", "--workers", "2", env={"KEYBINDER_PARTNER_CACHE_SECONDS": "300"})
    try:
        # Each worker caches the partner (several connections, so SO_REUSEPORT spreads them).
        for _ in range(16):
            assert plain_formats(server.port, md_hup)
        assert kb_cli("partners", "disable", "hup-wallet", data_dir=data_dir).returncode == 0
        for _ in range(4):
            assert plain_formats(server.port, md_hup), "cached for 300 s"
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: server.stderr().count("partner cache cleared") == 2)
        for _ in range(8):
            assert refused(lambda: plain_formats(server.port, md_hup)) == "invalid_partner"
    finally:
        assert server.stop() == 0


def _refused_quietly(port: int, metadata: Metadata) -> bool:
    try:
        plain_formats(port, metadata)
    except grpc.RpcError as err:
        return bool(err.code() == UNAUTHENTICATED)
    return False


def _accepted_quietly(port: int, metadata: Metadata) -> bool:
    try:
        plain_formats(port, metadata)
    except grpc.RpcError:
        return False
    return True


def test_demo_client_reads_the_key_file(data_dir: Path, tmp_path: Path) -> None:
    server = Serve(data_dir, tmp_path / "serve.log", "--workers", "1")
    try:
        result = kb_cli("demo", "--target", f"127.0.0.1:{server.port}", "--individual-id", DEMO_ID, data_dir=data_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "BEGIN CERTIFICATE" in result.stdout
        key = (data_dir / "demo-partner.key").read_text().strip()
        # The key is read from the file: it is on no command line and in no output.
        assert key not in result.stdout + result.stderr
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert key not in cmdline
        missing = kb_cli(
            "demo",
            "--target",
            f"127.0.0.1:{server.port}",
            "--partner-key-file",
            str(tmp_path / "absent.key"),
            data_dir=data_dir,
        )
        assert missing.returncode == 1
        assert "cannot read the partner API key" in missing.stderr
    finally:
        assert server.stop() == 0
    assert key not in server.stderr()


def test_no_command_line_option_takes_a_secret() -> None:
    """Secrets never reach argv: every CLI parameter named like one is a file path (or a flag)."""
    import typing

    import typer

    from server.cli import app

    def commands(t: typer.Typer, path: str) -> list[tuple[str, typing.Callable[..., object]]]:
        found = [
            (f"{path} {c.name or (c.callback.__name__ if c.callback else '')}", c.callback)
            for c in t.registered_commands
        ]
        for group in t.registered_groups:
            assert group.typer_instance is not None
            found += commands(group.typer_instance, f"{path} {group.name}")
        return [(name, cb) for name, cb in found if cb is not None]

    secret_like = ("key", "pin", "secret", "password", "otp", "token")
    checked = []
    for where, callback in commands(app, "keybinder"):
        for name, hint in typing.get_type_hints(callback).items():
            if name == "return" or name == "key_type" or not any(word in name for word in secret_like):
                continue
            checked.append(f"{where} {name}")
            assert hint in (Path, Path | None, bool, bool | None), (
                f"{where}: {name} ({hint}) would put a secret on argv"
            )
    assert "keybinder demo partner_key_file" in checked
    assert "keybinder serve tls_key" in checked
    assert "keybinder identities add with_pin" in checked


def test_partners_cli_without_a_database_fails_cleanly(tmp_path: Path) -> None:
    result = kb_cli("partners", "list", data_dir=tmp_path / "never-initialised")
    assert result.returncode == 1
    assert "run `keybinder init`" in result.stderr
    assert "Traceback" not in result.stderr
