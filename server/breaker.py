"""A circuit breaker for the database: answer UNAVAILABLE at once while the database is known to be down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: How long an open breaker refuses everything before it lets one request through to try the database.
COOLDOWN_SECONDS = 1.0


class CircuitBreaker:
    """Closed: requests go to the database. Open: they are refused without waiting for it.

    The health probe feeds it: a failed (or hung) database check opens it, a good one closes it. While open,
    one request per ``cooldown_seconds`` is let through as a trial, and the breaker closes as soon as anything
    — that trial or the probe — has reached the database again. Requests do not open it: one request's
    failure (a lock timeout, a conflict) says nothing about the database as a whole.
    """

    def __init__(self, *, cooldown_seconds: float = COOLDOWN_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._cause = ""

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def cause(self) -> str:
        return self._cause

    def refusing(self) -> bool:
        """Open and within its cooldown (no trial due): what the transport checks before queueing a request."""
        opened = self._opened_at
        return opened is not None and self._clock() - opened < self._cooldown

    def allow(self) -> bool:
        """May a request use the database now? (True when closed, or as the trial of an open breaker.)"""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if now - self._opened_at >= self._cooldown:
                self._opened_at = now  # this request is the trial; the others wait another cooldown
                return True
            return False

    def failed(self, cause: str) -> None:
        """The database could not be reached: open (or keep open)."""
        with self._lock:
            self._opened_at = self._clock()
            self._cause = cause

    def succeeded(self) -> None:
        """The database answered: close."""
        if self._opened_at is not None:
            with self._lock:
                self._opened_at = None
                self._cause = ""
