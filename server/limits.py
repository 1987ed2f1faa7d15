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
    #: Failed challenges one partner may cause per minute, over all individuals (bounds PIN spraying) ...
    auth_failures_per_partner: RateRule = RateRule(120, 60)
    #: ... and every partner together (bounds spraying spread over partners).
    auth_failures_global: RateRule = RateRule(1_000, 60)
    #: GetBindingNonce calls of one partner per minute, and for one individual per window.
    nonces_per_partner: RateRule = RateRule(600, 60)
    nonces_per_individual: RateRule = RateRule(10, 600)


@dataclass(frozen=True, slots=True)
class Window:
    """A counter's state: when its window started (None: never) and how many events it holds."""

    start: datetime | None = None
    count: int = 0


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up, at least 1: a retry earlier would fail again."""
    return max(1, math.ceil((moment - now).total_seconds()))


#: Requests take their time before they queue for an individual's lock, so a request may find a window that
#: a slightly later request started: within this skew that window is the current one, not a future one.
WINDOW_SKEW_SECONDS = 60


def _current(window: Window, now: datetime, rule: RateRule) -> Window:
    """``window`` while it lasts, else a new, empty one starting now.

    The stores count OTP sends in one SQL statement with the same rule (see their SQL for send limits)."""
    if window.start is None or now >= window.start + rule.window:
        return Window(now, 0)
    if now < window.start - timedelta(seconds=WINDOW_SKEW_SECONDS):
        # A window far in the future (the clock stepped back) is as good as expired: nobody waits for it.
        return Window(now, 0)
    return window


@dataclass(frozen=True, slots=True)
class FailureState:
    """An individual's failed challenges in the current window, and the end of any lockout."""

    window: Window = field(default_factory=Window)
    locked_until: datetime | None = None

    def locked_at(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


@dataclass(frozen=True, slots=True)
class Reservation:
    """One challenge attempt counted before it is evaluated (see `reserve`).

    ``window_start`` is the failure window the attempt was counted in; ``refused_until`` is set (and nothing
    was counted) when the individual is locked out or every allowed attempt is taken by others in flight."""

    window_start: datetime | None = None
    refused_until: datetime | None = None


def reserve(state: FailureState, now: datetime, limits: Limits) -> tuple[FailureState, Reservation]:
    """Count an attempt as a failure *before* it is evaluated, if the limit leaves room for it.

    The check and the count are one step (the stores run this under the individual's lock), so however many
    requests race, at most ``auth_failures.limit`` attempts are evaluated per window: the ones beyond wait
    for the lockout (or the window) like any attempt after it. A success gives its reservation back
    (`release`); a failure keeps it (`after_reserved_failure`).
    """
    if state.locked_at(now):
        assert state.locked_until is not None
        return state, Reservation(refused_until=state.locked_until)
    rule = limits.auth_failures
    current = _current(state.window, now, rule)
    if current.count >= rule.limit:
        # Every attempt of this window is taken by requests still being evaluated (or by a process that
        # died evaluating one): nobody gets another guess before the window ends or they fail.
        assert current.start is not None
        return state, Reservation(refused_until=current.start + rule.window)
    window = Window(current.start, current.count + 1)
    return FailureState(window, state.locked_until), Reservation(window_start=current.start)


def after_reserved_failure(
    state: FailureState, now: datetime, limits: Limits, reservation: Reservation
) -> FailureState:
    """The state once a reserved attempt failed: it is counted already; the failure that finds the window
    full starts the lockout (once: a concurrent failure that finds the lockout started changes nothing)."""
    if state.locked_at(now):
        return state
    if reservation.window_start is None or state.window.start != reservation.window_start:
        return after_failure(state, now, limits)  # the window changed meanwhile: count it in the new one
    if state.window.count >= limits.auth_failures.limit:
        return FailureState(Window(), now + timedelta(seconds=limits.lockout_seconds))
    return state


def release(state: FailureState, reservation: Reservation) -> FailureState:
    """Give a successful attempt's reservation back (a success forgives no *failure*, and costs none)."""
    if reservation.window_start is None or state.window.start != reservation.window_start or state.window.count < 1:
        return state
    return FailureState(Window(state.window.start, state.window.count - 1), state.locked_until)


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


# -- budgets that are not an individual's (the stores keep them in limit_windows) ------------------------

#: limit_windows scopes, and the key of the budget every partner shares.
SCOPE_AUTH_FAILURES = "auth_failures"
SCOPE_NONCES = "nonces"
GLOBAL_KEY = "*"
#: The names a refusal carries (ErrorInfo metadata ``limit``, the refusal metric's label, the audit subject).
LIMIT_LOCKOUT = "individual_lockout"
LIMIT_PARTNER_FAILURES = "partner_auth_failures"
LIMIT_GLOBAL_FAILURES = "global_auth_failures"


def spent_until(window: Window, now: datetime, rule: RateRule) -> datetime | None:
    """The end of ``window`` when it holds ``rule.limit`` events already (nothing more is allowed), else None."""
    current = _current(window, now, rule)
    if current.count >= rule.limit:
        assert current.start is not None
        return current.start + rule.window
    return None


def budget_refusal(partner: Window, everyone: Window, now: datetime, limits: Limits) -> tuple[str, int] | None:
    """Which failure budget is spent, and the seconds until it refills; None when both have room."""
    for name, window, rule in (
        (LIMIT_PARTNER_FAILURES, partner, limits.auth_failures_per_partner),
        (LIMIT_GLOBAL_FAILURES, everyone, limits.auth_failures_global),
    ):
        until = spent_until(window, now, rule)
        if until is not None:
            return name, seconds_until(until, now)
    return None
