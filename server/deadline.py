"""The caller's deadline, carried to the service layer without any transport type (a context variable).

The gRPC adapter sets it from the call's remaining time; the service checks it before work that must not
start for a caller who has given up (above all, the binding transaction).
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

from server.errors import DeadlineExceededError

_deadline: ContextVar[float | None] = ContextVar("keybinder_deadline", default=None)


def start(remaining_seconds: float | None) -> Token[float | None]:
    """Set the deadline ``remaining_seconds`` from now (None: the caller set none); reset with `reset`."""
    at = None if remaining_seconds is None else time.monotonic() + remaining_seconds
    return _deadline.set(at)


def reset(token: Token[float | None]) -> None:
    _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the caller's deadline (negative once passed); None without a deadline."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()


def check(before: str) -> None:
    """Raise DeadlineExceededError when the caller's deadline has passed: ``before`` says what is not started."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceededError(f"the caller's deadline passed before {before}; nothing was written")
