"""A throwaway pg_auto_failover cluster for the failover test: a monitor, a primary and a secondary with
synchronous replication and automatic promotion, on free ports in a temporary directory.

pg_autoctl refuses to run as root: as root every command runs as the postgres user (runuser), with its
XDG_* directories in the cluster's own directory and the PostgreSQL binaries on PATH. Each keeper runs in
a process group of its own, so that a node (keeper, postgres and its backends) can be SIGKILLed at once
and everything is gone after ``close()``, even when the test failed half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian's postgresql-15-auto-failover puts the extension's PostgreSQL.
PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Failure detection, tightened from pg_auto_failover's defaults (in milliseconds; the defaults in
#: brackets). The monitor checks each node's postgres every second and, once a check fails, retries once
#: after 500 ms; a primary whose checks fail and whose keeper has not reported for 3 s is failed over.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": 1000,  # [5000]
    "pgautofailover.health_check_timeout": 1000,  # [5000]
    "pgautofailover.health_check_max_retries": 1,  # [2]
    "pgautofailover.health_check_retry_delay": 500,  # [2000]
    "pgautofailover.node_considered_unhealthy_timeout": 3000,  # [20000]
    "pgautofailover.startup_grace_period": 2000,  # [10000]
    "pgautofailover.primary_demote_timeout": 5000,  # [30000]
}
#: The keepers' side (seconds): how long a primary cut off from the monitor and its standby waits
#: before it demotes itself, and how long the promoted standby waits for its WAL receiver to stop.
KEEPER_SETTINGS = {
    "timeout.network_partition_timeout": 3,  # [20] (below the monitor's primary_demote_timeout)
    "timeout.prepare_promotion_walreceiver": 2,  # [5]
    "timeout.prepare_promotion_catchup": 10,  # [30]
}


def available() -> bool:
    return shutil.which("pg_autoctl") is not None and (PG_BIN / "pg_ctl").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    name: str
    pgdata: Path
    port: int
    keeper: subprocess.Popen[bytes] | None = None

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        return None


@dataclass
class AutoFailoverCluster:
    root: Path
    monitor: Node = field(init=False)
    nodes: list[Node] = field(init=False)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o755)
        self.monitor = Node("monitor", self.root / "monitor", free_port())
        self.nodes = [Node(f"node{i}", self.root / f"node{i}", free_port()) for i in (1, 2)]

    # -- commands ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "XDG_"))}
        env |= {
            "PATH": f"{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "XDG_CONFIG_HOME": str(self.root / "xdg" / "config"),
            "XDG_DATA_HOME": str(self.root / "xdg" / "data"),
            "XDG_RUNTIME_DIR": str(self.root / "xdg" / "run"),
        }
        return env

    def argv(self, *args: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env().items() if k.startswith("XDG_") or k == "PATH"]
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        return [*prefix, "env", *env, "pg_autoctl", *args]

    def run(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
        return result.stdout

    def spawn(self, node: Node, *args: str) -> None:
        """Run a keeper (or the monitor) in the background, in its own process group."""
        logfile = (self.root / f"{node.name}.log").open("ab")
        node.keeper = subprocess.Popen(
            self.argv(*args),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        logfile.close()

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover?sslmode=disable"

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        xdg = self.root / "xdg"
        for name in ("config", "data", "run"):
            (xdg / name).mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            for path in (xdg, *xdg.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        m = self.monitor
        self.run(
            *("create", "monitor", "--pgdata", str(m.pgdata), "--pgport", str(m.port)),
            *("--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl"),
            timeout=120,
        )
        self.spawn(m, "run", "--pgdata", str(m.pgdata))
        self.wait_for(lambda: self._monitor_ready(), 120, "the monitor to accept connections")
        for name, value in MONITOR_SETTINGS.items():
            self.monitor_sql(f"ALTER SYSTEM SET {name} = {value}")
        self.monitor_sql("SELECT pg_reload_conf()")
        first, second = self.nodes
        self.create_node(first)
        self.wait_for(lambda: self.settled({"single"}), 180, f"{first.name} to start as a single node")
        self.create_node(second)
        self.wait_for(lambda: self.settled({"primary", "secondary"}), 180, f"{second.name} to join as secondary")

    def create_node(self, node: Node) -> None:
        # Created in the foreground (initdb, or pg_basebackup from the primary, and registration), then
        # given its timeouts before its keeper starts.
        self.run(
            *("create", "postgres", "--pgdata", str(node.pgdata), "--pgport", str(node.port)),
            *("--hostname", "127.0.0.1", "--name", node.name, "--auth", "trust", "--no-ssl"),
            *("--monitor", self.monitor_uri),
            timeout=240,
        )
        for name, value in KEEPER_SETTINGS.items():
            self.run("config", "set", "--pgdata", str(node.pgdata), name, str(value))
        self.spawn(node, "run", "--pgdata", str(node.pgdata))

    def _monitor_ready(self) -> bool:
        try:
            self.monitor_sql("SELECT 1")
        except RuntimeError:
            return False
        return True

    def monitor_sql(self, statement: str) -> str:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        target = ("-h", "127.0.0.1", "-p", str(self.monitor.port), "-U", "postgres", "-d", "pg_auto_failover")
        result = subprocess.run(
            [*prefix, str(PG_BIN / "psql"), "-X", "-At", *target, "-c", statement],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"monitor SQL failed: {result.stderr.strip()}")
        return result.stdout

    def states(self) -> dict[str, tuple[str, str]]:
        """Each node's (reported, assigned) state, from the monitor."""
        try:
            out = self.monitor_sql("SELECT nodename, reportedstate, goalstate FROM pgautofailover.node")
        except RuntimeError:
            return {}
        rows = [line.split("|") for line in out.splitlines() if line]
        return {name: (reported, goal) for name, reported, goal in rows}

    def settled(self, wanted: set[str]) -> bool:
        """Every node has reached the state assigned to it, and together they are in ``wanted``."""
        states = self.states()
        return all(r == g for r, g in states.values()) and {r for r, _ in states.values()} == wanted

    def state_of(self, node: Node) -> tuple[str, str]:
        return self.states().get(node.name, ("", ""))

    def primary(self) -> Node | None:
        states = self.states()
        for node in self.nodes:
            reported, goal = states.get(node.name, ("", ""))
            if reported == goal and reported in {"primary", "wait_primary", "single"}:
                return node
        return None

    def uri(self) -> str:
        """The client URI pg_auto_failover prints: every node, target_session_attrs=read-write."""
        return self.run("show", "uri", "--monitor", self.monitor_uri, "--formation", "default").strip()

    def kill(self, node: Node) -> None:
        """SIGKILL the node's keeper and its postgres (postmaster and backends): a machine gone."""
        pid = node.postmaster_pid()
        if node.keeper is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.keeper.pid, signal.SIGKILL)
            node.keeper.wait(10)
            node.keeper = None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Backends notice their postmaster's death at once; wait until none holds the port.
            self.wait_for(lambda: not _alive(pid), 10, f"{node.name}'s postmaster to die")

    def rejoin(self, node: Node) -> None:
        """Start the node's keeper again: it finds itself demoted and rejoins as a secondary."""
        self.spawn(node, "run", "--pgdata", str(node.pgdata))

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> float:
        """Poll until ``condition`` holds; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if condition():
                return time.monotonic() - start
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}; states {self.states()}")

    def close(self) -> None:
        """Stop every keeper and postgres of the cluster, then remove its directory."""
        members = [*self.nodes, self.monitor]
        for node in members:
            if node.keeper is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.keeper.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in members:
            if node.keeper is not None:
                try:
                    node.keeper.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.keeper.pid, signal.SIGKILL)
                    node.keeper.wait(10)
                node.keeper = None
        for node in members:  # a postgres its keeper did not take down
            pid = node.postmaster_pid()
            if pid is not None and _alive(pid) and _is_postgres(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _is_postgres(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() in {"postgres", "postmaster"}
    return False


@contextlib.contextmanager
def cluster() -> Iterator[AutoFailoverCluster]:
    """A started cluster, closed (every process stopped, the directory removed) whatever happens."""
    # Not under pytest's tmp dir: that is private to root (0700), and the cluster runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="kb-pgaf-"))
    c = AutoFailoverCluster(root)
    try:
        c.start()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


if __name__ == "__main__":  # `python -m tests.pgaf`: start a cluster, print its URI and states, stop it
    started = time.monotonic()
    with cluster() as c:
        print(f"up in {time.monotonic() - started:.1f} s: {c.uri()}")
        print(json.dumps(c.states()))
