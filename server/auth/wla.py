"""WLA: a token signed by the individual's currently bound wallet key (Wallet Local Authentication)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from server.audit import AuditEvent
from server.auth.base import FAILED, PASSED, Attempt, AuthContext, Verdict
from server.domain import Binding, BindingStatus
from server.errors import (
    BackendUnavailableError,
    BindingExpiredError,
    BindingNotFoundError,
    BindingRevokedError,
    BindingSupersededError,
    KeyBinderError,
    KeyBindingFailedError,
    Sha256ThumbprintMismatchError,
    TokenReplayedError,
)
from server.ports import BindingLookup, Clock, ReplayCache
from server.wla import TokenRules, VerifiedToken, check_claims, read_header, replay_key, verify_signed

log = logging.getLogger(__name__)

NAME = "WLA"
FORMAT = "jwt"
WLA_MIN_CHARS = 100
WLA_MAX_CHARS = 8192
_SHAPE = re.compile(rf"(?=.{{{WLA_MIN_CHARS},{WLA_MAX_CHARS}}}$)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def verify_wallet_token(
    bindings: BindingLookup,
    replay: ReplayCache,
    clock: Clock,
    token: str,
    *,
    individual_id: str,
    id_hmac: bytes,
    partner_id: str,
    factor: str,
    rules: TokenRules,
    subject: Callable[[str], bool] | None = None,
    audit: Callable[[Binding], AuditEvent] | None = None,
) -> tuple[Binding, VerifiedToken]:
    """All WLA rules, in order; raises the precise error. The jti is claimed last (with ``audit``'s entry).

    ``subject`` tests the token's sub (default: it must be ``individual_id``); a token without a jti (the esignet
    profile) is single-use by the SHA-256 of its signing input.
    """
    header = read_header(token)
    now = clock.now()
    active = bindings.active_binding(id_hmac, partner_id, factor)
    if active is None or active.cert_thumbprint != header.x5t_s256:
        named = bindings.binding_of(id_hmac, header.x5t_s256)
        if named is not None and named.partner_id == partner_id:
            if named.status is BindingStatus.SUPERSEDED:
                raise BindingSupersededError("the token names a binding that has been superseded")
            if named.status is BindingStatus.REVOKED:
                raise BindingRevokedError("the token names a revoked binding")
        if active is None:
            raise BindingNotFoundError("the individual has no active binding for this partner and factor")
        raise Sha256ThumbprintMismatchError("x5t#S256 does not match the individual's active binding")
    if active.expires_at <= now:
        raise BindingExpiredError("the binding's certificate has expired")
    cert = x509.load_pem_x509_certificate(active.certificate_pem.encode())
    payload = verify_signed(token, header.alg, cert)
    verified = check_claims(payload, subject=subject or individual_id, rules=rules, now=now)
    entry = audit(active) if audit is not None else None
    if not replay.claim_jti(id_hmac, verified.jti or replay_key(token), verified.expires_at, now, audit=entry):
        raise TokenReplayedError("this token has already been used")
    return active, verified


@dataclass(frozen=True, slots=True)
class WlaFactor:
    bindings: BindingLookup
    replay: ReplayCache
    clock: Clock
    rules: Callable[[str], TokenRules]
    same_individual: Callable[[str], Callable[[str], bool]]
    name: str = NAME
    format: str = FORMAT

    def well_formed(self, challenge: str) -> bool:
        return _SHAPE.fullmatch(challenge) is not None

    def verify(self, attempt: Attempt, challenge: str) -> Verdict:
        try:
            verify_wallet_token(
                self.bindings,
                self.replay,
                self.clock,
                challenge,
                individual_id=attempt.individual_id,
                id_hmac=attempt.id_hmac,
                partner_id=attempt.partner_id,
                factor=NAME,
                rules=self.rules(attempt.partner_id),
                subject=self.same_individual(attempt.individual_id),
            )
        except KeyBinderError as err:
            if isinstance(err, BackendUnavailableError | KeyBindingFailedError):
                raise
            log.info("WLA challenge refused: %s", err.reason)
            return FAILED
        return PASSED


def build(ctx: AuthContext) -> WlaFactor:
    return WlaFactor(ctx.bindings, ctx.replay, ctx.clock, ctx.wla_rules, ctx.same_individual)
