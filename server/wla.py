"""Wallet Local Authentication tokens: strict verification of a JWS signed by a bound wallet key.

joserfc parses and verifies the JWS; the rules eSignet's validator leaves out are enforced
here, each failure with its own reason: x5t#S256 required and compared, alg tied to the key
type, sub/aud/iat/exp/jti required, a bounded lifetime, and (by the caller) single-use jti.
Two profiles (`TokenRules`): ``strict`` as above, and ``esignet`` for the tokens eSignet's own
validator accepts and Inji signs (iss required, jti optional, hours-long lifetime); single use
holds in both, a token without jti being its own replay key (`replay_key`).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError

from server.errors import (
    InvalidProofOfPossessionError,
    InvalidTokenAlgorithmError,
    InvalidTokenAudienceError,
    InvalidTokenSignatureError,
    InvalidTokenSubjectError,
    InvalidWlaTokenError,
    Sha256ThumbprintHeaderMissingError,
    TokenExpiredError,
    TokenLifetimeTooLongError,
    TokenNotYetValidError,
)
from server.keyprofiles import ALL_JWS_ALGS, find_profile, profile_of

MIN_TOKEN_CHARS = 100
MAX_TOKEN_CHARS = 8192
MAX_JTI_CHARS = 256
#: Every asymmetric algorithm a wallet key may sign with; 'none' and HS* never appear.
ALLOWED_ALGS = ALL_JWS_ALGS
#: Header parameters we understand and may therefore accept in 'crit'.
_UNDERSTOOD_CRIT: frozenset[str] = frozenset()


#: The WLA token profiles an operator picks per partner (`wla_profile`, `wla_profile_by_partner`).
WLA_PROFILES = ("strict", "esignet")


@dataclass(frozen=True, slots=True)
class TokenRules:
    audience: str
    skew_seconds: int = 30
    max_lifetime_seconds: int = 300
    #: strict: a jti is required. esignet: optional (Inji sends none); single use then rests on `replay_key`.
    require_jti: bool = True
    #: Claims that must be non-empty strings besides sub and aud (esignet: iss, as eSignet's validator).
    required_text_claims: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenHeader:
    alg: str
    x5t_s256: str
    kid: str | None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    jti: str
    issued_at: datetime
    expires_at: datetime
    claims: dict[str, Any]


def read_header(token: str) -> TokenHeader:
    """Parse (without trusting) the protected header; checks shape, alg family and x5t#S256."""
    if not isinstance(token, str) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise InvalidWlaTokenError(f"a wallet token is {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters")
    if token.count(".") != 2:
        raise InvalidWlaTokenError("a wallet token is a compact JWS (three dot-separated parts)")
    try:
        header = jws.extract_compact(token.encode("ascii")).headers()
    except (JoseError, ValueError, UnicodeError) as err:
        raise InvalidWlaTokenError("the wallet token is not a well-formed compact JWS") from err
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise InvalidTokenAlgorithmError("the token alg must be one of RS256, PS256, ES256, ES384, EdDSA")
    crit = header.get("crit")
    if crit is not None and (not isinstance(crit, list) or set(map(str, crit)) - _UNDERSTOOD_CRIT):
        raise InvalidWlaTokenError("the token names critical header parameters this server does not understand")
    x5t = header.get("x5t#S256")
    if not x5t:
        raise Sha256ThumbprintHeaderMissingError("the token header must carry x5t#S256 of the bound certificate")
    if not isinstance(x5t, str) or len(x5t) != 43:
        raise InvalidWlaTokenError("x5t#S256 must be the base64url SHA-256 of a certificate")
    kid = header.get("kid")
    return TokenHeader(alg, x5t, kid if isinstance(kid, str) else None)


def _algs_for(key: Any) -> frozenset[str]:
    profile = find_profile(key)
    return profile.jws_algs if profile is not None else frozenset()


def _deserialize(token: str, public: Any, alg: str) -> bytes:
    """joserfc verification of ``token`` under exactly ``alg`` with ``public``; the payload."""
    jwk = profile_of(public).import_jose(public)
    with warnings.catch_warnings():
        # "EdDSA" is what wallets send today; RFC 9864's deprecation is not a reason to refuse it.
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        return bytes(jws.deserialize_compact(token, jwk, algorithms=[alg]).payload)


def verify_signed(token: str, alg: str, certificate: x509.Certificate) -> bytes:
    """Verify the JWS with the certificate's key, requiring ``alg`` to fit that key; the payload."""
    public = certificate.public_key()
    if alg not in _algs_for(public):
        raise InvalidTokenAlgorithmError(f"alg {alg} does not match the bound key")
    try:
        return _deserialize(token, public, alg)
    except BadSignatureError as err:
        raise InvalidTokenSignatureError("the token signature does not verify with the bound key") from err
    except (JoseError, ValueError) as err:
        raise InvalidWlaTokenError("the wallet token could not be verified") from err


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidWlaTokenError(f"the token must carry a numeric {name} claim")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidWlaTokenError(f"the token's {name} claim is out of range") from None
    # json reads NaN and Infinity; NaN fails every comparison and would slip past the time checks.
    if not math.isfinite(number):
        raise InvalidWlaTokenError(f"the token's {name} claim must be a finite number")
    return number


def replay_key(token: str) -> str:
    """What makes a token without a jti single-use: the SHA-256 of its signing input (header and payload).

    Not of the whole token: an ECDSA signature can be re-encoded (s -> n - s) and a PSS or EdDSA signer
    may sign the same claims again with another signature; neither must make a used token new again.
    """
    signing_input = token.rpartition(".")[0].encode("ascii")
    return "sha256:" + hashlib.sha256(signing_input).hexdigest()


def check_claims(
    payload: bytes, *, subject: str | Callable[[str], bool], rules: TokenRules, now: datetime
) -> VerifiedToken:
    """sub, aud, iat, exp (bounded lifetime), nbf and jti, with the configured clock skew.

    ``subject`` is the expected sub, or a test of it (the request's individual or one of its aliases)."""
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError) as err:
        raise InvalidWlaTokenError("the token payload is not JSON") from err
    if not isinstance(claims, dict):
        raise InvalidWlaTokenError("the token payload must be a JSON object")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not (subject(sub) if callable(subject) else sub == subject):
        raise InvalidTokenSubjectError("the token subject is not this individual")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if rules.audience not in audiences:
        raise InvalidTokenAudienceError("the token audience is not the expected one")
    iat, exp = _number(claims, "iat"), _number(claims, "exp")
    now_s = now.timestamp()
    skew = rules.skew_seconds
    if iat > now_s + skew or ("nbf" in claims and _number(claims, "nbf") > now_s + skew):
        raise TokenNotYetValidError("the token is issued in the future")
    if exp <= iat:
        raise InvalidWlaTokenError("the token expires before it is issued")
    if exp - iat > rules.max_lifetime_seconds:
        raise TokenLifetimeTooLongError(f"a wallet token may live at most {rules.max_lifetime_seconds} s")
    if exp + skew <= now_s:
        raise TokenExpiredError("the token has expired")
    if iat + rules.max_lifetime_seconds + skew < now_s:
        raise TokenExpiredError("the token was issued too long ago")
    for name in rules.required_text_claims:
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidWlaTokenError(f"the token must carry a non-empty {name} claim")
    jti = claims.get("jti")
    if (jti is not None or rules.require_jti) and (not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS):
        raise InvalidWlaTokenError(f"the token must carry a jti of 1 to {MAX_JTI_CHARS} characters")
    return VerifiedToken(
        jti=jti if isinstance(jti, str) else "",
        issued_at=datetime.fromtimestamp(iat, UTC),
        expires_at=datetime.fromtimestamp(exp, UTC) + timedelta(seconds=skew),
        claims=claims,
    )


def verify_possession(proof: str, public_key: Any, *, audience: str) -> str:
    """Check a proof-of-possession JWS signed by the key being bound; returns its nonce.

    The payload is ``{"nonce": ..., "aud": ...}``; the caller checks that the nonce is one the
    server issued (an OTP transaction id or a GetBindingNonce value) for this individual.
    """
    if not isinstance(proof, str) or not 16 <= len(proof) <= MAX_TOKEN_CHARS or proof.count(".") != 2:
        raise InvalidProofOfPossessionError("the proof of possession must be a compact JWS")
    try:
        alg = jws.extract_compact(proof.encode("ascii")).headers().get("alg")
    except (JoseError, ValueError, UnicodeError) as err:
        raise InvalidProofOfPossessionError("the proof of possession is not a well-formed compact JWS") from err
    if not isinstance(alg, str) or alg not in _algs_for(public_key):
        raise InvalidProofOfPossessionError("the proof's alg does not match the key being bound")
    try:
        claims = json.loads(_deserialize(proof, public_key, alg))
    except (JoseError, ValueError, RecursionError) as err:
        raise InvalidProofOfPossessionError("the proof of possession is not signed by the key being bound") from err
    if not isinstance(claims, dict) or not isinstance(claims.get("nonce"), str) or claims.get("aud") != audience:
        raise InvalidProofOfPossessionError("the proof must carry the server's nonce and audience")
    return str(claims["nonce"])
