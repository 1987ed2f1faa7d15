"""Shared fixtures: a SoftHSM token and database per test session, and the real gRPC server."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from joserfc.jwk import ECKey, OKPKey, RSAKey

from hsm import KeyKind, Pkcs11KeyManager, Pkcs11Uri, TokenNotFoundError
from hsm.provision import init_token
from server.app import App
from server.config import DEFAULT_MODULE, Settings, load_settings
from server.domain import Partner
from server.enrolment import register_identity
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import WalletPrivateKey, read_otp
from server.partners import hash_api_key, new_api_key
from server.pin_policy import pin_rule_broken
from server.provisioning import initialise
from server.serve import Server
from server.stores import Store, open_store
from tests.hsm_backends import (
    OPENCRYPTOKI,
    OPENCRYPTOKI_DEFAULT_SO_PIN,
    OPENCRYPTOKI_MODULE,
    OPENCRYPTOKI_TOKEN,
    P11KIT,
    P11KIT_CLIENT,
    SOFTHSM,
    UNSUPPORTED_REPORT,
    HsmBackend,
    P11KitServer,
    start_opencryptoki_daemon,
)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: Partners whose proof-of-possession policy differs from the default (optional).
POP_REQUIRED_PARTNER = "pop-required-wallet"
POP_OFF_PARTNER = "pop-off-wallet"
SOFTHSM_MODULE = os.environ.get("PKCS11_MODULE", DEFAULT_MODULE)


def require(condition: bool, what: str) -> None:
    """Skip when a real component is missing on a developer machine; fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} not available")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test fails the run, whatever skipped it: nothing passes by not running."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        if reporter is not None:
            reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; a skip fails the run under CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: Abuse limits no ordinary test reaches (many tests send OTPs or fail challenges for one partner).
LOOSE_LIMITS: dict[str, Any] = {
    "otp_sends_per_individual": 1_000_000,
    "otp_sends_per_partner_per_minute": 10_000_000,
    "auth_failures_before_lockout": 1_000_000,
    "auth_failures_per_partner_per_minute": 10_000_000,
    "auth_failures_per_minute": 100_000_000,
    "nonces_per_partner_per_minute": 10_000_000,
    "nonces_per_individual": 1_000_000,
}


PG_ADMIN_URL = os.environ.get("KEYBINDER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own, dropped afterwards (fails under CI=true without PostgreSQL)."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            name = f"{prefix}_{secrets.token_hex(4)}"
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        require(False, f"PostgreSQL at {PG_ADMIN_URL}")
        raise
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        # A fresh connection: a test may have restarted the server meanwhile.
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=30) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A fresh data directory (token, PINs, database) for this test session, initialised once."""
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    data_dir = tmp_path_factory.mktemp("keybinder-data")
    # The token folder must be chosen before anything in this process loads SoftHSM.
    os.environ.pop("SOFTHSM2_CONF", None)
    cfg = load_settings(
        data_dir=data_dir,
        otp_ttl_seconds=60,
        proof_of_possession_by_partner={POP_REQUIRED_PARTNER: "required", POP_OFF_PARTNER: "off"},
        # The shared server's abuse limits stay out of the other tests' way; test_limits.py sets tight ones.
        **LOOSE_LIMITS,
        # Nor does its sweep purge rows under tests that count them; test_hardening.py runs a sweep itself.
        sweep_interval_seconds=86400,
    )
    initialise(cfg)
    register_test_partners(cfg)
    return cfg


PARTNER = "test-wallet"
#: Every partner id the tests call with, registered once per session. The keys are made when this module
#: is imported, so that metadata built at import time (e.g. Hypothesis strategies) carries them too.
TEST_PARTNERS = (
    PARTNER,
    POP_REQUIRED_PARTNER,
    POP_OFF_PARTNER,
    "other-partner",
    "other-wallet",
    "lifecycle-other-wallet",
    "fuzz-wallet",
    "limits-other-wallet",
    "audit-partner-chain",
    "p" * 128,  # the longest partner id the syntax allows
)
PARTNER_KEYS: dict[str, str] = {partner: new_api_key() for partner in TEST_PARTNERS}


def register_test_partners(cfg: Settings) -> None:
    """Register TEST_PARTNERS with their keys in ``cfg``'s database."""
    store = open_store(cfg.database)
    try:
        now = datetime.now(UTC)
        for partner, key in PARTNER_KEYS.items():
            store.add_partner(Partner(partner, hash_api_key(key), True, None, now, now))
    finally:
        store.close()


def register_partner(store: Store, partner: str) -> None:
    """Register one more partner (a test's own id) with a fresh key that md() then sends."""
    key = PARTNER_KEYS.setdefault(partner, new_api_key())
    now = datetime.now(UTC)
    store.add_partner(Partner(partner, hash_api_key(key), True, None, now, now))


@dataclass
class RunningServer:
    server: Server
    port: int
    channel: grpc.Channel
    stub: pb_grpc.KeyBinderServiceStub

    @property
    def app(self) -> App:
        assert self.server.app is not None
        return self.server.app

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(settings: Settings) -> tuple[Server, int, Callable[[], None]]:
    """Run a real grpc.aio server on port 0 in a background thread; returns a stop function."""
    loop = asyncio.new_event_loop()
    server = Server(settings.model_copy(update={"listen": "127.0.0.1:0"}))
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["port"] = loop.run_until_complete(server.start())
        except BaseException as err:  # surfaced to the caller below
            started["error"] = err
        ready.set()
        if "port" in started:
            loop.run_forever()

    thread = threading.Thread(target=run, name="keybinder-test-server", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in started:
        raise started["error"]
    register_test_partners(settings)  # idempotent; a server on a database of its own needs them too

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()

    return server, int(started["port"]), stop


@contextmanager
def running(settings: Settings) -> Iterator[RunningServer]:
    """A real server (start_server) with a client channel, both closed afterwards."""
    server, port, stop = start_server(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(server, port, channel, pb_grpc.KeyBinderServiceStub(channel))
    finally:
        channel.close()
        stop()


@pytest.fixture(scope="session")
def kb(settings: Settings) -> Iterator[RunningServer]:
    with running(settings) as server:
        yield server


def md(partner: str | None = PARTNER) -> tuple[tuple[str, str], ...]:
    """The partner metadata: partner-id, plus the API key of a registered test partner."""
    if partner is None:
        return ()
    key = PARTNER_KEYS.get(partner)
    return (("partner-id", partner),) if key is None else (("partner-id", partner), ("partner-api-key", key))


@dataclass(frozen=True)
class Person:
    individual_id: str
    email: str
    phone: str
    pin: str


def acceptable_pin() -> str:
    """A random PIN that enrolment accepts (server.pin_policy refuses the guessable ones)."""
    while True:
        pin = f"{secrets.randbelow(10**6):06d}"
        if pin_rule_broken(pin) is None:
            return pin


def new_person(kb: RunningServer) -> Person:
    """A newly registered individual with email, phone and a PIN."""
    p = Person(
        individual_id=f"{secrets.randbelow(10**12):012d}",
        email=f"user{secrets.token_hex(3)}@example.org",
        phone=f"+4915{secrets.randbelow(10**8):08d}",
        pin=acceptable_pin(),
    )
    register_identity(
        kb.app.service, kb.app.store, individual_id=p.individual_id, email=p.email, phone=p.phone, name="T", pin=p.pin
    )
    return p


@pytest.fixture
def person(kb: RunningServer) -> Person:
    """A newly registered individual, unique to the test, with a PIN."""
    return new_person(kb)


def jose_key(private: WalletPrivateKey) -> ECKey | RSAKey | OKPKey:
    """The joserfc key for a wallet private key, to sign test tokens and proofs with."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(private)
    if isinstance(private, rsa.RSAPrivateKey):
        return RSAKey.import_key(private)
    return OKPKey.import_key(private)


def unregistered() -> Person:
    """A well-formed individual that was never registered."""
    return Person(f"{secrets.randbelow(10**12):012d}", "nobody@example.org", "+491500000000", "123456")


def other_otp(otp: str) -> str:
    """A well-formed OTP of the same alphabet that differs from ``otp``."""
    first = otp[0]
    other = str((int(first) + 1) % 10) if first.isdigit() else ("A" if first != "A" else "B")
    return other + otp[1:]


def other_pin(pin: str) -> str:
    return f"{(int(pin) + 1) % 10**6:06d}"


def id_hmac(kb: RunningServer, p: Person) -> bytes:
    return kb.app.service.id_hmac(p.individual_id)


def send_otp(kb: RunningServer, person: Person, partner: str = PARTNER) -> tuple[str, str]:
    """Send a binding OTP and read it from the outbox: (transaction_id, otp)."""
    resp = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email"]), metadata=md(partner)
    )
    return resp.transaction_id, read_otp(kb.app.settings.outbox, resp.transaction_id)


def otp_challenge(otp: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge=otp)


def pin_challenge(pin: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=pin)


def bind_request(
    person: Person, jwk: str, *challenges: pb.AuthChallenge, factor: str = "WLA"
) -> pb.DoKeyBindingRequest:
    return pb.DoKeyBindingRequest(
        individual_id=person.individual_id,
        challenges=list(challenges),
        public_key_jwk=jwk,
        bind_auth_factor_type=factor,
    )


@dataclass(frozen=True)
class RpcFailure:
    code: grpc.StatusCode
    reason: str
    domain: str
    message: str
    metadata: dict[str, str]


def failure(call: Callable[[], object]) -> RpcFailure:
    """Run an RPC that must fail; return its status code and ErrorInfo as the client sees them."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries no google.rpc.Status details"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            infos.append(ei)
    assert len(infos) == 1, "exactly one ErrorInfo expected"
    return RpcFailure(err.code(), infos[0].reason, infos[0].domain, err.details(), dict(infos[0].metadata))


# -- PKCS#11 backends (tests/hsm_backends.py) ------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kinds(*kinds): the issuer key kinds a test runs with, on every backend that supports them"
    )


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if UNSUPPORTED_REPORT:
        terminalreporter.section("HSM backends: unsupported mechanisms (verified missing, not skipped)")
        for line in sorted(set(UNSUPPORTED_REPORT)):
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def p11kit_server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[P11KitServer]:
    """The session's SoftHSM token directory served by `p11-kit server` from another process."""
    require(shutil.which("p11-kit") is not None, "p11-kit (Debian package p11-kit)")
    require(P11KIT_CLIENT is not None, "p11-kit-client.so (Debian package p11-kit-modules)")
    env = dict(os.environ, SOFTHSM2_CONF=str(settings.softhsm_conf_path))
    server = P11KitServer(tmp_path_factory.mktemp("p11kit") / "sock", SOFTHSM_MODULE, env)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def softhsm_backend(settings: Settings) -> HsmBackend:
    return HsmBackend(SOFTHSM, settings.pkcs11_uri, settings.issuer_key_type, so_pin=secrets.token_hex(8))


@pytest.fixture(scope="session")
def p11kit_backend(settings: Settings, p11kit_server: P11KitServer) -> HsmBackend:
    """SoftHSM behind p11-kit remoting: the same token, reached through the client module only."""
    main = settings.pkcs11_uri
    assert main.pin_source is not None
    uri = p11kit_server.uri(main.token, main.pin_source, main.object)
    return HsmBackend(P11KIT, uri, settings.issuer_key_type, so_pin=secrets.token_hex(8))


@pytest.fixture(scope="session")
def opencryptoki_backend(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> HsmBackend:
    """openCryptoki's software token (slot 3), re-initialised for this session, with an RSA issuer.

    Its token holds no EC or EdDSA mechanism (openCryptoki 3.8), so the issuer key is RSA.
    """
    require(OPENCRYPTOKI_MODULE is not None, "openCryptoki (Debian package opencryptoki)")
    assert OPENCRYPTOKI_MODULE is not None
    require(start_opencryptoki_daemon(), "openCryptoki's slot daemon pkcsslotd (needs root to start)")
    pin = f"{secrets.randbelow(10**8):08d}"
    pin_file = tmp_path_factory.mktemp("opencryptoki") / "pin"
    pin_file.write_text(pin + "\n")
    try:
        init_token(
            OPENCRYPTOKI_MODULE, OPENCRYPTOKI_TOKEN, so_pin=OPENCRYPTOKI_DEFAULT_SO_PIN, user_pin=pin, replace=True
        )
    except TokenNotFoundError:
        # Only a token these tests created is ever wiped: someone else's is left alone.
        pytest.fail(
            f"openCryptoki's software token (slot 3) holds a token not labelled {OPENCRYPTOKI_TOKEN!r}; "
            "the tests re-initialise only their own token",
            pytrace=False,
        )
    issuer = settings.pkcs11_uri.object
    uri = Pkcs11Uri(OPENCRYPTOKI_TOKEN, OPENCRYPTOKI_MODULE, issuer, pin_source=f"file:{pin_file}")
    keys = Pkcs11KeyManager(uri)
    try:
        keys.create_hmac_key(settings.hmac_key_label)
        assert issuer is not None
        keys.create_key(issuer, KeyKind.RSA_3072)
    finally:
        keys.close()
    return HsmBackend(OPENCRYPTOKI, uri, KeyKind.RSA_3072)


@pytest.fixture(scope="module")
def hsm_backend(request: pytest.FixtureRequest) -> HsmBackend:
    """The backend a parametrised HSM test runs against (softhsm, p11kit or opencryptoki)."""
    name = getattr(request, "param", SOFTHSM)
    backend = request.getfixturevalue(f"{name}_backend")
    assert isinstance(backend, HsmBackend)
    return backend
