"""Abuse limits: fixed-window counters for OTP sends and failed challenges, and the lockout they lead to.

The rules here are pure functions of a stored state and the time; the stores keep the state in the
database (so every replica sees the same counters) and apply these functions inside their transactions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class RateRule:
    """At most ``limit`` events per fixed window of ``window_seconds``, starting at the window's first event."""

    limit: int
    window_seconds: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_seconds < 1:
            raise ValueError("a rate rule needs a limit and a window of at least 1")

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_seconds)


@dataclass(frozen=True, slots=True)
class Limits:
    """The configurable abuse limits (the defaults are the issue's examples)."""

    #: OTPs issued to one individual, whichever partner asks.
    otp_sends_per_individual: RateRule = RateRule(3, 600)
    #: SendBindingOtp calls of one partner per minute, known individuals or not: bounds ID probing.
    otp_sends_per_partner: RateRule = RateRule(600, 60)
    #: Failed challenges of one individual before a lockout.
    auth_failures: RateRule = RateRule(5, 900)
    lockout_seconds: int = 900


@dataclass(frozen=True, slots=True)
class Window:
    """A counter's state: when its window started (None: never) and how many events it holds."""

    start: datetime | None = None
    count: int = 0


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up, at least 1: a retry earlier would fail again."""
    return max(1, math.ceil((moment - now).total_seconds()))


def _current(window: Window, now: datetime, rule: RateRule) -> Window:
    """``window`` while it lasts, else a new, empty one starting now.

    The stores count OTP sends in one SQL statement with the same rule (see their SQL for send limits)."""
    if window.start is None or now >= window.start + rule.window or now < window.start:
        # A window in the future (the clock stepped back) is as good as expired: nobody waits for it.
        return Window(now, 0)
    return window


@dataclass(frozen=True, slots=True)
class FailureState:
    """An individual's failed challenges in the current window, and the end of any lockout."""

    window: Window = field(default_factory=Window)
    locked_until: datetime | None = None

    def locked_at(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


def after_failure(state: FailureState, now: datetime, limits: Limits) -> FailureState:
    """The state after one more failed challenge; the failure that reaches the limit starts a lockout.

    The lockout starts a fresh window, so after it the individual has the full number of attempts again.
    A success changes nothing here: it neither ends a lockout early nor forgives earlier failures (they
    expire with their window).
    """
    rule = limits.auth_failures
    current = _current(state.window, now, rule)
    window = Window(current.start, current.count + 1)
    if window.count >= rule.limit:
        return FailureState(Window(), now + timedelta(seconds=limits.lockout_seconds))
    return FailureState(window, state.locked_until)
