"""The serving processes as an operator and an attacker meet them: one instance per address, workers that die
with their supervisor, a restart right after a loaded stop, owner-only files, one-line start-up errors."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import DEFAULT_TOKEN
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key
from tests.conftest import PG_ADMIN_URL, SOFTHSM_MODULE, fresh_database
from tests.test_cli import DEMO_ID, KEYBINDER, cli_env, make_data_dir, partner_md
from tests.test_durability import PEOPLE, OwnPostgres
from tests.test_durability import PIN as PG_PIN
from tests.test_durability import make_data_dir as pg_data_dir

DEMO_PIN = "590417"  # the PIN test_cli.make_data_dir gives DEMO_ID


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("process-data"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`keybinder serve` in a process group of its own (so a test can always clean the whole tree up)."""
    return subprocess.Popen(
        [*KEYBINDER, "serve", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env() | (env or {}),
        start_new_session=True,
    )


def listening(proc: subprocess.Popen[str]) -> int:
    """The port a started server announced; fails the test with its stderr when it did not start."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("keybinder listening on "):
        kill_tree(proc)
        pytest.fail(f"serve did not start: {line!r} {proc.communicate(timeout=10)[1][-3000:]}")
    return int(line.split()[3].rsplit(":", 1)[1])


def kill_tree(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def served(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = serve(data_dir, *args, env=env)
    try:
        yield proc, listening(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
        kill_tree(proc)  # anything left in the group (a worker that outlived its supervisor)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    found = []
    for child in out:
        with contextlib.suppress(OSError):
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                found.append(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (ss), whoever owns them."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def port_free(port: int) -> bool:
    """Nobody holds the port: a plain bind (no SO_REUSEPORT) succeeds."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_fails(data_dir: Path, *args: str, env: dict[str, str] | None = None, seconds: float = 90) -> list[str]:
    """Start a server that must refuse to start: it exits non-zero without announcing a port; returns the
    lines of its stderr (a server that starts anyway is stopped and fails the test)."""
    proc = serve(data_dir, *args, env=env)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if line.startswith("keybinder listening on "):
            pytest.fail(f"serve started although it must refuse to: {line.strip()!r}")
        proc.wait(seconds)
    finally:
        kill_tree(proc)
    assert proc.returncode not in (0, None)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    return err.strip().splitlines()


def health(port: int, timeout: float = 2.0) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
            )
        except grpc.RpcError:
            return -1


# -- item 15: workers die with their supervisor --------------------------------------------------


def test_workers_die_with_a_killed_supervisor_and_free_the_port(data_dir: Path) -> None:
    with served(data_dir, "--port", "0", "--workers", "2") as (proc, port):
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gone = wait_for(lambda: not any(alive(w) for w in workers), 5.0)
        survivors = [w for w in workers if alive(w)]
        assert gone, f"workers {survivors} outlived their supervisor"
        assert wait_for(lambda: port_free(port), 5.0), "the port is still held after the supervisor died"


# -- item 8: a second serve on an address already served is refused -------------------------------


@pytest.mark.parametrize(("first", "second"), [("2", "2"), ("1", "2"), ("2", "1"), ("1", "1")])
def test_a_second_serve_on_a_served_address_is_refused(data_dir: Path, first: str, second: str) -> None:
    port = free_port()
    with served(data_dir, "--port", str(port), "--workers", first) as (proc, _):
        before = listeners(port)
        lines = start_fails(data_dir, "--port", str(port), "--workers", second)
        assert len(lines) == 1, lines
        assert f"127.0.0.1:{port}" in lines[0]
        assert "in use" in lines[0]
        assert listeners(port) == before
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
        assert proc.poll() is None


# -- item 19: a restart right after a loaded server stops ------------------------------------------


def load_then_stop(proc: subprocess.Popen[str], port: int, data_dir: Path) -> int:
    """Calls, then idle connections still open when the server goes: the server closes them first, so its
    side of each lingers on the port (FIN-WAIT-2, then TIME_WAIT); returns how many lingered."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(20):
            pb_grpc.KeyBinderServiceStub(channel).GetSupportedChallengeFormats(
                pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=partner_md(data_dir), timeout=5
            )
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        return lingering(port)
    finally:
        for sock in idle:
            sock.close()


def lingering(port: int) -> int:
    """Connections of the port that are neither listening nor established (closing, TIME_WAIT)."""
    out = subprocess.run(
        ["ss", "-Htan", "exclude", "listening", "exclude", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


@pytest.mark.parametrize(("before", "after"), [("1", "2"), ("2", "1"), ("2", "2")])
def test_restart_right_after_a_loaded_stop_binds_the_port(data_dir: Path, before: str, after: str) -> None:
    port = free_port()
    with served(data_dir, "--port", str(port), "--workers", before) as (proc, _):
        assert load_then_stop(proc, port, data_dir) > 0, "the stopped server left no connection behind"
    with served(data_dir, "--port", str(port), "--workers", after) as (_, again):
        assert again == port
        assert health(port) == health_pb2.HealthCheckResponse.SERVING


# -- item 9: owner-only files, and secrets checked at start ----------------------------------------


def test_every_file_the_server_creates_is_owner_only(tmp_path: Path) -> None:
    fresh = make_data_dir(tmp_path / "data")
    with served(fresh, "--port", "0", "--workers", "1") as (_, port):
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
        created = [p for p in fresh.rglob("*") if p.is_file()]
        assert any(p.name == "keybinder.db" for p in created)
        loose = {str(p.relative_to(fresh)): oct(p.stat().st_mode & 0o777) for p in created if p.stat().st_mode & 0o077}
        assert not loose, f"readable by others: {loose}"


@pytest.mark.parametrize("secret", ["hsm-pin", "demo-partner.key", "keybinder.db"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_secret_readable_by_others_stops_the_start(data_dir: Path, secret: str, workers: str) -> None:
    path = data_dir / secret
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o644)
    try:
        lines = start_fails(data_dir, "--port", "0", "--workers", workers)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, "the operator's file is left as it was"
    finally:
        path.chmod(mode)
    assert len(lines) == 1, lines
    assert str(path) in lines[0]
    assert f"chmod 600 {path}" in lines[0]


# -- item 18: start-up errors are found before any worker starts, and said in one line -------------


def _hsm_uri(
    data_dir: Path, *, token: str = DEFAULT_TOKEN, module: str = SOFTHSM_MODULE, pin: Path | None = None
) -> str:
    pin_file = pin or data_dir / "hsm-pin"
    return f"pkcs11:token={token};object=keybinder-issuer?module-path={module}&pin-source=file:{pin_file}"


@dataclass(frozen=True)
class BadStart:
    """A broken set-up: environment for serve, an optional change to the data directory, the words expected."""

    env: Callable[[Path, Path], dict[str, str]]
    expected: str
    break_dir: Callable[[Path], Callable[[], None]] | None = None


def _wrong_pin(data_dir: Path, tmp: Path) -> dict[str, str]:
    wrong = tmp / "wrong-pin"
    wrong.write_text("not-the-pin\n")
    wrong.chmod(0o600)
    return {"KEYBINDER_HSM_URI": _hsm_uri(data_dir, pin=wrong)}


def _unmigrated_sqlite(data_dir: Path, tmp: Path) -> dict[str, str]:
    empty = tmp / "empty.db"
    sqlite3.connect(empty).close()
    empty.chmod(0o600)
    return {"KEYBINDER_DATABASE_URL": f"sqlite:///{empty}"}


def _move_tokens(data_dir: Path) -> Callable[[], None]:
    (data_dir / "tokens").rename(data_dir / "tokens.away")

    def restore() -> None:
        (data_dir / "tokens.away").rename(data_dir / "tokens")

    return restore


BAD_STARTS = {
    "wrong-pin": BadStart(_wrong_pin, "PIN"),
    "missing-module": BadStart(
        lambda d, t: {"KEYBINDER_HSM_URI": _hsm_uri(d, module="/nonexistent/libpkcs11.so")},
        "/nonexistent/libpkcs11.so does not exist",
    ),
    "missing-token": BadStart(lambda d, t: {"KEYBINDER_HSM_URI": _hsm_uri(d, token="no-such-token")}, "no-such-token"),
    "missing-pin-file": BadStart(lambda d, t: {"KEYBINDER_HSM_URI": _hsm_uri(d, pin=t / "no-pin-file")}, "no-pin-file"),
    "missing-token-directory": BadStart(lambda d, t: {}, "token directory", _move_tokens),
    "bad-database-scheme": BadStart(lambda d, t: {"KEYBINDER_DATABASE_URL": "mysql://db/kb"}, "sqlite:///path"),
    "missing-sqlite-file": BadStart(
        lambda d, t: {"KEYBINDER_DATABASE_URL": f"sqlite:///{t}/gone/keybinder.db"}, "run `keybinder init`"
    ),
    "unmigrated-sqlite": BadStart(_unmigrated_sqlite, "keybinder migrate"),
    "unreachable-postgres": BadStart(
        lambda d, t: {"KEYBINDER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/kb"},
        "cannot use the database",
    ),
    "missing-postgres-database": BadStart(
        lambda d, t: {"KEYBINDER_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/kb_no_such_database"},
        "kb_no_such_database",
    ),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_a_bad_start_is_one_line_and_a_non_zero_exit(data_dir: Path, tmp_path: Path, case: str, workers: str) -> None:
    bad = BAD_STARTS[case]
    restore = bad.break_dir(data_dir) if bad.break_dir is not None else None
    try:
        lines = start_fails(data_dir, "--port", "0", "--workers", workers, env=bad.env(data_dir, tmp_path), seconds=60)
    finally:
        if restore is not None:
            restore()
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(("error:", "configuration error:")), lines[0]
    assert bad.expected in lines[0], lines[0]
    assert "not-the-pin" not in lines[0]


def test_an_unmigrated_postgres_schema_is_refused(data_dir: Path) -> None:
    with fresh_database("kb_unmigrated") as url:
        lines = start_fails(data_dir, "--port", "0", "--workers", "2", env={"KEYBINDER_DATABASE_URL": url}, seconds=60)
    assert len(lines) == 1, "\n".join(lines)
    assert "keybinder migrate" in lines[0]


# -- item 3: a descriptor flood neither stops the server for long nor reaches the HSM ---------------

FLOOD_LIMIT = 256
SERVING = health_pb2.HealthCheckResponse.SERVING


def _low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_LIMIT, FLOOD_LIMIT))


def flood(port: int, count: int) -> list[socket.socket]:
    """``count`` idle TCP connections (no TLS, no bytes), as many as the server's backlog lets through."""
    opened = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(0.2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        opened.append(sock)
    return opened


def bind_once(port: int, data_dir: Path, timeout: float = 10) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        request = pb.DoKeyBindingRequest(
            individual_id=DEMO_ID,
            challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=DEMO_PIN)],
            public_key_jwk=new_wallet_key("ec-p256")[1],
            bind_auth_factor_type="WLA",
        )
        return str(stub.DoKeyBinding(request, metadata=partner_md(data_dir), timeout=timeout).thumbprint)


def _binds(port: int, data_dir: Path) -> bool:
    try:
        return bool(bind_once(port, data_dir, timeout=5))
    except grpc.RpcError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_descriptor_flood_passes_and_never_reaches_the_hsm(data_dir: Path, workers: str) -> None:
    proc = subprocess.Popen(
        [*KEYBINDER, "serve", "--data-dir", str(data_dir), "--port", "0", "--workers", workers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env() | {"KEYBINDER_HEALTH_PROBE_SECONDS": "0.3"},
        start_new_session=True,
        preexec_fn=_low_descriptor_limit,
    )
    sockets: list[socket.socket] = []
    try:
        port = listening(proc)
        assert bind_once(port, data_dir)
        steady = grpc.insecure_channel(f"127.0.0.1:{port}")  # a client connected before the flood
        steady_health = health_pb2_grpc.HealthStub(steady)
        assert steady_health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        started = time.monotonic()
        sockets = flood(port, FLOOD_LIMIT * int(workers) + 150)
        flooded = time.monotonic()
        # Its connection is not a victim: it is answered throughout.
        during = [steady_health.Check(health_pb2.HealthCheckRequest(), timeout=2).status for _ in range(10)]
        steady.close()
        assert during == [SERVING] * 10
        # The attacker keeps every connection open; the server must get back to serving by itself.
        recovered = wait_for(lambda: health(port, timeout=1) == health_pb2.HealthCheckResponse.SERVING, 60)
        recovery = time.monotonic() - flooded
        assert recovered, "health never answered SERVING again while the flood's connections stayed open"
        # With two workers a new connection may reach the other one, whose share of the flood is closed only
        # by its own handshake timeout: retry until every worker has recovered.
        assert wait_for(lambda: _binds(port, data_dir), 30), "the HSM session must still sign"
        print(
            f"\ndescriptor flood ({workers} worker(s), limit {FLOOD_LIMIT}): {len(sockets)} idle connections in "
            f"{flooded - started:.1f} s; health SERVING again {recovery:.1f} s after the flood"
        )
    finally:
        for sock in sockets:
            sock.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(40)
        kill_tree(proc)
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "NOT_SERVING" not in log, "the flood reached the HSM or the database"
    assert "generation 2" not in log, "the HSM session was re-opened"
    assert f"open-file limit {FLOOD_LIMIT}" in log


# -- item 13: SIGTERM drains the calls already sent ------------------------------------------------


def in_flight_then_sigterm(proc: subprocess.Popen[str], port: int, data_dir: Path, calls: int) -> list[str]:
    """Send ``calls`` bindings at once over several connections, SIGTERM the server while they are in flight,
    and return each call's outcome ("OK" or the status code's name)."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        keys = [new_wallet_key("ec-p256")[1] for _ in range(calls)]
        futures = [
            pb_grpc.KeyBinderServiceStub(channels[i % len(channels)]).DoKeyBinding.future(
                pb.DoKeyBindingRequest(
                    individual_id=DEMO_ID,
                    challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=DEMO_PIN)],
                    public_key_jwk=keys[i],
                    bind_auth_factor_type="WLA",
                ),
                metadata=partner_md(data_dir),
                timeout=30,
            )
            for i in range(calls)
        ]
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        outcomes = []
        for future in futures:
            try:
                future.result()
                outcomes.append("OK")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
        return outcomes
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_every_call_in_flight_finish(data_dir: Path, workers: str) -> None:
    with served(data_dir, "--port", "0", "--workers", workers) as (proc, port):
        outcomes = in_flight_then_sigterm(proc, port, data_dir, 64)
        assert proc.wait(30) == 0
    failed = {code: outcomes.count(code) for code in set(outcomes) - {"OK"}}
    assert not failed, f"{len(outcomes) - outcomes.count('OK')} of 64 calls in flight failed on SIGTERM: {failed}"


# -- item 14: every shutdown step is bounded, even with the database frozen -------------------------


@pytest.fixture
def frozen_postgres_cluster() -> Iterator[OwnPostgres]:
    """A throwaway PostgreSQL cluster of this test's own (never the shared one on 5432)."""
    root = Path(tempfile.mkdtemp(prefix="kb-frozen-pg-"))
    root.chmod(0o755)
    try:
        cluster = OwnPostgres(root)
        cluster.start()
        try:
            yield cluster
        finally:
            thaw(cluster)
            with contextlib.suppress(AssertionError):
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cluster_pids(cluster: OwnPostgres) -> list[int]:
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False)
    return [postmaster, *(int(p) for p in children.stdout.split())]


def freeze(cluster: OwnPostgres) -> None:
    for pid in cluster_pids(cluster):
        os.kill(pid, signal.SIGSTOP)


def thaw(cluster: OwnPostgres) -> None:
    with contextlib.suppress(OSError, ValueError):
        for pid in cluster_pids(cluster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_exits_within_the_grace_while_postgres_hangs(
    tmp_path: Path, frozen_postgres_cluster: OwnPostgres, workers: str
) -> None:
    own = pg_data_dir(tmp_path, frozen_postgres_cluster.url)
    grace = 2.0
    env = {
        "KEYBINDER_CONFIG": str(own / "keybinder.toml"),
        "KEYBINDER_SHUTDOWN_GRACE_SECONDS": str(grace),
        "KEYBINDER_HEALTH_PROBE_SECONDS": "0.5",
    }
    with served(own, "--port", "0", "--workers", workers, env=env) as (proc, port):
        metadata = partner_md(own)

        def bind(timeout: float) -> pb.DoKeyBindingResponse:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                request = pb.DoKeyBindingRequest(
                    individual_id=PEOPLE[0],
                    challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=PG_PIN)],
                    public_key_jwk=new_wallet_key("ec-p256")[1],
                    bind_auth_factor_type="WLA",
                )
                response: pb.DoKeyBindingResponse = pb_grpc.KeyBinderServiceStub(channel).DoKeyBinding(
                    request, metadata=metadata, timeout=timeout
                )
                return response

        assert bind(10).certificate
        freeze(frozen_postgres_cluster)
        hung = [threading.Thread(target=_ignore_rpc_error, args=(bind,), daemon=True) for _ in range(6)]
        for thread in hung:
            thread.start()
        time.sleep(1.5)  # the calls (and the health probe) are now waiting on the frozen database
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve --workers {workers} still running {grace + 15:.0f} s after SIGTERM (grace {grace} s)")
        took = time.monotonic() - started
        assert took < grace + 8, f"exit took {took:.1f} s with a {grace} s grace"
        assert proc.poll() is not None


def _ignore_rpc_error(call: Callable[[float], object]) -> None:
    with contextlib.suppress(grpc.RpcError):
        call(60)
