"""Policy values and patterns: what the service accepts, read by the service, the settings and the stores alike.

Kept apart from `server.service` so that configuration and persistence code can name a policy
value without loading the service module (dependencies point down: see tests/test_layers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from server.keyprofiles import PROFILES
from server.limits import Limits
from server.wla import TokenRules

PARTNER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_INDIVIDUAL_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}"
#: Every wallet key type KeyBinder accepts, by the name the settings use (the rows of server/keyprofiles.py).
KEY_TYPES: tuple[str, ...] = tuple(p.name for p in PROFILES)
#: OTPs of digits by default: Inji's OTP box takes digits only (server/otp.py).
DEFAULT_OTP_ALPHABET = "digits"
DEFAULT_OTP_LENGTH = 6


#: KBI is not on by default: it needs kbi_fields configured and every individual's attributes enrolled.
DEFAULT_CHALLENGE_FACTORS: tuple[str, ...] = ("OTP", "PIN", "WLA")
#: A request binds when its factors include every factor of one rule: OTP, PIN or WLA each suffice; KBI (and any
#: factor in no rule) only adds to them.
DEFAULT_CHALLENGE_RULES: tuple[frozenset[str], ...] = (frozenset({"OTP"}), frozenset({"PIN"}), frozenset({"WLA"}))
#: eSignet's ``kbi.individual-id-field``: a field-details entry (and challenge key) that is the ID, not an answer.
DEFAULT_INDIVIDUAL_ID_FIELD = "individualId"
_FIELD_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: The Java date-pattern letters eSignet's field-details use, and their strptime equivalents.
_DATE_TOKENS = {"yyyy": "%Y", "MM": "%m", "dd": "%d"}
_DATE_PATTERN = re.compile(r"yyyy|MM|dd|[-/. ]")


@dataclass(frozen=True, slots=True)
class KbiField:
    """One configured question: its id in the answers object, its type and (for dates) its format."""

    id: str
    type: Literal["text", "date"] = "text"
    format: str = ""

    def __post_init__(self) -> None:
        if not _FIELD_ID.fullmatch(self.id):
            raise ValueError(f"KBI field id {self.id!r}: a letter, then up to 63 letters, digits, _ . -")
        if self.type == "date":
            strptime_format(self.format or "yyyy-MM-dd")

    @property
    def date_format(self) -> str:
        return strptime_format(self.format or "yyyy-MM-dd")


def strptime_format(java_pattern: str) -> str:
    """``yyyy-MM-dd`` → ``%Y-%m-%d``; only day, month, four-digit year and - / . space separators."""
    tokens = _DATE_PATTERN.findall(java_pattern)
    if "".join(tokens) != java_pattern or sorted(t for t in tokens if t in _DATE_TOKENS) != ["MM", "dd", "yyyy"]:
        raise ValueError(
            f"KBI date format {java_pattern!r}: use yyyy, MM and dd once each, separated by - / . or space"
        )
    return "".join(_DATE_TOKENS.get(t, t) for t in tokens)


@dataclass(frozen=True, slots=True)
class Policy:
    """Tunable behaviour of the service; every unit is in the name."""

    otp_ttl_seconds: int = 180
    otp_max_attempts: int = 3
    #: digits (what Inji's OTP box accepts) or alphanumeric (A-Z0-9), `otp_length` characters.
    otp_alphabet: str = DEFAULT_OTP_ALPHABET
    otp_length: int = DEFAULT_OTP_LENGTH
    cert_validity_days: int = 365
    bind_auth_factor_types: frozenset[str] = frozenset({"WLA"})
    challenge_factors: frozenset[str] = frozenset(DEFAULT_CHALLENGE_FACTORS)
    #: Combinations that bind: a request's factors must include one of them (server/auth).
    challenge_rules: tuple[frozenset[str], ...] = DEFAULT_CHALLENGE_RULES
    #: The KBI questions, as eSignet's kbi.field-details.
    kbi_fields: tuple[KbiField, ...] = ()
    #: The field that carries the individual ID, not an answer (eSignet's kbi.individual-id-field).
    kbi_individual_id_field: str = DEFAULT_INDIVIDUAL_ID_FIELD
    individual_id_pattern: str = DEFAULT_INDIVIDUAL_ID_PATTERN
    wla_audience: str = "keybinder"
    wla_skew_seconds: int = 30
    wla_max_lifetime_seconds: int = 300
    #: strict / esignet, per partner; partners not listed get the default (see docs/esignet.md).
    wla_profile: str = "strict"
    wla_profile_by_partner: tuple[tuple[str, str], ...] = ()
    #: The esignet profile's rules: eSignet's `mosip.esignet.binding.audience-id` default, Nimbus's default
    #: clock skew, and Inji's token lifetime (exp = iat + 18000) as the cap.
    wla_esignet_audience: str = "esignet-binding"
    wla_esignet_skew_seconds: int = 60
    wla_esignet_max_lifetime_seconds: int = 18000
    #: Wallet key types a partner may bind (KEY_TYPES names); partners not listed get the default.
    allowed_key_types: frozenset[str] = frozenset(KEY_TYPES)
    allowed_key_types_by_partner: tuple[tuple[str, frozenset[str]], ...] = ()
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
        """The strict profile's rules."""
        return TokenRules(self.wla_audience, self.wla_skew_seconds, self.wla_max_lifetime_seconds)

    def wla_profile_of(self, partner_id: str) -> str:
        return dict(self.wla_profile_by_partner).get(partner_id, self.wla_profile)

    def wla_rules_for(self, partner_id: str, audience: str = "") -> TokenRules:
        """The partner's profile's rules; ``audience`` (a request's expected audience) replaces its default."""
        if self.wla_profile_of(partner_id) == "esignet":
            return TokenRules(
                audience or self.wla_esignet_audience,
                self.wla_esignet_skew_seconds,
                self.wla_esignet_max_lifetime_seconds,
                require_jti=False,
                required_text_claims=("iss",),
            )
        return TokenRules(audience or self.wla_audience, self.wla_skew_seconds, self.wla_max_lifetime_seconds)

    def key_types_for(self, partner_id: str) -> frozenset[str]:
        return dict(self.allowed_key_types_by_partner).get(partner_id, self.allowed_key_types)
