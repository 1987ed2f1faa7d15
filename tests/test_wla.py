"""Wallet Local Authentication through the real gRPC server: VerifyWalletToken, replay cache, WLA challenges."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import WalletPrivateKey, new_wallet_key
from server.service import b64url
from server.stores.sqlite import ts
from server.wla import TokenRules
from tests.conftest import (
    PARTNER,
    Person,
    RpcFailure,
    RunningServer,
    bind_request,
    failure,
    jose_key,
    md,
    new_person,
    otp_challenge,
    send_otp,
    unregistered,
)

DOMAIN = "keybinder"
AUDIENCE = "keybinder"
OTHER_PARTNER = "other-partner"
SKEW_SECONDS = 30
MAX_LIFETIME_SECONDS = 300

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND

Claims = dict[str, Any]
Payload = Claims | bytes


# -- helpers ------------------------------------------------------------------------------


def payload_bytes(payload: Payload) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def sign(private: WalletPrivateKey, alg: str, thumbprint: str | None, payload: Payload, **header: Any) -> str:
    """A compact JWS signed by joserfc, as a wallet makes it; ``thumbprint`` None leaves x5t#S256 out."""
    protected: dict[str, Any] = {"alg": alg, **header}
    if thumbprint is not None:
        protected["x5t#S256"] = thumbprint
    with warnings.catch_warnings():
        # joserfc flags the "EdDSA" name as deprecated (RFC 9864); wallets still send it.
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        return jws.serialize_compact(protected, payload_bytes(payload), jose_key(private), algorithms=[alg])


def raw_token(header: dict[str, Any] | bytes, payload: Payload, signature: bytes = b"\x01" * 64) -> str:
    """A hand-made compact serialization (no JOSE library), for tokens no library would produce."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return f"{b64url(head)}.{b64url(payload_bytes(payload))}.{b64url(signature)}"


def hmac_token(alg: str, secret: bytes, x5t: str, payload: Payload) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url(json.dumps({'alg': alg, 'x5t#S256': x5t}).encode())}.{b64url(payload_bytes(payload))}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), digest).digest())}"


def claims(sub: str, *, iat: int = 0, lifetime: int = 60, aud: Any = AUDIENCE, jti: str | None = None) -> Claims:
    """Valid WLA claims; ``iat`` is an offset in seconds from now."""
    issued = int(time.time()) + iat
    return {"sub": sub, "aud": aud, "iat": issued, "exp": issued + lifetime, "jti": jti or str(uuid.uuid4())}


def without(c: Claims, name: str) -> Claims:
    return {k: v for k, v in c.items() if k != name}


@dataclass(frozen=True)
class Wallet:
    """A person's wallet key and the binding DoKeyBinding returned for it."""

    person: Person
    private: WalletPrivateKey
    jwk: str
    bound: pb.DoKeyBindingResponse

    @property
    def alg(self) -> str:
        if isinstance(self.private, ec.EllipticCurvePrivateKey):
            return "ES256" if isinstance(self.private.curve, ec.SECP256R1) else "ES384"
        return "RS256" if isinstance(self.private, rsa.RSAPrivateKey) else "EdDSA"

    @property
    def thumbprint(self) -> str:
        return str(self.bound.thumbprint)

    def token(self, payload: Payload | None = None, *, alg: str | None = None, **header: Any) -> str:
        """A token signed by this wallet's key naming its certificate; valid claims unless given."""
        body = claims(self.person.individual_id) if payload is None else payload
        return sign(self.private, alg or self.alg, self.thumbprint, body, **header)


def bind(
    kb: RunningServer,
    person: Person,
    kind: str = "ec-p256",
    partner: str = PARTNER,
    *challenges: pb.AuthChallenge,
) -> Wallet:
    """Bind a fresh key of ``kind``; authenticated by a fresh OTP unless challenges are given."""
    private, jwk = new_wallet_key(kind)
    given = challenges or (otp_challenge(send_otp(kb, person, partner)[1]),)
    resp: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(bind_request(person, jwk, *given), metadata=md(partner))
    return Wallet(person, private, jwk, resp)


def verify(
    kb: RunningServer, token: str, individual_id: str, *, audience: str = "", partner: str = PARTNER
) -> pb.VerifyWalletTokenResponse:
    req = pb.VerifyWalletTokenRequest(token=token, individual_id=individual_id, expected_audience=audience)
    resp: pb.VerifyWalletTokenResponse = kb.stub.VerifyWalletToken(req, metadata=md(partner))
    return resp


def assert_no_leak(f: RpcFailure, token: str, *values: str) -> None:
    """The status message repeats neither the token (nor any of its parts) nor the values given."""
    for value in (token, *token.split("."), *values):
        if len(value) >= 4:
            assert value not in f.message, f"the status message {f.message!r} echoes a value from the request"


def jti_of(token: str) -> str:
    try:
        value = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return value if isinstance(value, str) else ""


def refused(
    kb: RunningServer,
    token: str,
    individual_id: str,
    code: grpc.StatusCode,
    reason: str,
    *,
    audience: str = "",
    partner: str = PARTNER,
) -> RpcFailure:
    """VerifyWalletToken must fail with this code and reason, leak nothing and record no jti."""
    jtis = kb.app.store.count_rows("wla_jtis")
    f = failure(lambda: verify(kb, token, individual_id, audience=audience, partner=partner))
    assert (f.code, f.reason, f.domain) == (code, reason, DOMAIN), f
    assert_no_leak(f, token, individual_id, jti_of(token))
    assert kb.app.store.count_rows("wla_jtis") == jtis
    return f


def assert_verified(resp: pb.VerifyWalletTokenResponse, wallet: Wallet, jti: str) -> None:
    assert resp.valid is True
    assert resp.partner_specific_user_token == wallet.bound.partner_specific_user_token
    assert resp.thumbprint == wallet.thumbprint
    assert resp.jti == jti
    assert resp.binding_expires_at == wallet.bound.expires_at


def binding_rows(kb: RunningServer) -> tuple[int, int]:
    return kb.app.store.count_rows("bindings"), kb.app.store.count_rows("wallet_keys")


@contextmanager
def no_new_rows(kb: RunningServer) -> Iterator[None]:
    before = binding_rows(kb)
    yield
    assert binding_rows(kb) == before


def wla_challenge(token: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type="WLA", format="jwt", challenge=token)


def binding_status(kb: RunningServer, thumbprint: str) -> int:
    resp: pb.GetBindingResponse = kb.stub.GetBinding(pb.GetBindingRequest(thumbprint=thumbprint), metadata=md())
    return int(resp.status)


def assert_bind_auth_failed(kb: RunningServer, person: Person, token: str) -> None:
    """A DoKeyBinding whose only challenge is ``token`` fails with auth_failed and writes no row."""
    _, jwk = new_wallet_key("ec-p256")
    with no_new_rows(kb):
        f = failure(lambda: kb.stub.DoKeyBinding(bind_request(person, jwk, wla_challenge(token)), metadata=md()))
    assert (f.code, f.reason, f.domain) == (UNAUTHENTICATED, "auth_failed", DOMAIN), f
    assert_no_leak(f, token, person.individual_id, jti_of(token))


def set_binding_expiry(kb: RunningServer, thumbprint: str, when: datetime) -> None:
    with closing(sqlite3.connect(kb.app.settings.database_path, timeout=5)) as conn, conn:
        cur = conn.execute("UPDATE bindings SET expires_at = ? WHERE cert_thumbprint = ?", (ts(when), thumbprint))
        assert cur.rowcount == 1


def jti_rows(kb: RunningServer, jti: str) -> list[tuple[bytes, str]]:
    with closing(sqlite3.connect(kb.app.settings.database_path, timeout=5)) as conn:
        rows = conn.execute("SELECT id_hmac, expires_at FROM wla_jtis WHERE jti = ?", (jti,)).fetchall()
    return [(bytes(r[0]), str(r[1])) for r in rows]


# -- every wallet key type: valid once, then replayed -------------------------------------

KEY_TYPES = [
    pytest.param("ec-p256", "ES256", id="P256-ES256"),
    pytest.param("ec-p384", "ES384", id="P384-ES384"),
    pytest.param("rsa-2048", "RS256", id="RSA2048-RS256"),
    pytest.param("rsa-2048", "PS256", id="RSA2048-PS256"),
    pytest.param("ed25519", "EdDSA", id="Ed25519-EdDSA"),
    pytest.param("ed25519", "Ed25519", id="Ed25519-Ed25519"),
]


@pytest.mark.parametrize(("kind", "alg"), KEY_TYPES)
def test_token_verifies_once_then_is_replayed(kb: RunningServer, person: Person, kind: str, alg: str) -> None:
    wallet = bind(kb, person, kind)
    c = claims(person.individual_id)
    token = wallet.token(c, alg=alg)
    jtis = kb.app.store.count_rows("wla_jtis")

    resp = verify(kb, token, person.individual_id)

    assert_verified(resp, wallet, c["jti"])
    assert resp.token_expires_at.ToDatetime(tzinfo=UTC) >= datetime.fromtimestamp(c["exp"], UTC)
    assert kb.app.store.count_rows("wla_jtis") == jtis + 1
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "token_replayed")


def test_kid_header_is_optional_and_not_trusted(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    assert_verified(verify(kb, wallet.token(c, kid="some-other-key"), person.individual_id), wallet, c["jti"])


# -- x5t#S256 -----------------------------------------------------------------------------


def test_thumbprint_of_another_persons_certificate_is_a_mismatch(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    other = bind(kb, new_person(kb))
    token = sign(wallet.private, "ES256", other.thumbprint, claims(person.individual_id))
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "sha256_thumbprint_mismatch")
    # The other person's own correctly signed token also fails against this individual's binding.
    foreign = other.token(claims(person.individual_id))
    refused(kb, foreign, person.individual_id, UNAUTHENTICATED, "sha256_thumbprint_mismatch")


def test_random_thumbprint_is_a_mismatch(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    token = sign(wallet.private, "ES256", b64url(secrets.token_bytes(32)), claims(person.individual_id))
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "sha256_thumbprint_mismatch")


@pytest.mark.parametrize(
    "header",
    [pytest.param({}, id="absent"), pytest.param({"x5t#S256": ""}, id="empty")],
)
def test_missing_thumbprint_header(kb: RunningServer, person: Person, header: dict[str, str]) -> None:
    wallet = bind(kb, person)
    token = sign(wallet.private, "ES256", None, claims(person.individual_id), **header)
    refused(kb, token, person.individual_id, INVALID, "sha256_thumbprint_header_missing")


def test_sha1_thumbprint_header_does_not_replace_x5t_s256(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    token = sign(wallet.private, "ES256", None, claims(person.individual_id), x5t=wallet.thumbprint[:27])
    refused(kb, token, person.individual_id, INVALID, "sha256_thumbprint_header_missing")


@pytest.mark.parametrize(
    "x5t",
    [
        pytest.param("abc", id="too-short"),
        pytest.param("A" * 44, id="44-chars"),
        pytest.param(12345, id="number"),
        pytest.param(["A" * 43], id="list"),
    ],
)
def test_malformed_thumbprint_header(kb: RunningServer, person: Person, x5t: object) -> None:
    header = {"alg": "ES256", "x5t#S256": x5t}
    token = raw_token(header, claims(person.individual_id))
    refused(kb, token, person.individual_id, INVALID, "invalid_wla_token")


# -- signature and algorithm ---------------------------------------------------------------


def test_token_signed_by_another_key_with_the_right_thumbprint(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    attacker, _ = new_wallet_key("ec-p256")
    token = sign(attacker, "ES256", wallet.thumbprint, claims(person.individual_id))
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "invalid_token_signature")


def test_key_embedded_in_the_header_is_not_trusted(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    attacker, attacker_jwk = new_wallet_key("ec-p256")
    token = sign(attacker, "ES256", wallet.thumbprint, claims(person.individual_id), jwk=json.loads(attacker_jwk))
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "invalid_token_signature")


def test_tampered_payload_fails_the_signature(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    other = new_person(kb)
    head, _, sig = wallet.token(claims(other.individual_id)).split(".")
    forged = f"{head}.{b64url(json.dumps(claims(person.individual_id)).encode())}.{sig}"
    refused(kb, forged, person.individual_id, UNAUTHENTICATED, "invalid_token_signature")


@pytest.mark.parametrize("alg", [pytest.param("none", id="none"), pytest.param("None", id="None-capitalised")])
@pytest.mark.parametrize(
    "signature", [pytest.param(b"", id="empty-signature"), pytest.param(b"\x00" * 64, id="junk-signature")]
)
def test_alg_none_is_refused(kb: RunningServer, person: Person, alg: str, signature: bytes) -> None:
    wallet = bind(kb, person)
    token = raw_token({"alg": alg, "x5t#S256": wallet.thumbprint}, claims(person.individual_id), signature)
    refused(kb, token, person.individual_id, INVALID, "invalid_token_algorithm")


def public_pem(private: WalletPrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


HMAC_SECRETS = [
    pytest.param("HS256", lambda w: public_pem(w.private), id="HS256-public-pem"),
    pytest.param("HS256", lambda w: w.jwk.encode(), id="HS256-public-jwk"),
    pytest.param("HS512", lambda w: public_pem(w.private), id="HS512-public-pem"),
]


@pytest.mark.parametrize(("alg", "secret_of"), HMAC_SECRETS)
def test_hmac_with_the_public_key_as_secret_is_refused(
    kb: RunningServer, person: Person, alg: str, secret_of: Callable[[Wallet], bytes]
) -> None:
    wallet = bind(kb, person)
    token = hmac_token(alg, secret_of(wallet), wallet.thumbprint, claims(person.individual_id))
    refused(kb, token, person.individual_id, INVALID, "invalid_token_algorithm")


@pytest.mark.parametrize(
    ("bound_kind", "alg", "signer_kind"),
    [
        pytest.param("ec-p256", "ES384", "ec-p384", id="ES384-on-P256"),
        pytest.param("ec-p384", "ES256", "ec-p256", id="ES256-on-P384"),
        pytest.param("ec-p256", "RS256", "rsa-2048", id="RS256-on-P256"),
        pytest.param("rsa-2048", "ES256", "ec-p256", id="ES256-on-RSA"),
        pytest.param("ec-p256", "EdDSA", "ed25519", id="EdDSA-on-P256"),
        pytest.param("ed25519", "PS256", "rsa-2048", id="PS256-on-Ed25519"),
    ],
)
def test_alg_not_matching_the_bound_key_is_refused(
    kb: RunningServer, person: Person, bound_kind: str, alg: str, signer_kind: str
) -> None:
    wallet = bind(kb, person, bound_kind)
    signer, _ = new_wallet_key(signer_kind)
    token = sign(signer, alg, wallet.thumbprint, claims(person.individual_id))
    refused(kb, token, person.individual_id, INVALID, "invalid_token_algorithm")


@pytest.mark.parametrize("alg", [pytest.param("ES512", id="ES512"), pytest.param("RS512", id="RS512")])
def test_alg_outside_the_allowed_set_is_refused(kb: RunningServer, person: Person, alg: str) -> None:
    wallet = bind(kb, person)
    token = raw_token({"alg": alg, "x5t#S256": wallet.thumbprint}, claims(person.individual_id))
    refused(kb, token, person.individual_id, INVALID, "invalid_token_algorithm")


# -- audience and subject ------------------------------------------------------------------


@pytest.mark.parametrize(
    "aud",
    [
        pytest.param("other-rp", id="other-string"),
        pytest.param(["rp-1", "rp-2"], id="list-without-keybinder"),
        pytest.param("KEYBINDER", id="upper-case"),
        pytest.param(None, id="null"),
    ],
)
def test_wrong_audience_is_refused(kb: RunningServer, person: Person, aud: Any) -> None:
    wallet = bind(kb, person)
    refused(
        kb,
        wallet.token(claims(person.individual_id, aud=aud)),
        person.individual_id,
        UNAUTHENTICATED,
        "invalid_token_audience",
    )


def test_missing_audience_is_refused(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    token = wallet.token(without(claims(person.individual_id), "aud"))
    refused(kb, token, person.individual_id, UNAUTHENTICATED, "invalid_token_audience")


def test_audience_list_containing_keybinder_is_accepted(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id, aud=["rp-1", AUDIENCE])
    assert_verified(verify(kb, wallet.token(c), person.individual_id), wallet, c["jti"])


def test_expected_audience_from_the_request(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id, aud="rp-1")
    assert_verified(verify(kb, wallet.token(c), person.individual_id, audience="rp-1"), wallet, c["jti"])
    default_aud = wallet.token(claims(person.individual_id))
    refused(kb, default_aud, person.individual_id, UNAUTHENTICATED, "invalid_token_audience", audience="rp-1")


@pytest.mark.parametrize(
    "sub",
    [
        pytest.param("other-individual", id="another-individual"),
        pytest.param(None, id="null"),
        pytest.param(123456789012, id="number"),
    ],
)
def test_wrong_subject_is_refused(kb: RunningServer, person: Person, sub: Any) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    if sub == "other-individual":
        c["sub"] = new_person(kb).individual_id
    else:
        c["sub"] = sub
    refused(kb, wallet.token(c), person.individual_id, UNAUTHENTICATED, "invalid_token_subject")


def test_numeric_subject_matching_the_id_text_is_refused(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    c["sub"] = int(person.individual_id)
    refused(kb, wallet.token(c), person.individual_id, UNAUTHENTICATED, "invalid_token_subject")


# -- time claims -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    iat: int  # seconds from now
    lifetime: int  # exp - iat
    nbf: int | None = None  # seconds from now
    code: grpc.StatusCode | None = None  # None: the token verifies
    reason: str = ""


TIMINGS = [
    pytest.param(Timing(-120, 60, code=UNAUTHENTICATED, reason="token_expired"), id="expired-beyond-skew"),
    pytest.param(Timing(-70, 60), id="expired-10s-ago-within-skew"),
    pytest.param(Timing(-400, 300, code=UNAUTHENTICATED, reason="token_expired"), id="issued-400s-ago"),
    pytest.param(Timing(60, 60, code=UNAUTHENTICATED, reason="token_not_yet_valid"), id="iat-60s-ahead"),
    pytest.param(Timing(10, 60), id="iat-10s-ahead-within-skew"),
    pytest.param(Timing(0, 60, nbf=60, code=UNAUTHENTICATED, reason="token_not_yet_valid"), id="nbf-60s-ahead"),
    pytest.param(Timing(0, 60, nbf=10), id="nbf-10s-ahead-within-skew"),
    pytest.param(Timing(0, 301, code=INVALID, reason="token_lifetime_too_long"), id="lifetime-301s"),
    pytest.param(Timing(0, 300), id="lifetime-300s"),
    pytest.param(Timing(0, 0, code=INVALID, reason="invalid_wla_token"), id="exp-equals-iat"),
    pytest.param(Timing(0, -10, code=INVALID, reason="invalid_wla_token"), id="exp-before-iat"),
]


@pytest.mark.parametrize("timing", TIMINGS)
def test_time_claims(kb: RunningServer, person: Person, timing: Timing) -> None:
    # The offsets above assume the default rules.
    assert kb.app.service.policy.wla_rules == TokenRules(AUDIENCE, SKEW_SECONDS, MAX_LIFETIME_SECONDS)
    wallet = bind(kb, person)
    c = claims(person.individual_id, iat=timing.iat, lifetime=timing.lifetime)
    if timing.nbf is not None:
        c["nbf"] = int(time.time()) + timing.nbf
    token = wallet.token(c)
    if timing.code is None:
        assert_verified(verify(kb, token, person.individual_id), wallet, c["jti"])
    else:
        refused(kb, token, person.individual_id, timing.code, timing.reason)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param(lambda c: without(c, "exp"), "invalid_wla_token", id="no-exp"),
        pytest.param(lambda c: without(c, "iat"), "invalid_wla_token", id="no-iat"),
        pytest.param(lambda c: without(c, "jti"), "invalid_wla_token", id="no-jti"),
        pytest.param(lambda c: without(c, "sub"), "invalid_token_subject", id="no-sub"),
        pytest.param(lambda c: {**c, "iat": str(c["iat"])}, "invalid_wla_token", id="iat-as-string"),
        pytest.param(lambda c: {**c, "exp": True}, "invalid_wla_token", id="exp-as-bool"),
        pytest.param(lambda c: {**c, "exp": None}, "invalid_wla_token", id="exp-null"),
        pytest.param(lambda c: {**c, "jti": ""}, "invalid_wla_token", id="jti-empty"),
        pytest.param(lambda c: {**c, "jti": 42}, "invalid_wla_token", id="jti-number"),
        pytest.param(lambda c: {**c, "jti": "j" * 257}, "invalid_wla_token", id="jti-257-chars"),
    ],
)
def test_missing_or_mistyped_claims(
    kb: RunningServer, person: Person, change: Callable[[Claims], Claims], reason: str
) -> None:
    wallet = bind(kb, person)
    code = UNAUTHENTICATED if reason == "invalid_token_subject" else INVALID
    refused(kb, wallet.token(change(claims(person.individual_id))), person.individual_id, code, reason)


def test_jti_of_256_chars_is_accepted(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id, jti="j" * 256)
    assert_verified(verify(kb, wallet.token(c), person.individual_id), wallet, c["jti"])


def raw_number_claims(person: Person, **literals: str) -> bytes:
    """Valid claims JSON whose named members are raw number literals ("now" and "now+60" are filled in).

    Python's json module reads NaN, Infinity and integers too large for a float; a wallet (or
    whoever holds its key) can sign such a payload.
    """
    now = int(time.time())
    c = claims(person.individual_id)
    c["iat"], c["exp"] = "now", "now+60"
    body = {**c, **literals}
    values = {"now": str(now), "now+60": str(now + 60)}
    members = [
        f"{json.dumps(k)}: {values.get(v, v) if k in {'iat', 'exp', 'nbf'} else json.dumps(v)}" for k, v in body.items()
    ]
    return ("{" + ", ".join(members) + "}").encode()


NON_FINITE = [
    pytest.param({"exp": "NaN"}, id="exp-NaN"),
    pytest.param({"iat": "NaN"}, id="iat-NaN"),
    pytest.param({"nbf": "NaN"}, id="nbf-NaN"),
    pytest.param({"exp": "1" + "0" * 400}, id="exp-huge-integer"),
    pytest.param({"iat": "1" + "0" * 400}, id="iat-huge-integer"),
]


@pytest.mark.parametrize("literals", NON_FINITE)
def test_non_finite_or_huge_time_claims_are_refused(
    kb: RunningServer, person: Person, literals: dict[str, str]
) -> None:
    wallet = bind(kb, person)
    token = wallet.token(raw_number_claims(person, **literals))
    refused(kb, token, person.individual_id, INVALID, "invalid_wla_token")


@pytest.mark.parametrize(
    ("literals", "code", "reason"),
    [
        pytest.param({"exp": "Infinity"}, INVALID, "token_lifetime_too_long", id="exp-Infinity"),
        pytest.param({"iat": "-Infinity"}, INVALID, "token_lifetime_too_long", id="iat-minus-Infinity"),
        pytest.param({"iat": "Infinity"}, UNAUTHENTICATED, "token_not_yet_valid", id="iat-Infinity"),
    ],
)
def test_infinite_time_claims_are_refused(
    kb: RunningServer, person: Person, literals: dict[str, str], code: grpc.StatusCode, reason: str
) -> None:
    wallet = bind(kb, person)
    token = wallet.token(raw_number_claims(person, **literals))
    f = failure(lambda: verify(kb, token, person.individual_id))
    # Non-finite numbers are refused up front as malformed.
    assert (f.code, f.reason, f.domain) == (INVALID, "invalid_wla_token", DOMAIN), f
    assert_no_leak(f, token, person.individual_id)


def test_fractional_time_claims_are_accepted(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    now = time.time()
    c = {**claims(person.individual_id), "iat": now - 0.5, "exp": now + 59.5}
    assert_verified(verify(kb, wallet.token(c), person.individual_id), wallet, c["jti"])


def test_wla_challenge_with_nan_exp_is_auth_failed(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    assert_bind_auth_failed(kb, person, wallet.token(raw_number_claims(person, exp="NaN")))


# -- malformed tokens ------------------------------------------------------------------------

_HEADER = {"alg": "ES256", "x5t#S256": "A" * 43}
_CLAIMS: Claims = {"sub": "000000000000", "aud": AUDIENCE, "iat": 1, "exp": 2, "jti": "x" * 40}

MALFORMED = [
    pytest.param("", id="empty"),
    pytest.param("a" * 200, id="no-dots"),
    pytest.param("a" * 100 + "." + "b" * 100, id="two-parts"),
    pytest.param(raw_token(_HEADER, _CLAIMS) + ".abc", id="four-parts"),
    pytest.param("e30.e30.e30", id="too-short"),
    pytest.param(raw_token(_HEADER, _CLAIMS)[:99], id="99-chars"),
    pytest.param(raw_token(_HEADER, {**_CLAIMS, "pad": "p" * 8192}), id="over-8192-chars"),
    pytest.param("!!!!" * 30 + ".####." + "$$$$" * 10, id="bad-base64"),
    pytest.param(raw_token(b"not json at all", _CLAIMS), id="header-not-json"),
    pytest.param(raw_token(b"[1, 2]", _CLAIMS), id="header-json-array"),
    pytest.param(raw_token(b"null", _CLAIMS), id="header-json-null"),
    pytest.param(raw_token({"x5t#S256": "A" * 43}, _CLAIMS), id="header-without-alg"),
    pytest.param(raw_token({**_HEADER, "crit": ["exp"], "exp": 1}, _CLAIMS), id="unknown-crit"),
    pytest.param(raw_token(_HEADER, _CLAIMS)[:-1] + "é", id="non-ascii"),
]


@pytest.mark.parametrize("token", MALFORMED)
def test_malformed_token_is_refused(kb: RunningServer, person: Person, token: str) -> None:
    refused(kb, token, person.individual_id, INVALID, "invalid_wla_token")


def token_of_length(wallet: Wallet, c: Claims, length: int) -> str:
    """A valid token of exactly ``length`` characters (padded with an extra claim and a kid)."""
    for kid in ("k", "kk", "kkk"):  # base64url never has length 1 mod 4: vary the header too
        body = {**c, "pad": ""}
        body["pad"] = "p" * max(0, (length - len(wallet.token(body, kid=kid))) * 3 // 4 - 3)
        token = wallet.token(body, kid=kid)
        while len(token) < length:
            body["pad"] += "p"
            token = wallet.token(body, kid=kid)
        if len(token) == length:
            return token
    raise AssertionError(f"no token of {length} characters")


def test_token_of_8192_chars_verifies_and_8193_is_refused(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    assert_verified(verify(kb, token_of_length(wallet, c, 8192), person.individual_id), wallet, c["jti"])
    longer = token_of_length(wallet, claims(person.individual_id), 8193)
    refused(kb, longer, person.individual_id, INVALID, "invalid_wla_token")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1, 2, 3]" + b" " * 60, id="json-array"),
        pytest.param(b'"just a string, long enough to make the token over one hundred characters"', id="json-string"),
    ],
)
def test_signed_payload_that_is_not_a_claims_object(kb: RunningServer, person: Person, payload: bytes) -> None:
    wallet = bind(kb, person)
    refused(kb, wallet.token(payload), person.individual_id, INVALID, "invalid_wla_token")


# -- binding state ---------------------------------------------------------------------------


def test_token_for_a_superseded_binding(kb: RunningServer, person: Person) -> None:
    old = bind(kb, person)
    new = bind(kb, person, "ed25519")
    refused(kb, old.token(), person.individual_id, FAILED_PRECONDITION, "binding_superseded")
    c = claims(person.individual_id)
    assert_verified(verify(kb, new.token(c), person.individual_id), new, c["jti"])


def test_token_for_a_revoked_binding(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    _, otp = send_otp(kb, person)
    revoked: pb.RevokeBindingResponse = kb.stub.RevokeBinding(
        pb.RevokeBindingRequest(
            individual_id=person.individual_id, challenges=[otp_challenge(otp)], reason="device_lost"
        ),
        metadata=md(),
    )
    assert revoked.thumbprint == wallet.thumbprint
    refused(kb, wallet.token(), person.individual_id, FAILED_PRECONDITION, "binding_revoked")


def test_no_binding_at_all(kb: RunningServer, person: Person) -> None:
    private, _ = new_wallet_key("ec-p256")
    token = sign(private, "ES256", b64url(secrets.token_bytes(32)), claims(person.individual_id))
    refused(kb, token, person.individual_id, NOT_FOUND, "binding_not_found")


def test_unknown_individual_has_no_binding(kb: RunningServer) -> None:
    nobody = unregistered()
    private, _ = new_wallet_key("ec-p256")
    token = sign(private, "ES256", b64url(secrets.token_bytes(32)), claims(nobody.individual_id))
    refused(kb, token, nobody.individual_id, NOT_FOUND, "binding_not_found")


def test_binding_of_another_partner_is_not_found(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person, partner=OTHER_PARTNER)
    token = wallet.token()
    refused(kb, token, person.individual_id, NOT_FOUND, "binding_not_found")
    # The partner that owns the binding can verify the very same token.
    assert verify(kb, token, person.individual_id, partner=OTHER_PARTNER).thumbprint == wallet.thumbprint


def test_token_of_another_individuals_binding_is_not_found(kb: RunningServer, person: Person) -> None:
    other = bind(kb, new_person(kb))
    refused(kb, other.token(claims(person.individual_id)), person.individual_id, NOT_FOUND, "binding_not_found")


def test_token_for_an_expired_binding(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    # Simulates the clock passing the certificate's notAfter: the binding's expires_at is moved
    # into the past in the database (same text format as server/stores/sqlite.py ts()).
    set_binding_expiry(kb, wallet.thumbprint, datetime.now(UTC) - timedelta(seconds=1))
    refused(kb, wallet.token(), person.individual_id, FAILED_PRECONDITION, "binding_expired")
    assert binding_status(kb, wallet.thumbprint) == pb.BINDING_STATUS_EXPIRED


def test_binding_factor_other_than_wla_is_refused(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    req = pb.VerifyWalletTokenRequest(
        token=wallet.token(), individual_id=person.individual_id, bind_auth_factor_type="PIN"
    )
    f = failure(lambda: kb.stub.VerifyWalletToken(req, metadata=md()))
    assert (f.code, f.reason, f.domain) == (INVALID, "invalid_bind_auth_factor_type", DOMAIN)


def test_partner_header_is_required(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    token = wallet.token()
    req = pb.VerifyWalletTokenRequest(token=token, individual_id=person.individual_id)
    f = failure(lambda: kb.stub.VerifyWalletToken(req))
    assert (f.code, f.reason, f.domain) == (UNAUTHENTICATED, "required_header_missing", DOMAIN), f
    # Nothing was consumed: the token still verifies for the partner.
    assert verify(kb, token, person.individual_id).valid


@pytest.mark.parametrize(
    "individual_id", [pytest.param("", id="empty"), pytest.param("  ", id="blank"), pytest.param("a/b", id="slash")]
)
def test_malformed_individual_id_is_refused(kb: RunningServer, person: Person, individual_id: str) -> None:
    wallet = bind(kb, person)
    refused(kb, wallet.token(), individual_id, INVALID, "invalid_individual_id")


def test_overlong_expected_audience_is_refused(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    audience = "a" * 257
    token = wallet.token(claims(person.individual_id, aud=audience))
    f = refused(kb, token, person.individual_id, INVALID, "invalid_wla_token", audience=audience)
    assert audience not in f.message


# -- replay cache (in the database, shared by replicas) --------------------------------------


def test_accepted_jti_is_stored_in_the_database(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    before = kb.app.store.count_rows("wla_jtis")
    verify(kb, wallet.token(c), person.individual_id)
    assert kb.app.store.count_rows("wla_jtis") == before + 1
    ((id_hmac, expires_at),) = jti_rows(kb, c["jti"])
    assert id_hmac == kb.app.service.id_hmac(person.individual_id)
    # Kept at least until the token itself expires.
    assert expires_at >= ts(datetime.fromtimestamp(c["exp"], UTC))


def test_same_jti_in_a_newly_signed_token_is_replayed(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    first = claims(person.individual_id)
    verify(kb, wallet.token(first), person.individual_id)
    again = claims(person.individual_id, iat=-1, jti=first["jti"])
    refused(kb, wallet.token(again), person.individual_id, UNAUTHENTICATED, "token_replayed")


def test_jti_stays_used_after_rebinding(kb: RunningServer, person: Person) -> None:
    old = bind(kb, person)
    first = claims(person.individual_id)
    verify(kb, old.token(first), person.individual_id)
    new = bind(kb, person)
    again = claims(person.individual_id, jti=first["jti"])
    refused(kb, new.token(again), person.individual_id, UNAUTHENTICATED, "token_replayed")


def test_concurrent_verifications_of_one_token_accept_exactly_one(kb: RunningServer, person: Person) -> None:
    wallet = bind(kb, person)
    token = wallet.token()
    callers = 8
    barrier = threading.Barrier(callers)
    outcomes: list[pb.VerifyWalletTokenResponse | grpc.RpcError] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait(10)
        try:
            outcome: pb.VerifyWalletTokenResponse | grpc.RpcError = verify(kb, token, person.individual_id)
        except grpc.RpcError as err:
            outcome = err
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == callers
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(errors) == callers - 1
    for err in errors:
        f = failure(lambda e=err: _reraise(e))  # type: ignore[misc]
        assert (f.code, f.reason, f.domain) == (UNAUTHENTICATED, "token_replayed", DOMAIN), f


def _reraise(err: grpc.RpcError) -> NoReturn:
    raise err


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param("bad-signature", id="bad-signature"),
        pytest.param("wrong-audience", id="wrong-audience"),
        pytest.param("not-yet-valid", id="not-yet-valid"),
    ],
)
def test_refused_token_does_not_consume_its_jti(kb: RunningServer, person: Person, spoil: str) -> None:
    wallet = bind(kb, person)
    c = claims(person.individual_id)
    if spoil == "bad-signature":
        attacker, _ = new_wallet_key("ec-p256")
        bad = sign(attacker, "ES256", wallet.thumbprint, c)
        refused(kb, bad, person.individual_id, UNAUTHENTICATED, "invalid_token_signature")
    elif spoil == "wrong-audience":
        bad = wallet.token({**c, "aud": "elsewhere"})
        refused(kb, bad, person.individual_id, UNAUTHENTICATED, "invalid_token_audience")
    else:
        bad = wallet.token({**c, "iat": c["iat"] + 120, "exp": c["exp"] + 120})
        refused(kb, bad, person.individual_id, UNAUTHENTICATED, "token_not_yet_valid")
    assert jti_rows(kb, c["jti"]) == []
    assert_verified(verify(kb, wallet.token(c), person.individual_id), wallet, c["jti"])


# -- WLA as a DoKeyBinding challenge ---------------------------------------------------------


def test_rebinding_with_a_wla_challenge(kb: RunningServer, person: Person) -> None:
    k1 = bind(kb, person)
    c = claims(person.individual_id)
    jtis = kb.app.store.count_rows("wla_jtis")

    k2 = bind(kb, person, "ed25519", PARTNER, wla_challenge(k1.token(c)))

    assert k2.bound.partner_specific_user_token == k1.bound.partner_specific_user_token
    assert binding_status(kb, k1.thumbprint) == pb.BINDING_STATUS_SUPERSEDED
    assert binding_status(kb, k2.thumbprint) == pb.BINDING_STATUS_ACTIVE
    assert kb.app.store.count_rows("wla_jtis") == jtis + 1  # the challenge's jti is spent
    refused(
        kb,
        k2.token(claims(person.individual_id, jti=c["jti"])),
        person.individual_id,
        UNAUTHENTICATED,
        "token_replayed",
    )

    # The superseded key can no longer vouch for a new key.
    assert_bind_auth_failed(kb, person, k1.token())
    assert binding_status(kb, k2.thumbprint) == pb.BINDING_STATUS_ACTIVE
    # The new key can.
    k3 = bind(kb, person, "ec-p384", PARTNER, wla_challenge(k2.token()))
    assert binding_status(kb, k2.thumbprint) == pb.BINDING_STATUS_SUPERSEDED
    assert binding_status(kb, k3.thumbprint) == pb.BINDING_STATUS_ACTIVE


def test_wla_challenge_with_a_replayed_token_fails(kb: RunningServer, person: Person) -> None:
    k1 = bind(kb, person)
    token = k1.token()
    verify(kb, token, person.individual_id)
    assert_bind_auth_failed(kb, person, token)
    assert binding_status(kb, k1.thumbprint) == pb.BINDING_STATUS_ACTIVE


def test_wla_challenge_token_cannot_be_used_twice_for_binding(kb: RunningServer, person: Person) -> None:
    k1 = bind(kb, person)
    token = k1.token()
    k2 = bind(kb, person, "ec-p256", PARTNER, wla_challenge(token))
    assert_bind_auth_failed(kb, person, token)
    assert binding_status(kb, k2.thumbprint) == pb.BINDING_STATUS_ACTIVE


def test_wla_challenge_without_any_binding_fails(kb: RunningServer, person: Person) -> None:
    private, _ = new_wallet_key("ec-p256")
    token = sign(private, "ES256", b64url(secrets.token_bytes(32)), claims(person.individual_id))
    assert_bind_auth_failed(kb, person, token)


def test_wla_challenge_for_an_unknown_individual_fails(kb: RunningServer) -> None:
    nobody = unregistered()
    private, _ = new_wallet_key("ec-p256")
    token = sign(private, "ES256", b64url(secrets.token_bytes(32)), claims(nobody.individual_id))
    assert_bind_auth_failed(kb, nobody, token)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param("another-key", id="signed-by-another-key"),
        pytest.param("another-individuals-key", id="another-individuals-binding"),
        pytest.param("wrong-audience", id="wrong-audience"),
        pytest.param("expired", id="expired"),
        pytest.param("revoked", id="revoked-binding"),
        pytest.param("other-partner", id="other-partners-binding"),
    ],
)
def test_any_wla_challenge_failure_is_auth_failed(kb: RunningServer, person: Person, spoil: str) -> None:
    k1 = bind(kb, person)
    if spoil == "another-key":
        attacker, _ = new_wallet_key("ec-p256")
        token = sign(attacker, "ES256", k1.thumbprint, claims(person.individual_id))
    elif spoil == "another-individuals-key":
        token = bind(kb, new_person(kb)).token(claims(person.individual_id))
    elif spoil == "wrong-audience":
        token = k1.token(claims(person.individual_id, aud="rp-1"))
    elif spoil == "expired":
        token = k1.token(claims(person.individual_id, iat=-200))
    elif spoil == "other-partner":
        token = bind(kb, person, partner=OTHER_PARTNER).token()
    else:
        _, otp = send_otp(kb, person)
        kb.stub.RevokeBinding(
            pb.RevokeBindingRequest(individual_id=person.individual_id, challenges=[otp_challenge(otp)], reason="lost"),
            metadata=md(),
        )
        token = k1.token()
    jtis = kb.app.store.count_rows("wla_jtis")
    assert_bind_auth_failed(kb, person, token)
    assert kb.app.store.count_rows("wla_jtis") == jtis
