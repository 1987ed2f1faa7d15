"""Policy values and patterns: what the service accepts, read by the service, the settings and the stores alike.

Kept apart from `server.service` so that configuration and persistence code can name a policy
value without loading the service module (dependencies point down: see tests/test_layers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.limits import Limits
from server.wla import TokenRules

PARTNER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_INDIVIDUAL_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}"


@dataclass(frozen=True, slots=True)
class Policy:
    """Tunable behaviour of the service; every unit is in the name."""

    otp_ttl_seconds: int = 180
    otp_max_attempts: int = 3
    cert_validity_days: int = 365
    bind_auth_factor_types: frozenset[str] = frozenset({"WLA"})
    challenge_factors: frozenset[str] = frozenset({"OTP", "PIN", "WLA"})
    individual_id_pattern: str = DEFAULT_INDIVIDUAL_ID_PATTERN
    wla_audience: str = "keybinder"
    wla_skew_seconds: int = 30
    wla_max_lifetime_seconds: int = 300
    #: off / optional / required, per partner; partners not listed get the default.
    proof_of_possession: str = "optional"
    proof_of_possession_by_partner: tuple[tuple[str, str], ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Issuer key lifecycle (see server/issuers.py).
    issuer_rotation_window_days: int = 60
    #: How long a replica reuses the issuer list it read; a rotation reaches every replica within it.
    issuer_cache_seconds: float = 30.0

    def pop_mode(self, partner_id: str) -> str:
        return dict(self.proof_of_possession_by_partner).get(partner_id, self.proof_of_possession)

    @property
    def wla_rules(self) -> TokenRules:
        return TokenRules(self.wla_audience, self.wla_skew_seconds, self.wla_max_lifetime_seconds)
