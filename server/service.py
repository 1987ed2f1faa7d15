"""The service layer: eSignet's KeyBinder operations over the ports, free of gRPC and PKCS#11."""

from __future__ import annotations

import base64
import functools
import hmac
import logging
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ParamSpec, TypeVar

from cryptography import x509

from server import deadline
from server.aliases import AliasStore
from server.audit import AuditEvent, Outcome, individual_event, partner_chain, partner_event, psut_subject
from server.auth import Attempt, AuthContext, Challenge, Factors
from server.auth.kbi import enrolment_hmacs
from server.auth.otp import MAC_OTP
from server.auth.pin import MAC_PIN
from server.auth.wla import verify_wallet_token
from server.breaker import CircuitBreaker
from server.certs import Issuer, issue_wallet_certificate, to_pem, x5t_s256
from server.domain import Binding, BindingStatus, Identity, OtpChannel, OtpMessage, OtpRecord
from server.errors import (
    AuthFailedError,
    BackendUnavailableError,
    BindingNotFoundError,
    DuplicatePublicKeyError,
    InvalidArgumentError,
    InvalidBindAuthFactorTypeError,
    InvalidIndividualIdError,
    InvalidOtpChannelError,
    InvalidPartnerError,
    InvalidProofOfPossessionError,
    InvalidRevocationReasonError,
    InvalidWlaTokenError,
    KeyBinderError,
    KeyBindingFailedError,
    ProofOfPossessionRequiredError,
    SendOtpFailedError,
    TooManyAttemptsError,
)
from server.issuers import IssuerCache
from server.jwk import WalletKey, WalletPublicKey, parse_wallet_jwk
from server.keytypes import check_key_type
from server.limits import (
    LIMIT_LOCKOUT,
    Reservation,
    budget_refusal,
    seconds_until,
)
from server.otp import new_otp
from server.policy import PARTNER_ID_PATTERN, Policy
from server.ports import (
    AuditLog,
    BackendFailure,
    BackendUnavailable,
    BindingStore,
    Clock,
    DeliveryFailed,
    IdentityStore,
    IssuerKeys,
    IssuerStore,
    KbiStore,
    KeyedHasher,
    KeyOwnedByOther,
    LimitStore,
    NonceStore,
    Notifier,
    OtpAlreadyUsed,
    OtpStore,
    RateLimited,
    ReplayCache,
    StoreUnavailable,
)
from server.wla import VerifiedToken, verify_possession

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

REVOCATION_REASON_PATTERN = re.compile(r"[\x20-\x7e]{1,200}")
#: Bounds on an individual ID whatever the configured pattern admits: it is hashed, logged nowhere, and
#: must not carry control characters or be a vehicle for megabytes.
MAX_INDIVIDUAL_ID_CHARS = 256
#: email and phone, each perhaps spelt twice (case); more is not a real request.
MAX_OTP_CHANNELS = 4

# Audit actions (server/audit.py).
ACTION_SEND_OTP = "send_binding_otp"
ACTION_BIND = "do_key_binding"
ACTION_VERIFY = "verify_wallet_token"
ACTION_REVOKE = "revoke_binding"

# MAC purposes: one HSM key, one label per meaning (each factor's own in its module under server/auth/).
MAC_ID = "individual-id"
#: The PSUT as it was computed before aliases: over the raw ID the request named. Kept only in the
#: bindings made then (see `_psut`); new PSUTs are keyed by the canonical ID-HMAC (MAC_PSUT_INDIVIDUAL).
MAC_PSUT = "psut"
MAC_PSUT_INDIVIDUAL = "psut-individual"

#: The one answer to SendBindingOtp for an unknown individual and for one without a contact on the channel:
#: the same reason and the same words, so the message does not tell them apart.
SEND_OTP_REFUSED = "cannot send an OTP to this individual on the requested channel"


@dataclass(frozen=True, slots=True)
class SendOtpResult:
    transaction_id: str
    masked_email: str
    masked_mobile: str


@dataclass(frozen=True, slots=True)
class WalletTokenResult:
    psut: str
    thumbprint: str
    binding_expires_at: datetime
    jti: str
    token_expires_at: datetime


@dataclass(frozen=True, slots=True)
class KeyBindingResult:
    certificate_pem: str
    psut: str
    expires_at: datetime
    thumbprint: str


def mask_email(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    """Stars for every digit but the last four, which are shown; formatting is dropped."""
    digits = "".join(c for c in phone if c in string.digits)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(slots=True)
class _Trail:
    """What one request's audit entry needs, filled in as the request learns it."""

    action: str
    #: Set once the partner id is known to be well-formed (else the entry names no partner).
    partner_id: str = ""
    #: Set once the individual ID is hashed: from then on entries go to the individual's chain.
    id_hmac: bytes | None = None
    #: The outcome's entry is written already (with the state change it describes).
    recorded: bool = False


def backend_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Turn a port's backend failure into the API's retryable (UNAVAILABLE) or internal error."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except BackendUnavailable as err:
            raise BackendUnavailableError("a backend (HSM or database) is unavailable; retry later") from err
        except BackendFailure as err:
            raise KeyBindingFailedError("key binding failed") from err

    return wrapper


class KeyBinderService:
    def __init__(
        self,
        *,
        policy: Policy,
        clock: Clock,
        hasher: KeyedHasher,
        issuer_keys: IssuerKeys,
        identities: IdentityStore,
        otps: OtpStore,
        bindings: BindingStore,
        issuers: IssuerStore,
        notifier: Notifier,
        replay: ReplayCache,
        nonces: NonceStore,
        limit_store: LimitStore,
        audit_log: AuditLog,
        kbi: KbiStore,
        aliases: AliasStore,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.hasher = hasher
        self.issuer_keys = issuer_keys
        self.identities = identities
        self.otps = otps
        self.bindings = bindings
        self.issuers = issuers
        self.notifier = notifier
        self.replay = replay
        self.nonces = nonces
        self.limit_store = limit_store
        self.audit_log = audit_log
        self.aliases = aliases
        #: Open while the database is known to be down: requests are answered UNAVAILABLE at once.
        self.breaker = breaker or CircuitBreaker()
        self._id_pattern = re.compile(policy.individual_id_pattern)
        self.factors = Factors(
            AuthContext(
                hasher,
                clock,
                otps,
                bindings,
                replay,
                kbi,
                policy.wla_rules_for,
                self._same_individual,
                policy.otp_length,
                policy.kbi_fields,
                policy.kbi_individual_id_field,
            ),
            policy.challenge_factors,
            policy.challenge_rules,
        )
        #: The installed issuers (re-read after ``issuer_cache_seconds``) and the signers of those used.
        self.issuer_cache = IssuerCache(
            issuers,
            issuer_keys,
            window=timedelta(days=policy.issuer_rotation_window_days),
            ttl_seconds=policy.issuer_cache_seconds,
        )

    # -- validation helpers ---------------------------------------------------------------

    def check_partner(self, partner_id: str) -> str:
        if not PARTNER_ID_PATTERN.fullmatch(partner_id):
            raise InvalidPartnerError("the partner-id header is malformed")
        return partner_id

    def check_individual_id(self, individual_id: str) -> str:
        if not individual_id or not individual_id.strip():
            raise InvalidIndividualIdError("the individual ID is blank")
        if len(individual_id) > MAX_INDIVIDUAL_ID_CHARS or not individual_id.isprintable():
            raise InvalidIndividualIdError("the individual ID is malformed")
        if not self._id_pattern.fullmatch(individual_id):
            raise InvalidIndividualIdError("the individual ID is malformed")
        return individual_id

    @backend_errors
    def id_hmac(self, individual_id: str) -> bytes:
        return self.hasher.mac(MAC_ID, individual_id)

    @backend_errors
    def resolve(self, individual_id: str) -> bytes:
        """The canonical ID-HMAC of the individual ``individual_id`` names (their own ID or an active alias).

        Anything else (unknown, revoked or expired alias) is its own HMAC, as an unknown ID always was: one
        HMAC and one query either way, so a revoked alias and an unknown ID cost the same and go on alike.
        """
        own = self.hasher.mac(MAC_ID, individual_id)
        return self.aliases.resolve_individual(own, self.clock.now()) or own

    def _same_individual(self, individual_id: str) -> Callable[[str], bool]:
        """A test of a WLA token's sub: the request's ID, or another active ID of the same individual."""

        def same(sub: str) -> bool:
            # The token may name the individual by another of their IDs (a UIN where the request has a VID).
            if sub == individual_id:
                return True
            try:
                self.check_individual_id(sub)
            except InvalidIndividualIdError:
                return False
            return hmac.compare_digest(self.resolve(sub), self.resolve(individual_id))

        return same

    def _psut(self, id_hmac: bytes, partner_id: str) -> str:
        """The individual's PSUT for the partner, whichever of their IDs the request named.

        A PSUT issued before aliases existed (an HMAC of the raw ID, which is not stored) is read from the
        individual's first binding with the partner, so it never changes; a pair that has never been bound
        gets one keyed by the canonical ID-HMAC: the same through every alias, unlinkable across partners.
        """
        return self.aliases.partner_psut(id_hmac, partner_id) or b64url(
            self.hasher.mac(MAC_PSUT_INDIVIDUAL, partner_id, id_hmac)
        )

    @backend_errors
    def pin_hmac(self, id_hmac: bytes, pin: str) -> bytes:
        return self.hasher.mac(MAC_PIN, id_hmac, pin)

    @backend_errors
    def kbi_hmacs(self, id_hmac: bytes, answers: Mapping[str, str]) -> dict[str, bytes]:
        """The stored form of an individual's KBI attributes (ValueError naming the field at fault)."""
        policy = self.policy
        return enrolment_hmacs(
            self.hasher, policy.kbi_fields, id_hmac, answers, id_field=policy.kbi_individual_id_field
        )

    # -- audit trail ----------------------------------------------------------------------
    # Policy: a success is never answered without its entry, which is written in the transaction of the
    # state change (a failed write fails the request, retryable, and nothing is changed). A refusal is
    # always answered as itself: its entry is written in a small transaction of its own (or with the
    # failure counter), and if that write fails the refusal still goes out and the loss is logged at ERROR.

    def _event(self, trail: _Trail, outcome: str, reason: str = "", subject: str = "") -> AuditEvent:
        now = self.clock.now()
        if trail.id_hmac is not None:
            return individual_event(trail.id_hmac, now, trail.partner_id, trail.action, outcome, reason, subject)
        return partner_event(now, trail.partner_id, trail.action, outcome, reason)

    def check_available(self, *, trial: bool = True) -> None:
        """Refuse at once (UNAVAILABLE, retryable) while the database is known to be down (the breaker).

        ``trial=False`` (the transport's check before queueing a request) never takes the breaker's trial:
        the request's own service call does."""
        if self.breaker.refusing() if not trial else not self.breaker.allow():
            raise BackendUnavailableError("the database is unavailable; retry later")

    def _guarded(self, work: Callable[[], T]) -> T:
        """Run ``work`` behind the breaker (opened by the health probe); a request that gets through closes it."""
        self.check_available()
        result = work()
        self.breaker.succeeded()
        return result

    def _audited(self, trail: _Trail, work: Callable[[], T]) -> T:
        """Run one request; append the entry of any refusal or failure its transactions did not write."""
        try:
            return self._guarded(work)
        except KeyBinderError as err:
            if not trail.recorded:
                failed = isinstance(err, KeyBindingFailedError)
                event = self._event(trail, Outcome.ERROR if failed else Outcome.REFUSED, err.reason)
                if isinstance(err.__cause__, StoreUnavailable):
                    # This request just found the database unreachable: another bounded wait for it would
                    # only push the answer past the caller's deadline. Say what is lost instead.
                    self._lost(event, "database unavailable")
                else:
                    self._append_alone(event)
            raise
        except Exception:
            if not trail.recorded:
                self._append_alone(self._event(trail, Outcome.ERROR, KeyBindingFailedError.reason))
            raise

    @staticmethod
    def _lost(event: AuditEvent, why: str) -> None:
        log.error(
            "audit entry lost (%s): action=%s outcome=%s reason=%s partner=%s",
            why,
            event.action,
            event.outcome,
            event.reason,
            event.partner_id,
        )

    def _append_alone(self, event: AuditEvent) -> None:
        if self.breaker.is_open:
            # Waiting for a database known to be down would only delay the refusal: say what is lost.
            self._lost(event, "database unavailable")
            return
        try:
            self.audit_log.append_audit(event)
        except Exception:
            log.exception(
                "audit entry lost: action=%s outcome=%s reason=%s partner=%s",
                event.action,
                event.outcome,
                event.reason,
                event.partner_id,
            )

    # -- GetSupportedChallengeFormats ----------------------------------------------------

    def get_supported_challenge_formats(self, auth_factor_type: str) -> list[str]:
        return self.factors.supported_formats(auth_factor_type)

    # -- SendBindingOtp -------------------------------------------------------------------

    def send_binding_otp(self, partner_id: str, individual_id: str, channels: Sequence[str]) -> SendOtpResult:
        trail = _Trail(ACTION_SEND_OTP)
        return self._audited(trail, lambda: self._send_binding_otp(trail, partner_id, individual_id, channels))

    @backend_errors
    def _send_binding_otp(
        self, trail: _Trail, partner_id: str, individual_id: str, channels: Sequence[str]
    ) -> SendOtpResult:
        trail.partner_id = self.check_partner(partner_id)
        self.check_individual_id(individual_id)
        wanted = self._parse_channels(channels)
        # Counted for known and unknown individuals alike: this bounds how fast a partner can probe IDs.
        wait = self.limit_store.count_partner_otp_send(
            partner_id, self.clock.now(), self.policy.limits.otp_sends_per_partner
        )
        if wait:
            raise TooManyAttemptsError(
                "this partner has requested too many OTPs; retry later",
                retry_after_seconds=wait,
                limit="partner_otp_sends",
            )
        id_hmac = trail.id_hmac = self.resolve(individual_id)
        identity = self.identities.get_identity(id_hmac)
        if identity is None:
            raise SendOtpFailedError(SEND_OTP_REFUSED)
        targets = self._targets(identity, wanted)

        now = self.clock.now()
        transaction_id = secrets.token_urlsafe(24)
        otp = new_otp(self.policy.otp_alphabet, self.policy.otp_length)
        record = OtpRecord(
            transaction_id=transaction_id,
            id_hmac=id_hmac,
            partner_id=partner_id,
            otp_hmac=self.hasher.mac(MAC_OTP, transaction_id, otp),
            created_at=now,
            expires_at=now + timedelta(seconds=self.policy.otp_ttl_seconds),
            max_attempts=self.policy.otp_max_attempts,
        )
        try:
            self.otps.replace_otp(
                record,
                send_limit=self.policy.limits.otp_sends_per_individual,
                audit=self._event(trail, Outcome.SUCCESS),
            )
        except RateLimited as err:
            raise TooManyAttemptsError(
                "too many OTPs were sent to this individual; retry later",
                retry_after_seconds=err.retry_after_seconds,
                limit="individual_otp_sends",
            ) from err
        try:
            for channel, address in targets:
                self.notifier.send(OtpMessage(channel, address, transaction_id, otp, now))
        except Exception as err:
            # An OTP nobody received must not stay usable, whatever went wrong in the notifier.
            if not isinstance(err, DeliveryFailed):
                # Only the type: a notifier's own message might quote what it was sending.
                log.error("notifier failed unexpectedly: %s", type(err).__name__)
            self.otps.discard_otp(transaction_id, id_hmac)
            raise SendOtpFailedError("the OTP could not be delivered") from err
        return SendOtpResult(
            transaction_id=transaction_id,
            masked_email=next((mask_email(a) for c, a in targets if c is OtpChannel.EMAIL), ""),
            masked_mobile=next((mask_phone(a) for c, a in targets if c is OtpChannel.PHONE), ""),
        )

    @staticmethod
    def _parse_channels(channels: Sequence[str]) -> list[OtpChannel]:
        if not channels:
            raise InvalidOtpChannelError("at least one OTP channel (email, phone) is required")
        if len(channels) > MAX_OTP_CHANNELS:
            raise InvalidOtpChannelError(f"at most {MAX_OTP_CHANNELS} OTP channels may be named")
        wanted: list[OtpChannel] = []
        for name in channels:
            try:
                channel = OtpChannel(name.lower())
            except ValueError:
                raise InvalidOtpChannelError("OTP channels must be 'email' or 'phone'") from None
            if channel not in wanted:
                wanted.append(channel)
        return wanted

    @staticmethod
    def _targets(identity: Identity, wanted: list[OtpChannel]) -> list[tuple[OtpChannel, str]]:
        targets: list[tuple[OtpChannel, str]] = []
        for channel in wanted:
            address = identity.email if channel is OtpChannel.EMAIL else identity.phone
            if not address:
                raise SendOtpFailedError(SEND_OTP_REFUSED)
            targets.append((channel, address))
        return targets

    # -- DoKeyBinding ---------------------------------------------------------------------

    def do_key_binding(
        self,
        partner_id: str,
        individual_id: str,
        challenges: Sequence[Challenge],
        public_key_jwk: str,
        bind_auth_factor_type: str,
        proof_of_possession: str = "",
    ) -> KeyBindingResult:
        trail = _Trail(ACTION_BIND)
        return self._audited(
            trail,
            lambda: self._do_key_binding(
                trail, partner_id, individual_id, challenges, public_key_jwk, bind_auth_factor_type, proof_of_possession
            ),
        )

    @backend_errors
    def _do_key_binding(
        self,
        trail: _Trail,
        partner_id: str,
        individual_id: str,
        challenges: Sequence[Challenge],
        public_key_jwk: str,
        bind_auth_factor_type: str,
        proof_of_possession: str,
    ) -> KeyBindingResult:
        # Everything that can be checked without a secret is checked before any is touched.
        trail.partner_id = self.check_partner(partner_id)
        self.check_individual_id(individual_id)
        self.factors.validate(challenges)
        if bind_auth_factor_type not in self.policy.bind_auth_factor_types:
            raise InvalidBindAuthFactorTypeError(
                f"bind_auth_factor_type must be one of {sorted(self.policy.bind_auth_factor_types)}"
            )
        wallet = parse_wallet_jwk(public_key_jwk)
        # Decided before any challenge is looked at: a key the partner may not bind spends no OTP attempt.
        check_key_type(wallet.public_key, self.policy.key_types_for(partner_id))
        # The proof's shape and signature need no secret: check them before any attempt is counted.
        pop_nonce = self._proof_nonce(proof_of_possession, wallet.public_key, partner_id)

        deadline.check("verifying the challenges")
        self._check_failure_budget(trail, partner_id)
        id_hmac = trail.id_hmac = self.resolve(individual_id)
        consumed_otp, reservation = self._verify_counted(trail, individual_id, id_hmac, partner_id, challenges)
        try:
            return self._bind(
                trail,
                partner_id,
                individual_id,
                id_hmac,
                wallet,
                bind_auth_factor_type,
                pop_nonce,
                consumed_otp,
                reservation,
            )
        except BaseException:
            # Authenticated, but not bound (the commit, which gives the reservation back, did not happen).
            self._release(id_hmac, reservation)
            raise

    def _bind(
        self,
        trail: _Trail,
        partner_id: str,
        individual_id: str,
        id_hmac: bytes,
        wallet: WalletKey,
        bind_auth_factor_type: str,
        pop_nonce: str | None,
        consumed_otp: str | None,
        reservation: Reservation,
    ) -> KeyBindingResult:
        """The binding, once every challenge has passed: certificate, key claim, one commit."""
        consumed_nonce = self._check_nonce(pop_nonce, id_hmac, partner_id, consumed_otp)

        psut = self._psut(id_hmac, partner_id)
        now = self.clock.now()
        issuer = self.issuer_cache.active(now)
        try:
            cert = issue_wallet_certificate(
                issuer,
                wallet.public_key,
                psut=psut,
                now=now,
                validity=timedelta(days=self.policy.cert_validity_days),
            )
        except (KeyBinderError, BackendUnavailable, BackendFailure):
            raise
        except Exception as err:
            log.exception("certificate issuance failed")
            raise KeyBindingFailedError("key binding failed") from err
        thumbprint = x5t_s256(cert)
        binding = Binding(
            id_hmac=id_hmac,
            partner_id=partner_id,
            auth_factor_type=bind_auth_factor_type,
            psut=psut,
            key_fingerprint=wallet.fingerprint,
            certificate_pem=to_pem(cert),
            cert_thumbprint=thumbprint,
            serial_hex=format(cert.serial_number, "x"),
            issuer_key_label=issuer.key_label,
            created_at=now,
            expires_at=cert.not_valid_after_utc,
        )
        # A caller who has given up gets nothing written: no key claimed, no binding committed.
        deadline.check("the binding transaction")
        try:
            # The key is claimed for this individual only now, when every challenge has passed (so nobody
            # can reserve a stranger's key) and just before the binding commits. It is its own transaction
            # on the key's row, so the binding's transaction touches one individual's rows only; a claim
            # whose binding then fails stays, naming the individual who proved who they are with it.
            self.bindings.claim_key(wallet.fingerprint, id_hmac, now)
            self.bindings.commit_binding(
                binding,
                consume_otp=consumed_otp,
                now=now,
                consume_nonce=consumed_nonce,
                audit=self._event(trail, Outcome.SUCCESS, subject=psut_subject(psut)),
                release=reservation,
            )
        except OtpAlreadyUsed as err:
            if consumed_nonce is not None and err.args and err.args[0] == consumed_nonce:
                raise InvalidProofOfPossessionError("the proof's nonce has already been used") from err
            raise AuthFailedError("authentication failed") from err
        except KeyOwnedByOther as err:
            raise DuplicatePublicKeyError("this public key is already bound to another individual") from err
        return KeyBindingResult(binding.certificate_pem, psut, binding.expires_at, thumbprint)

    def _check_failure_budget(self, trail: _Trail, partner_id: str) -> None:
        """Refuse before any challenge is looked at when the partner's (or everyone's) failure budget is spent:
        a partner spraying common PINs over many IDs gets a few guesses a minute, not thousands."""
        partner, everyone = self.limit_store.failure_budget(partner_id)
        name_wait = budget_refusal(partner, everyone, self.clock.now(), self.policy.limits)
        if name_wait is None:
            return
        name, wait = name_wait
        # One entry in the partner's chain, naming the budget (the refusal is the partner's, not an individual's).
        now = self.clock.now()
        self._append_alone(
            AuditEvent(
                partner_chain(partner_id),
                now,
                partner_id,
                trail.action,
                Outcome.REFUSED,
                TooManyAttemptsError.reason,
                f"limit:{name}",
            )
        )
        trail.recorded = True
        raise TooManyAttemptsError(
            "too many failed challenges from this partner; retry later", retry_after_seconds=wait, limit=name
        )

    def _verify_counted(
        self,
        trail: _Trail,
        individual_id: str,
        id_hmac: bytes,
        partner_id: str,
        challenges: Sequence[Challenge],
    ) -> tuple[str | None, Reservation]:
        """``_verify`` behind the individual's lockout, the check and the count one atomic step.

        The attempt is counted as a failure before it is evaluated (a reservation, in one transaction with the
        lockout check), so any number of concurrent requests in any number of processes get at most
        ``auth_failures_before_lockout`` guesses evaluated. On success the caller gives the reservation back
        (with the binding's own transaction, or `_release`). A lockout is refused before any challenge is
        looked at, so even the right answer waits for it.
        """
        now = self.clock.now()
        identity, reservation = self.limit_store.reserve_attempt(id_hmac, now, self.policy.limits)
        if reservation.refused_until is not None:
            raise TooManyAttemptsError(
                "too many failed attempts for this individual; retry later",
                retry_after_seconds=seconds_until(reservation.refused_until, now),
                limit=LIMIT_LOCKOUT,
            )
        try:
            consumed = self._verify(identity, individual_id, id_hmac, partner_id, challenges)
        except AuthFailedError as err:
            self._count_failure(trail, id_hmac, partner_id, reservation, err)
            raise
        except BaseException:
            self._release(id_hmac, reservation)  # nothing was decided: the attempt is not a failure
            raise
        return consumed, reservation

    def _release(self, id_hmac: bytes, reservation: Reservation) -> None:
        try:
            self.limit_store.release_attempt(id_hmac, reservation)
        except (BackendUnavailable, BackendFailure):
            # The attempt stays counted as a failure: the safe side; it expires with its window.
            log.exception("an attempt's reservation could not be released")

    def _count_failure(
        self, trail: _Trail, id_hmac: bytes, partner_id: str, reservation: Reservation, err: AuthFailedError
    ) -> None:
        """Record the failure (audit entry, lockout) and count it against the partner's and everyone's budget."""
        try:
            self.limit_store.record_auth_failure(
                id_hmac,
                self.clock.now(),
                self.policy.limits,
                audit=self._event(trail, Outcome.REFUSED, err.reason),
                lockout_audit=self._event(trail, Outcome.LOCKED, TooManyAttemptsError.reason),
                reservation=reservation,
            )
            trail.recorded = True
            self.limit_store.count_failure_budget(partner_id, self.clock.now(), self.policy.limits)
        except (BackendUnavailable, BackendFailure):
            # The caller still learns that authentication failed; the lost count is logged, not hidden.
            log.exception("a failed challenge could not be counted")

    def _verify(
        self,
        identity: Identity | None,
        individual_id: str,
        id_hmac: bytes,
        partner_id: str,
        challenges: Sequence[Challenge],
    ) -> str | None:
        """Verify every challenge; returns the OTP transaction to consume on success.

        Every failure is the same ``auth_failed`` to the caller (no enumeration of IDs or of
        which factor failed); the precise cause goes to the log.
        """
        failed = identity is None
        consumed: str | None = None
        attempt = Attempt(identity, individual_id, id_hmac, partner_id)
        for ch in challenges:
            factor = self.factors.get(ch.auth_factor_type)
            if factor is None:  # validate admits only enabled factors; a verifier exists for each.
                failed = True
                continue
            verdict = factor.verify(attempt, ch.challenge)
            if not verdict.passed:
                failed = True
            elif verdict.consumed_otp is not None:
                consumed = verdict.consumed_otp
        if failed:
            raise AuthFailedError("authentication failed")
        return consumed

    def _proof_nonce(self, proof: str, public_key: WalletPublicKey, partner_id: str) -> str | None:
        """Apply the partner's proof-of-possession policy; the nonce of a verified proof, if any."""
        mode = self.policy.pop_mode(partner_id)
        if mode == "off":
            return None
        if not proof:
            if mode == "required":
                raise ProofOfPossessionRequiredError("this partner requires a proof of possession of the key")
            return None
        return verify_possession(proof, public_key, audience=self.policy.wla_audience)

    def _check_nonce(
        self, nonce: str | None, id_hmac: bytes, partner_id: str, otp_transaction: str | None
    ) -> str | None:
        """The proof's nonce must be this binding's OTP transaction or an unused GetBindingNonce nonce
        of this individual; returns the latter, to be consumed with the binding."""
        if nonce is None:
            return None
        if otp_transaction is not None and hmac.compare_digest(nonce, otp_transaction):
            return None  # the OTP is consumed with the binding already
        if self.nonces.nonce_usable(nonce, id_hmac, partner_id, self.clock.now()):
            return nonce
        raise InvalidProofOfPossessionError("the proof's nonce was not issued for this binding or has expired")

    def _verify_wla(
        self,
        token: str,
        individual_id: str,
        id_hmac: bytes,
        partner_id: str,
        factor: str,
        audience: str,
        trail: _Trail | None = None,
    ) -> tuple[Binding, VerifiedToken]:
        """All WLA rules, in order (server/auth/wla.py); raises the precise error. The jti is claimed last."""
        return verify_wallet_token(
            self.bindings,
            self.replay,
            self.clock,
            token,
            individual_id=individual_id,
            id_hmac=id_hmac,
            partner_id=partner_id,
            factor=factor,
            rules=self.policy.wla_rules_for(partner_id, audience),
            subject=self._same_individual(individual_id),
            audit=(lambda b: self._event(trail, Outcome.SUCCESS, subject=psut_subject(b.psut)))
            if trail is not None
            else None,
        )

    # -- VerifyWalletToken ----------------------------------------------------------------

    def verify_wallet_token(
        self, partner_id: str, token: str, individual_id: str, expected_audience: str, factor: str
    ) -> WalletTokenResult:
        trail = _Trail(ACTION_VERIFY)
        return self._audited(
            trail,
            lambda: self._verify_wallet_token(trail, partner_id, token, individual_id, expected_audience, factor),
        )

    @backend_errors
    def _verify_wallet_token(
        self, trail: _Trail, partner_id: str, token: str, individual_id: str, expected_audience: str, factor: str
    ) -> WalletTokenResult:
        trail.partner_id = self.check_partner(partner_id)
        self.check_individual_id(individual_id)
        factor = self._factor(factor)
        if len(expected_audience) > 256:
            raise InvalidWlaTokenError("expected_audience is too long")
        id_hmac = trail.id_hmac = self.resolve(individual_id)
        binding, verified = self._verify_wla(
            token, individual_id, id_hmac, partner_id, factor, expected_audience, trail
        )
        return WalletTokenResult(
            psut=binding.psut,
            thumbprint=binding.cert_thumbprint,
            binding_expires_at=binding.expires_at,
            jti=verified.jti,
            token_expires_at=verified.expires_at,
        )

    def _factor(self, factor: str) -> str:
        factor = factor or "WLA"
        if factor not in self.policy.bind_auth_factor_types:
            raise InvalidBindAuthFactorTypeError(
                f"bind_auth_factor_type must be one of {sorted(self.policy.bind_auth_factor_types)}"
            )
        return factor

    # -- RevokeBinding, GetBinding, GetBindingNonce ---------------------------------------

    def revoke_binding(
        self, partner_id: str, individual_id: str, challenges: Sequence[Challenge], reason: str, factor: str
    ) -> Binding:
        trail = _Trail(ACTION_REVOKE)
        return self._audited(
            trail, lambda: self._revoke_binding(trail, partner_id, individual_id, challenges, reason, factor)
        )

    @backend_errors
    def _revoke_binding(
        self,
        trail: _Trail,
        partner_id: str,
        individual_id: str,
        challenges: Sequence[Challenge],
        reason: str,
        factor: str,
    ) -> Binding:
        trail.partner_id = self.check_partner(partner_id)
        self.check_individual_id(individual_id)
        self.factors.validate(challenges)
        factor = self._factor(factor)
        if not REVOCATION_REASON_PATTERN.fullmatch(reason):
            raise InvalidRevocationReasonError("reason must be 1 to 200 printable characters")
        self._check_failure_budget(trail, partner_id)
        id_hmac = trail.id_hmac = self.resolve(individual_id)
        consumed_otp, reservation = self._verify_counted(trail, individual_id, id_hmac, partner_id, challenges)
        self._release(id_hmac, reservation)  # revocations are rare: their own small transaction
        try:
            revoked = self.bindings.revoke_binding(
                id_hmac,
                partner_id,
                factor,
                reason=reason,
                now=self.clock.now(),
                consume_otp=consumed_otp,
                audit=self._event(trail, Outcome.SUCCESS),
            )
        except OtpAlreadyUsed as err:
            raise AuthFailedError("authentication failed") from err
        if revoked is None:
            raise BindingNotFoundError("there is no active binding to revoke")
        return revoked

    def get_binding(self, partner_id: str, *, psut: str, thumbprint: str, factor: str) -> tuple[Binding, BindingStatus]:
        """The binding and its status now; a partner sees only its own bindings."""
        return self._guarded(lambda: self._get_binding(partner_id, psut=psut, thumbprint=thumbprint, factor=factor))

    @backend_errors
    def _get_binding(
        self, partner_id: str, *, psut: str, thumbprint: str, factor: str
    ) -> tuple[Binding, BindingStatus]:
        self.check_partner(partner_id)
        if bool(psut) == bool(thumbprint):
            raise InvalidArgumentError("give exactly one of partner_specific_user_token and thumbprint")
        if len(psut) > 64 or len(thumbprint) > 64:
            raise InvalidArgumentError("selector too long")
        if thumbprint:
            binding = self.bindings.binding_by_thumbprint(thumbprint)
        else:
            binding = self.bindings.latest_binding_by_psut(psut, partner_id, self._factor(factor))
        if binding is None or binding.partner_id != partner_id:
            raise BindingNotFoundError("no such binding for this partner")
        return binding, binding.status_at(self.clock.now())

    def get_binding_nonce(self, partner_id: str, individual_id: str) -> tuple[str, datetime]:
        return self._guarded(lambda: self._get_binding_nonce(partner_id, individual_id))

    @backend_errors
    def _get_binding_nonce(self, partner_id: str, individual_id: str) -> tuple[str, datetime]:
        """A nonce for a proof of possession. Limited per partner (bounds a flood of random IDs) and per
        individual; stored the same way whether the ID is registered or not (nothing to enumerate), and
        purged by the sweep once expired."""
        self.check_partner(partner_id)
        self.check_individual_id(individual_id)
        limits = self.policy.limits
        now = self.clock.now()
        wait = self.limit_store.count_partner_nonce(partner_id, now, limits.nonces_per_partner)
        if wait:
            raise TooManyAttemptsError(
                "this partner has requested too many nonces; retry later",
                retry_after_seconds=wait,
                limit="partner_nonces",
            )
        nonce = secrets.token_urlsafe(24)
        expires = now + timedelta(seconds=self.policy.otp_ttl_seconds)
        try:
            self.nonces.create_nonce(
                nonce, self.resolve(individual_id), partner_id, expires, now=now, limit=limits.nonces_per_individual
            )
        except RateLimited as err:
            raise TooManyAttemptsError(
                "too many nonces were requested for this individual; retry later",
                retry_after_seconds=err.retry_after_seconds,
                limit="individual_nonces",
            ) from err
        return nonce, expires

    # -- GetIssuerCertificates ------------------------------------------------------------

    @backend_errors
    def issuer_certificates(self) -> list[x509.Certificate]:
        """The active issuer first, then every other key that may have signed a still-valid wallet
        certificate (retiring) or is about to sign (next), newest first; then the CA certificates
        above them, if an external CA signed them.

        Wallet certificates never outlive their issuer, so an issuer that has not expired is
        exactly one whose certificates may still be in use. Read from the store on every call (not
        per binding), so a rotation shows here at once.
        """
        return self.issuer_cache.certificates(self.clock.now())

    @backend_errors
    def issuer_chains(self) -> list[tuple[x509.Certificate, list[x509.Certificate]]]:
        """The issuers of `issuer_certificates`, each with the CA certificates above it."""
        return self.issuer_cache.chains(self.clock.now())

    @backend_errors
    def active_issuer(self) -> Issuer:
        """The issuer that signs new wallet certificates now."""
        return self.issuer_cache.active(self.clock.now())

    def refresh_issuers(self) -> None:
        """Forget the cached issuer list: the next binding reads it again (after `keys rotate` in-process)."""
        self.issuer_cache.refresh()

    def issuer_warning(self) -> str | None:
        """Why the issuer keys need an operator now (rotation due, or no valid key), else None."""
        return self.issuer_cache.warning(self.clock.now())
