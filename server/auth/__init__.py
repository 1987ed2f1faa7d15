"""Auth factors as plug-ins: one module per factor behind `AuthFactor`, and the registry that names them.

Adding a factor is one module here, one line in ``REGISTRY`` and whatever enrolment storage it needs; which
factors a deployment accepts (``challenge_factors``) and which combinations bind (``challenge_rules``) are
settings. See docs/auth-factors.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

from server.auth import kbi, otp, pin, wla
from server.auth.base import Attempt, AuthContext, AuthFactor, Challenge, Verdict
from server.errors import (
    InvalidAuthFactorTypeError,
    InvalidChallengeError,
    InvalidChallengeFormatError,
    InvalidNoOfChallengesError,
)
from server.policy import DEFAULT_CHALLENGE_FACTORS, DEFAULT_CHALLENGE_RULES, DEFAULT_INDIVIDUAL_ID_FIELD, KbiField

__all__ = [
    "DEFAULT_CHALLENGE_FACTORS",
    "DEFAULT_CHALLENGE_RULES",
    "MAX_CHALLENGES",
    "REGISTRY",
    "Attempt",
    "AuthContext",
    "AuthFactor",
    "Challenge",
    "Factors",
    "Verdict",
    "check_factor_settings",
]

MAX_CHALLENGES = 5

#: Every factor this build can verify: name → how to build it from the ports. One line per factor module.
REGISTRY: dict[str, Callable[[AuthContext], AuthFactor]] = {
    otp.NAME: otp.build,
    pin.NAME: pin.build,
    wla.NAME: wla.build,
    kbi.NAME: kbi.build,
}


def check_factor_settings(
    factors: Collection[str],
    rules: Collection[Collection[str]],
    *,
    kbi_fields: Sequence[KbiField] = (),
    kbi_individual_id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD,
) -> None:
    """ValueError, saying what to change, when the settings name a factor this build lacks, or no rule can be met."""
    unknown = sorted(set(factors) - set(REGISTRY))
    if unknown:
        raise ValueError(f"challenge_factors: unknown factor(s) {unknown}; available: {sorted(REGISTRY)}")
    if not factors:
        raise ValueError("challenge_factors: at least one factor is required")
    if not rules:
        raise ValueError("challenge_rules: at least one combination is required")
    for rule in rules:
        if not rule:
            raise ValueError("challenge_rules: an empty combination would bind without any challenge")
        unknown = sorted(set(rule) - set(REGISTRY))
        if unknown:
            raise ValueError(f"challenge_rules: unknown factor(s) {unknown}; available: {sorted(REGISTRY)}")
        if len(rule) > MAX_CHALLENGES:
            raise ValueError(f"challenge_rules: {sorted(rule)} needs more than {MAX_CHALLENGES} challenges")
    # A rule naming a factor that is not enabled is simply never met; at least one must be possible.
    if not any(set(rule) <= set(factors) for rule in rules):
        raise ValueError(
            f"challenge_rules: no combination can be met with challenge_factors {sorted(factors)}; nothing could bind"
        )
    if kbi.NAME in factors and not kbi.answer_fields(kbi_fields, kbi_individual_id_field):
        raise ValueError("challenge_factors includes KBI: configure kbi_fields (the questions it asks)")
    kbi.check_fields(kbi_fields, kbi_individual_id_field)


class Factors(Mapping[str, AuthFactor]):
    """The factors one deployment accepts, built from the registry, and the rules for combining them."""

    def __init__(
        self,
        ctx: AuthContext,
        enabled: Collection[str],
        rules: Collection[Collection[str]],
        registry: Mapping[str, Callable[[AuthContext], AuthFactor]] | None = None,
    ) -> None:
        registry = REGISTRY if registry is None else registry
        # A factor whose module is not registered is simply not offered (its challenges are refused).
        self._factors = {name: registry[name](ctx) for name in enabled if name in registry}
        self.rules = tuple(frozenset(r) for r in rules if set(r) <= set(self._factors))

    def __getitem__(self, name: str) -> AuthFactor:
        return self._factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def supported_formats(self, factor: str) -> list[str]:
        """Formats for ``factor`` if the server can verify it, else an empty list."""
        found = self._factors.get(factor)
        return [found.format] if found is not None else []

    def validate(self, challenges: Sequence[Challenge]) -> None:
        """Check count, factor, format and shape of every challenge, and that together they may bind, before any
        is verified (nothing here touches a secret or counts an attempt)."""
        if not 1 <= len(challenges) <= MAX_CHALLENGES:
            raise InvalidNoOfChallengesError(f"between 1 and {MAX_CHALLENGES} challenges are required")
        seen: set[str] = set()
        for index, ch in enumerate(challenges):
            where = {"challenge_index": str(index)}
            factor = self._factors.get(ch.auth_factor_type)
            if factor is None:
                raise InvalidAuthFactorTypeError(
                    f"challenge {index}: unsupported auth factor type; supported: {sorted(self._factors)}",
                    metadata=where,
                )
            if ch.format != factor.format:
                raise InvalidChallengeFormatError(
                    f"challenge {index}: format for {ch.auth_factor_type} must be {factor.format!r}",
                    metadata=where,
                )
            if not factor.well_formed(ch.challenge):
                raise InvalidChallengeError(
                    f"challenge {index}: malformed {ch.auth_factor_type} challenge", metadata=where
                )
            if ch.auth_factor_type in seen:
                raise InvalidChallengeError(
                    f"challenge {index}: {ch.auth_factor_type} given more than once", metadata=where
                )
            seen.add(ch.auth_factor_type)
        if not any(rule <= seen for rule in self.rules):
            accepted = " or ".join("+".join(sorted(r)) for r in self.rules) or "none"
            raise InvalidAuthFactorTypeError(
                f"the factors {sorted(seen)} do not suffice together; a binding needs {accepted}"
            )
