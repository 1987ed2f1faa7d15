"""The auth-factor plug-in contract: a challenge, what a factor is told about the attempt, and its Protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from server.domain import Identity
from server.ports import Clock, KeyedHasher

if TYPE_CHECKING:
    from server.policy import KbiField
    from server.ports import BindingLookup, KbiStore, OtpAttempts, ReplayCache
    from server.wla import TokenRules


@dataclass(frozen=True, slots=True)
class Challenge:
    auth_factor_type: str
    format: str
    challenge: str

    def __repr__(self) -> str:  # the answer itself (an OTP, a PIN, KBI answers) must never reach a log
        return f"Challenge({self.auth_factor_type}, {self.format}, <{len(self.challenge)} chars>)"


@dataclass(frozen=True, slots=True)
class Attempt:
    """Who a challenge claims to be, as the service has resolved it (identity None: unknown individual)."""

    identity: Identity | None
    individual_id: str
    id_hmac: bytes
    partner_id: str

    def __repr__(self) -> str:  # the raw individual ID stays out of logs
        return f"Attempt(partner_id={self.partner_id!r}, known={self.identity is not None})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A factor's answer: passed or not, and the OTP transaction to consume with the binding, if any."""

    passed: bool
    consumed_otp: str | None = None


PASSED = Verdict(True)
FAILED = Verdict(False)


class AuthFactor(Protocol):
    """One way of proving who one is. Built once per service from its ports; one module per factor.

    ``well_formed`` needs no secret and touches no port: it runs before any attempt is counted.
    ``verify`` checks the answer against the ports; it returns FAILED for a wrong answer (counted towards the
    lockout by the service) and raises only for a backend failure. It must compare in constant time and must
    never log or keep the answer.
    """

    @property
    def name(self) -> str:
        """The auth_factor_type, e.g. "OTP"."""
        ...

    @property
    def format(self) -> str:
        """Its challenge format as eSignet names it, e.g. "alpha-numeric"."""
        ...

    def well_formed(self, challenge: str) -> bool: ...

    def verify(self, attempt: Attempt, challenge: str) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class AuthContext:
    """The ports and settings factors are built from; each factor takes what it needs."""

    hasher: KeyedHasher
    clock: Clock
    otps: OtpAttempts
    bindings: BindingLookup
    replay: ReplayCache
    kbi_answers: KbiStore
    #: The WLA rules of a partner's profile (strict or esignet).
    wla_rules: Callable[[str], TokenRules]
    #: A test of a WLA token's sub for a request naming ``individual_id``: the ID or another of its aliases.
    same_individual: Callable[[str], Callable[[str], bool]]
    otp_length: int = 6
    kbi_fields: tuple[KbiField, ...] = ()
    kbi_individual_id_field: str = "individualId"
