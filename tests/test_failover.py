"""The database failing under load: a primary failover survived, and a frozen database.

KeyBinder on a pg_auto_failover cluster (monitor, primary, synchronous secondary; tests/pgaf.py): the
primary SIGKILLed under a binding load, then the old primary rejoined and the new one killed in turn.
Nothing acknowledged is lost, clients only ever see UNAVAILABLE while there is no writable primary, and the
server recovers without a restart. And a throwaway PostgreSQL frozen with SIGSTOP: health and the RPCs that
need no database keep answering (the reason service calls run on threads with PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key, read_otp
from server.stores.postgres import libpq_url
from tests import pgaf
from tests.conftest import SOFTHSM_MODULE, require
from tests.test_cli import kb_cli, partner_md
from tests.test_durability import PEOPLE as DURABILITY_PEOPLE
from tests.test_durability import OwnPostgres, make_data_dir, reason, start

PIN = "482913"
#: Individuals the load binds (PIN), and others that hold an OTP whose wrong guesses are counted.
PEOPLE = [f"{8200000000 + i}" for i in range(16)]
OTP_PEOPLE = [f"{8300000000 + i}" for i in range(4)]
#: The only failure a client may see while no primary is writable.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
#: Longest wait for the first acknowledged binding after a kill (the promotion takes ~10 s here).
RECOVERY_SECONDS = 90.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgaf.AutoFailoverCluster]:
    require(Path(SOFTHSM_MODULE).exists(), f"SoftHSM2 ({SOFTHSM_MODULE})")
    require(pgaf.available(), "pg_auto_failover (make failover-deps: postgresql-15-auto-failover and its CLI)")
    with pgaf.cluster() as c:
        yield c


def keybinder_url(uri: str) -> str:
    """pg_auto_failover's client URI (every node, target_session_attrs=read-write) as the postgres user, with
    a short connect timeout so that a dead node is passed over quickly."""
    scheme, rest = libpq_url(uri).split("://", 1)
    return f"{scheme}://postgres@{rest}&connect_timeout=2"


@dataclass
class Load:
    """Client threads binding fresh keys with PIN challenges, a bounded rate each (a pause between calls),
    recording what was acknowledged and when, and every failure."""

    port: int
    metadata: tuple[tuple[str, str], ...]
    people: list[str] = field(default_factory=lambda: PEOPLE)
    acknowledged: list[tuple[float, str, str]] = field(default_factory=list)
    #: When each acknowledged call was sent (same order as ``acknowledged``).
    sent: list[float] = field(default_factory=list)
    failures: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, index: int) -> None:
        n = 0
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            while not self.stop.is_set():
                person = self.people[(index * 5 + n) % len(self.people)]
                n += 1
                request = pb.DoKeyBindingRequest(
                    individual_id=person,
                    challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=PIN)],
                    public_key_jwk=new_wallet_key("ec-p256")[1],
                    bind_auth_factor_type="WLA",
                )
                began = time.monotonic()
                try:
                    response = stub.DoKeyBinding(request, metadata=self.metadata, timeout=15)
                except grpc.RpcError as err:
                    with self.lock:
                        self.failures.append((time.monotonic(), err.code(), reason(err)))
                    self.stop.wait(0.1)
                    continue
                with self.lock:
                    self.acknowledged.append((time.monotonic(), person, response.thumbprint))
                    self.sent.append(began)
                self.stop.wait(0.03)  # bounded: ~25 binds/s per thread at most

    def start(self, threads: int) -> None:
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def first_ack_after(self, moment: float) -> float | None:
        """When the first call sent after ``moment`` was acknowledged (a call committed just before it may be
        acknowledged just after it: that one says nothing about the time after)."""
        with self.lock:
            return next((t for (t, _, _), s in zip(self.acknowledged, self.sent, strict=True) if s > moment), None)

    def acks_after(self, moment: float) -> int:
        with self.lock:
            return sum(t > moment for t, _, _ in self.acknowledged)


@dataclass
class HealthWatch:
    """grpc.health.v1 Check every 100 ms, each answer (or failure to answer within 2 s) with its time."""

    port: int
    samples: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as err:
                    status = f"error:{err.code().name}"
                self.samples.append((time.monotonic(), status))
                self.stop.wait(0.1)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def between(self, start: float, end: float) -> set[str]:
        return {s for t, s in list(self.samples) if start <= t <= end}

    def latest(self) -> str:
        return self.samples[-1][1] if self.samples else ""


def wrong_otp_guesses(port: int, metadata: tuple[tuple[str, str], ...], transactions: dict[str, str]) -> None:
    """One wrong OTP answer per OTP individual: each must count one attempt (AUTH_FAILED to the caller)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        for person in transactions:
            request = pb.DoKeyBindingRequest(
                individual_id=person,
                challenges=[pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge="WRONG1")],
                public_key_jwk=new_wallet_key("ec-p256")[1],
                bind_auth_factor_type="WLA",
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.DoKeyBinding(request, metadata=metadata, timeout=15)
            assert reason(refused.value) == "auth_failed"


def otp_attempts(url: str, transactions: dict[str, str]) -> dict[str, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT transaction_id, attempts FROM otps WHERE transaction_id = ANY(%s)", (list(transactions.values()),)
        ).fetchall()
    by_transaction: dict[str, int] = {str(t): int(a) for t, a in rows}
    return {person: by_transaction.get(tid, -1) for person, tid in transactions.items()}


def check_database(url: str, acknowledged: list[tuple[float, str, str]]) -> int:
    """Every acknowledged binding is there, and each individual/partner/factor with bindings has exactly one
    active; returns the number of bindings stored."""
    with psycopg.connect(libpq_url(url)) as conn:
        stored = {r[0] for r in conn.execute("SELECT cert_thumbprint FROM bindings")}
        not_one = conn.execute(
            "SELECT id_hmac, count(*) FILTER (WHERE status = 'active') FROM bindings"
            " GROUP BY id_hmac, partner_id, auth_factor_type HAVING count(*) FILTER (WHERE status = 'active') <> 1"
        ).fetchall()
    missing = [t for _, _, t in acknowledged if t not in stored]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged bindings lost"
    assert not not_one, f"individuals without exactly one active binding: {not_one[:5]}"
    return len(stored)


def survive_failover(
    cluster: pgaf.AutoFailoverCluster, load: Load, health: HealthWatch, round_: int
) -> dict[str, float]:
    """SIGKILL the primary (keeper and postgres) under load; returns the kill-to-promotion and
    kill-to-first-acknowledged-binding times."""
    victim = cluster.primary()
    assert victim is not None, cluster.states()
    survivor = next(n for n in cluster.nodes if n is not victim)
    assert cluster.state_of(survivor) == ("secondary", "secondary")
    killed = time.monotonic()
    cluster.kill(victim)
    to_promotion = cluster.wait_for(
        lambda: cluster.state_of(survivor)[0] in {"wait_primary", "primary"}, RECOVERY_SECONDS, "the promotion"
    )
    cluster.wait_for(lambda: load.first_ack_after(killed) is not None, RECOVERY_SECONDS, "a binding after the kill")
    first = load.first_ack_after(killed)
    assert first is not None
    # While nothing was writable the server said so (and kept answering); once binds succeed it serves.
    cluster.wait_for(lambda: health.latest() == "SERVING", 30, "health SERVING again")
    outage = health.between(killed, first)
    assert "NOT_SERVING" in outage, f"health during the outage: {outage}"
    assert not {s for s in outage if s.startswith("error")}, "health stopped answering"
    return {
        "round": round_,
        "kill_to_promoted_s": round(to_promotion, 1),
        "kill_to_first_bind_s": round(first - killed, 1),
    }


def rejoin_old_primary(cluster: pgaf.AutoFailoverCluster, load: Load) -> float:
    """Start the killed node again: it rejoins as the new primary's synchronous secondary. Returns seconds."""
    victim, survivor = sorted(cluster.nodes, key=lambda n: n is cluster.primary())
    started = time.monotonic()
    cluster.rejoin(victim)
    cluster.wait_for(
        lambda: (
            cluster.state_of(victim) == ("secondary", "secondary")
            and cluster.state_of(survivor) == ("primary", "primary")
        ),
        RECOVERY_SECONDS,
        f"{victim.name} to rejoin as secondary",
    )
    took = time.monotonic() - started
    cluster.wait_for(lambda: load.acks_after(started) > 0, 30, "binds with the secondary back")
    return round(took, 1)


def test_primary_failover_and_back_under_load(
    cluster: pgaf.AutoFailoverCluster, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    url = keybinder_url(cluster.uri())
    data_dir = tmp_path
    (data_dir / "keybinder.toml").write_text(f'database_url = "{url}"\n')
    initialised = kb_cli("init", "--demo-partner", "--config", str(data_dir / "keybinder.toml"), data_dir=data_dir)
    assert initialised.returncode == 0, initialised.stderr
    people = [{"individual_id": p, "pin": PIN} for p in PEOPLE]
    people += [{"individual_id": p, "email": f"{p}@example.org"} for p in OTP_PEOPLE]
    (data_dir / "people.json").write_text(json.dumps(people))
    config = ("--config", str(data_dir / "keybinder.toml"))
    imported = kb_cli("identities", "import", str(data_dir / "people.json"), *config, data_dir=data_dir)
    assert imported.returncode == 0, imported.stderr

    proc, port = start(data_dir, workers=1)
    md = partner_md(data_dir)
    load = Load(port, md)
    health = HealthWatch(port)
    timings: list[dict[str, float]] = []
    try:
        # OTPs outstanding through both failovers, each with wrong guesses counted before, between and after.
        transactions: dict[str, str] = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KeyBinderServiceStub(channel)
            for person in OTP_PEOPLE:
                sent = stub.SendBindingOtp(
                    pb.SendBindingOtpRequest(individual_id=person, otp_channels=["email"]), metadata=md, timeout=15
                )
                read_otp(data_dir / "outbox.jsonl", sent.transaction_id)
                transactions[person] = sent.transaction_id
        wrong_otp_guesses(port, md, transactions)
        expected_attempts = 1

        health.start()
        load.start(3)
        cluster.wait_for(lambda: load.acks_after(0) >= 30, 60, "the load to get going")
        assert health.latest() == "SERVING"

        for round_ in (1, 2):
            timings.append(survive_failover(cluster, load, health, round_))
            # Every acknowledged OTP attempt survived the switch, and attempts count on the new primary.
            assert otp_attempts(url, transactions) == dict.fromkeys(OTP_PEOPLE, expected_attempts)
            wrong_otp_guesses(port, md, transactions)
            expected_attempts += 1
            timings[-1]["rejoin_s"] = rejoin_old_primary(cluster, load)
    finally:
        load.finish()
        health.finish()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    record_property("failover_timings", json.dumps(timings))
    print(f"failover timings: {timings}")
    assert load.failures, "the outages were not noticed"
    unexpected = [(code, why) for _, code, why in load.failures if (code, why) != RETRYABLE]
    assert not unexpected, f"failures other than UNAVAILABLE/key_binding_failed: {unexpected[:5]}"
    stored = check_database(url, load.acknowledged)
    assert stored >= len(load.acknowledged) >= 60
    assert otp_attempts(url, transactions) == dict.fromkeys(OTP_PEOPLE, expected_attempts)
    verified = kb_cli("audit", "verify", *config, data_dir=data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- a stalled database stalls neither health nor the RPCs that do not need it ---------------------


@pytest.fixture
def frozen_postgres_data_dir(tmp_path: Path) -> Iterator[tuple[OwnPostgres, Path]]:
    root = Path(tempfile.mkdtemp(prefix="kb-frozen-pg-"))
    root.chmod(0o755)
    cluster: OwnPostgres | None = None
    try:
        cluster = OwnPostgres(root)
        cluster.start()
        yield cluster, make_data_dir(tmp_path, cluster.url)
    finally:
        if cluster is not None:
            freeze(cluster, signal.SIGCONT)  # whatever happened, let it stop
            with contextlib.suppress(AssertionError):
                cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def cluster_pids(cluster: OwnPostgres) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, WAL writer…)."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent(int(entry.name)) == postmaster
    ]
    return [postmaster, *children]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def freeze(cluster: OwnPostgres, sig: signal.Signals) -> None:
    for pid in cluster_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def test_frozen_database_does_not_stall_health_or_other_rpcs(
    frozen_postgres_data_dir: tuple[OwnPostgres, Path],
) -> None:
    """Every PostgreSQL process SIGSTOPped (a database that accepts packets and never answers): the calls
    that need it wait on the RPC threads, while health and GetSupportedChallengeFormats answer at once."""
    cluster, data_dir = frozen_postgres_data_dir
    proc, port = start(data_dir, workers=1)
    md = partner_md(data_dir)
    load = Load(port, md, DURABILITY_PEOPLE)  # the individuals make_data_dir imported
    try:
        load.start(2)
        cluster_wait(lambda: load.acks_after(0) >= 10, 30, "binds before the freeze")
        freeze(cluster, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # the load's calls are now stuck in the database
            # A binding that committed just before the freeze may be acknowledged just after it: count from
            # here, when every answer from before the freeze has arrived.
            frozen = time.monotonic()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                stub = pb_grpc.KeyBinderServiceStub(channel)
                slowest = 0.0
                for _ in range(10):
                    began = time.monotonic()
                    health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    stub.GetSupportedChallengeFormats(
                        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=md, timeout=5
                    )
                    slowest = max(slowest, time.monotonic() - began)
                    time.sleep(0.2)
            # Well below the pool's wait (5 s), which is what a call stuck behind the database would take.
            assert slowest < 1.0, f"health + GetSupportedChallengeFormats took {slowest:.2f} s with the database frozen"
            assert load.acks_after(frozen) == 0, "binds went through a frozen database"
        finally:
            freeze(cluster, signal.SIGCONT)
        thawed = time.monotonic()
        cluster_wait(lambda: load.acks_after(thawed) >= 10, 30, "binds after the thaw")
    finally:
        load.finish()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    unexpected = [(code, why) for _, code, why in load.failures if (code, why) != RETRYABLE]
    assert not unexpected, f"failures other than UNAVAILABLE/key_binding_failed: {unexpected[:5]}"


def cluster_wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)
