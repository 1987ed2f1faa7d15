"""TLS for the gRPC port: certificate files checked for changes on each new handshake, reloaded on SIGHUP."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class TlsConfigError(Exception):
    """The TLS set-up is unusable (unreadable or mismatched files, plaintext where it is not allowed)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class _Loaded:
    key_pem: bytes
    chain_pem: bytes
    client_ca_pem: bytes | None
    subject: str
    not_after: str


def _signature(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    """What identifies the files' current contents cheaply: (inode, size, mtime in ns) of each."""
    paths = [files.cert, files.key] + ([files.client_ca] if files.client_ca is not None else [])
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load(files: TlsFiles) -> _Loaded:
    """Read and check the files: the chain parses, the key is the certificate's, the CA bundle parses."""
    try:
        chain_pem = files.cert.read_bytes()
        key_pem = files.key.read_bytes()
        client_ca_pem = files.client_ca.read_bytes() if files.client_ca is not None else None
    except OSError as err:
        raise TlsConfigError(f"cannot read a TLS file: {err.strerror}: {err.filename}") from err
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as err:
        raise TlsConfigError(f"{files.cert} holds no PEM certificate") from err
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        # The message names the file only: the parser's own message could quote key material.
        raise TlsConfigError(f"{files.key} holds no unencrypted PEM private key") from err
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise TlsConfigError(f"the key in {files.key} does not belong to the certificate in {files.cert}")
    if client_ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(client_ca_pem)
        except ValueError as err:
            raise TlsConfigError(f"{files.client_ca} holds no PEM CA certificate") from err
    leaf = chain[0]
    return _Loaded(
        key_pem, chain_pem, client_ca_pem, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc.isoformat()
    )


def _configuration(loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key_pem, loaded.chain_pem)], loaded.client_ca_pem)


class ReloadingCredentials:
    """Server credentials whose certificate follows the files.

    gRPC asks ``fetch`` for a configuration before each new TLS handshake (from one of its own
    threads). It costs one ``stat`` per file when nothing changed; when a file changed (or after
    ``request_reload``, on SIGHUP) the files are read and checked, and a broken or half-written set
    (e.g. a new certificate whose key is not there yet) is refused with a warning: the server keeps
    its current certificate and tries again when the files change. Connections already open keep
    the certificate they were established with.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._force = False
        self._missing = False
        self.reloads = 0
        self._seen = _signature(files)
        self._current = load(files)
        log.info(
            "TLS: certificate %s (valid until %s)%s",
            self._current.subject,
            self._current.not_after,
            "; client certificates required (mTLS)" if files.client_ca is not None else "",
        )

    @property
    def subject(self) -> str:
        return self._current.subject

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._current),
            self.fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    def request_reload(self) -> None:
        """Reread the files at the next handshake even if they look unchanged (SIGHUP)."""
        with self._lock:
            self._force = True
        log.info("TLS: reload requested; the files are read at the next handshake")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and are valid; None keeps the current one."""
        try:
            with self._lock:
                try:
                    seen = _signature(self.files)
                except OSError as err:
                    if not self._missing:  # once per outage, not once per handshake
                        log.warning(
                            "TLS: cannot stat %s (%s); keeping the current certificate", err.filename, err.strerror
                        )
                        self._missing = True
                    return None
                self._missing = False
                if seen == self._seen and not self._force:
                    return None
                self._seen, self._force = seen, False
                try:
                    loaded = load(self.files)
                except TlsConfigError as err:
                    log.warning("TLS: not reloading: %s; keeping %s", err, self._current.subject)
                    return None
                self._current = loaded
                self.reloads += 1
            log.info("TLS: reloaded certificate %s (valid until %s)", loaded.subject, loaded.not_after)
            return _configuration(loaded)
        except Exception:  # an exception escaping into gRPC's core thread would fail the handshake
            log.exception("TLS: certificate reload failed; keeping the current one")
            return None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (so plaintext never leaves the machine)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_listen(host: str, *, tls: bool, allow_plaintext: bool) -> None:
    """Refuse plaintext on an address other machines can reach, unless explicitly allowed."""
    if tls or allow_plaintext or is_loopback(host):
        return
    raise TlsConfigError(
        f"refusing to serve plaintext on {host or '*'}: set tls_cert and tls_key (--tls-cert/--tls-key), "
        "or allow_plaintext (--allow-plaintext) behind a TLS-terminating proxy"
    )
