"""KeyBinder's domain errors, each carrying its eSignet reason code; the gRPC layer maps them."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Transport-neutral status classes; the gRPC adapter maps each to a status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    NOT_FOUND = "NOT_FOUND"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class KeyBinderError(Exception):
    """Root of the domain errors. ``str(err)`` is a sentence safe to send to the caller."""

    reason: str = "key_binding_failed"
    status: Status = Status.INTERNAL

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Extra, non-secret facts for ErrorInfo.metadata (e.g. the field at fault).
        self.metadata = metadata or {}


class InvalidIndividualIdError(KeyBinderError):
    """Blank or malformed individual ID."""

    reason = "invalid_individual_id"
    status = Status.INVALID_ARGUMENT


class InvalidOtpChannelError(KeyBinderError):
    """OTP channel other than email/phone, or none."""

    reason = "invalid_otp_channel"
    status = Status.INVALID_ARGUMENT


class SendOtpFailedError(KeyBinderError):
    """Unknown individual, no contact on the channel, or delivery failed."""

    reason = "send_otp_failed"
    status = Status.FAILED_PRECONDITION


class InvalidNoOfChallengesError(KeyBinderError):
    """Zero or more than the allowed number of challenges."""

    reason = "invalid_no_of_challenges"
    status = Status.INVALID_ARGUMENT


class InvalidAuthFactorTypeError(KeyBinderError):
    """Unknown or unsupported auth factor."""

    reason = "invalid_auth_factor_type"
    status = Status.INVALID_ARGUMENT


class InvalidChallengeFormatError(KeyBinderError):
    """Challenge format does not match the factor."""

    reason = "invalid_challenge_format"
    status = Status.INVALID_ARGUMENT


class InvalidChallengeError(KeyBinderError):
    """Challenge value malformed (length, characters) or repeated factor."""

    reason = "invalid_challenge"
    status = Status.INVALID_ARGUMENT


class InvalidBindAuthFactorTypeError(KeyBinderError):
    """The factor to bind is missing or not allowed."""

    reason = "invalid_bind_auth_factor_type"
    status = Status.INVALID_ARGUMENT


class InvalidPublicKeyError(KeyBinderError):
    """JWK malformed, carries private members, weak or unsupported."""

    reason = "invalid_public_key"
    status = Status.INVALID_ARGUMENT


class DuplicatePublicKeyError(KeyBinderError):
    """The wallet key is already bound to another individual."""

    reason = "duplicate_public_key"
    status = Status.ALREADY_EXISTS


class AuthFailedError(KeyBinderError):
    """Any challenge failed; one reason for all so IDs cannot be enumerated."""

    reason = "auth_failed"
    status = Status.UNAUTHENTICATED


class TooManyAttemptsError(KeyBinderError):
    """Lockout or rate limit."""

    reason = "too_many_attempts"
    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_seconds: int, limit: str = "") -> None:
        # ``limit`` names the limit that refused (ErrorInfo metadata, the refusal metric): never a secret.
        super().__init__(message, metadata={"limit": limit} if limit else None)
        self.retry_after_seconds = retry_after_seconds
        self.limit = limit


class RequiredHeaderMissingError(KeyBinderError):
    """Partner metadata missing."""

    reason = "required_header_missing"
    status = Status.UNAUTHENTICATED


class InvalidPartnerError(KeyBinderError):
    """Partner metadata malformed or unknown."""

    reason = "invalid_partner"
    status = Status.UNAUTHENTICATED


class KeyBindingFailedError(KeyBinderError):
    """Internal failure; nothing was written."""

    reason = "key_binding_failed"
    status = Status.INTERNAL


class BackendUnavailableError(KeyBindingFailedError):
    """The HSM or the database is unreachable: retryable, nothing was written."""

    status = Status.UNAVAILABLE


class DeadlineExceededError(KeyBinderError):
    """The caller's deadline passed before the work started: nothing was written."""

    reason = "deadline_exceeded"
    status = Status.DEADLINE_EXCEEDED


class NotFoundError(KeyBinderError):
    status = Status.NOT_FOUND


class BindingNotFoundError(NotFoundError):
    """No binding (of this partner, for this individual and factor) matches."""

    reason = "binding_not_found"


class BindingExpiredError(KeyBinderError):
    """The binding's certificate has expired."""

    reason = "binding_expired"
    status = Status.FAILED_PRECONDITION


class BindingSupersededError(KeyBinderError):
    """The token names a binding that a newer one replaced."""

    reason = "binding_superseded"
    status = Status.FAILED_PRECONDITION


class BindingRevokedError(KeyBinderError):
    """The token names a revoked binding."""

    reason = "binding_revoked"
    status = Status.FAILED_PRECONDITION


class InvalidWlaTokenError(KeyBinderError):
    """Not a well-formed compact JWS with the required claims."""

    reason = "invalid_wla_token"
    status = Status.INVALID_ARGUMENT


class InvalidTokenAlgorithmError(KeyBinderError):
    """alg is none, symmetric, unknown, or does not match the bound key."""

    reason = "invalid_token_algorithm"
    status = Status.INVALID_ARGUMENT


class Sha256ThumbprintHeaderMissingError(KeyBinderError):
    """The token header has no x5t#S256."""

    reason = "sha256_thumbprint_header_missing"
    status = Status.INVALID_ARGUMENT


class Sha256ThumbprintMismatchError(KeyBinderError):
    """x5t#S256 is not the thumbprint of the individual's active binding."""

    reason = "sha256_thumbprint_mismatch"
    status = Status.UNAUTHENTICATED


class InvalidTokenSignatureError(KeyBinderError):
    """The signature does not verify with the bound key."""

    reason = "invalid_token_signature"
    status = Status.UNAUTHENTICATED


class InvalidTokenAudienceError(KeyBinderError):
    reason = "invalid_token_audience"
    status = Status.UNAUTHENTICATED


class InvalidTokenSubjectError(KeyBinderError):
    reason = "invalid_token_subject"
    status = Status.UNAUTHENTICATED


class TokenExpiredError(KeyBinderError):
    reason = "token_expired"
    status = Status.UNAUTHENTICATED


class TokenNotYetValidError(KeyBinderError):
    """iat (or nbf) lies in the future beyond the allowed clock skew."""

    reason = "token_not_yet_valid"
    status = Status.UNAUTHENTICATED


class TokenLifetimeTooLongError(KeyBinderError):
    """exp - iat exceeds the configured maximum lifetime."""

    reason = "token_lifetime_too_long"
    status = Status.INVALID_ARGUMENT


class TokenReplayedError(KeyBinderError):
    """This jti was already accepted and the token has not expired yet."""

    reason = "token_replayed"
    status = Status.UNAUTHENTICATED


class ProofOfPossessionRequiredError(KeyBinderError):
    """The partner's policy requires a proof of possession and none was sent."""

    reason = "proof_of_possession_required"
    status = Status.INVALID_ARGUMENT


class InvalidProofOfPossessionError(KeyBinderError):
    """The proof is malformed, not signed by the key being bound, or names a wrong nonce."""

    reason = "invalid_proof_of_possession"
    status = Status.INVALID_ARGUMENT


class InvalidRevocationReasonError(KeyBinderError):
    reason = "invalid_revocation_reason"
    status = Status.INVALID_ARGUMENT


class InvalidArgumentError(KeyBinderError):
    """A request field is malformed (where no more specific eSignet reason applies)."""

    reason = "invalid_request"
    status = Status.INVALID_ARGUMENT
