"""Process-level hardening of `keybinder serve`: file modes, descriptor limit, the listen address, parent death."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: Files are created owner-only: the data directory holds PINs, keys, the database and live OTPs.
UMASK = 0o077
#: prctl(2) option: the signal this process gets when the thread that created it exits.
PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    """The server must not start; the message is the one line the operator reads (what, and what to do)."""


def owner_only_files() -> None:
    """Every file and directory this process creates from now on is readable by its owner only."""
    os.umask(UMASK)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret that others may read (or write); a missing file is left to whoever reads it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartupError(f"cannot check the mode of the {what} {path}: {err.strerror}") from err
    if mode & 0o077:
        raise StartupError(
            f"the {what} {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}` and start again"
        )


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the limit now in force (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:  # e.g. a container forbidding it: keep the soft limit, say so
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, err)
    log.info("open-file limit %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return int(soft)


def descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_address_free(host: str, port: int, *, what: str = "listen") -> None:
    """Refuse an address someone already serves (another keybinder with SO_REUSEPORT included).

    A plain bind (SO_REUSEADDR only, so connections of a stopped server in TIME_WAIT do not count) fails
    on any socket bound to the port, whatever options it has: exactly "served by anything else".
    """
    if port == 0:
        return
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise StartupError(address_error(host, port, err, what=what)) from err
    finally:
        sock.close()


def address_error(host: str, port: int, err: OSError, *, what: str = "listen") -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"cannot {what} on {where}: {err.strerror or err} (address in use by another server, or not available)"


def reserve_address(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (without listening) the address this instance's workers will share, and keep it.

    Bound first without SO_REUSEPORT, so that the bind fails if anything else holds the port (a second
    `keybinder serve` included); only then is SO_REUSEPORT set, letting our own workers join. With
    SO_REUSEADDR, a restart is not blocked by the previous server's connections in TIME_WAIT. Port 0
    resolves here, once, for every worker.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as err:
        sock.close()
        raise StartupError(address_error(host, port, err)) from err
    return sock, int(sock.getsockname()[1])


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (even by SIGKILL): a worker must not serve on,
    unsupervised, with settings nobody runs any more. SIGTERM drains as on any stop."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
