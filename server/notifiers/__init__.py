"""OTP delivery backends behind the `Notifier` port, and the router that picks one per channel."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from server.domain import OtpChannel, OtpMessage
from server.ports import DeliveryFailed, Notifier

#: Deliveries running at once per process; more wait their turn, within their own deadline.
DELIVERY_THREADS = 8


class SecretSourceError(ValueError):
    """A notifier secret's source is malformed, missing or empty (the message never holds the secret)."""


def read_secret(source: str, what: str) -> str:
    """Read a secret from ``file:/path`` (or a bare path) or ``env:NAME``, as the HSM PIN is read.

    Secrets never come from inline config or argv: a file (e.g. a mounted secret) or the environment.
    """
    if not source:
        raise SecretSourceError(f"no source for the {what}")
    if source.startswith("env:"):
        name = source[len("env:") :]
        value = os.environ.get(name, "")
        if not name or not value:
            raise SecretSourceError(f"the environment variable for the {what} ({name or '?'}) is not set")
        return value
    path = Path(source[len("file:") :] if source.startswith("file:") else source)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise SecretSourceError(f"cannot read the {what} file {path}: {err.strerror}") from err
    if not value:
        raise SecretSourceError(f"the {what} file {path} is empty")
    return value


def otp_text(message: OtpMessage, ttl_seconds: int) -> str:
    """The sentence a person reads: the code, how long it lasts, what to do if it was not them."""
    minutes = max(1, ttl_seconds // 60)
    return (
        f"Your wallet binding code is {message.otp}. It expires in {minutes} minute{'s' if minutes > 1 else ''}. "
        "If you did not ask to bind a wallet, ignore this message."
    )


class ChannelRouter:
    """`Notifier` sending each message through the backend configured for its channel."""

    def __init__(self, by_channel: Mapping[OtpChannel, Notifier]) -> None:
        missing = set(OtpChannel) - set(by_channel)
        if missing:
            raise ValueError(f"no notifier for channel(s) {sorted(c.value for c in missing)}")
        self._by_channel = dict(by_channel)

    def send(self, message: OtpMessage) -> None:
        self._by_channel[message.channel].send(message)


class DeadlineNotifier:
    """`Notifier` bounding each delivery by a total deadline, whatever the backend does meanwhile.

    The backend runs on a bounded pool of its own: a peer that accepts and never answers holds one of
    ``threads`` threads (until the backend's own timeouts end it), never the caller past ``deadline_seconds``,
    and never more threads than the pool has. A delivery that misses the deadline is a failure
    (``DeliveryFailed``: the OTP is discarded), even if the message reaches the person later.
    """

    def __init__(self, inner: Notifier, deadline_seconds: float, *, threads: int = DELIVERY_THREADS) -> None:
        if deadline_seconds <= 0:
            raise ValueError("the delivery deadline must be positive")
        self._inner = inner
        self.deadline_seconds = deadline_seconds
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="keybinder-notify")

    def send(self, message: OtpMessage) -> None:
        # The request context (server.logs) follows the delivery into its thread.
        future = self._pool.submit(contextvars.copy_context().run, self._inner.send, message)
        try:
            future.result(timeout=self.deadline_seconds)
        except FutureTimeout as err:
            future.cancel()  # still queued: never sent; running: its own timeouts end it
            raise DeliveryFailed(f"the delivery took longer than its deadline of {self.deadline_seconds:g} s") from err

    def close(self) -> None:
        """Drop queued deliveries; running ones end by their backend's timeouts (not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
