"""eSignet and Inji as they are, on the real server (SoftHSM) with SQLite and PostgreSQL: digit OTPs, the
esignet WLA token profile, UIN/VID aliases of one individual, and wallet key types per partner."""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from server.aliases import Alias, add_alias, revoke_alias
from server.config import Settings, load_settings
from server.enrolment import register_identity
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.provisioning import initialise
from server.service import KeyBinderService, b64url
from tests.conftest import (
    PARTNER,
    Person,
    RpcFailure,
    RunningServer,
    bind_request,
    failure,
    fresh_database,
    md,
    otp_challenge,
    pin_challenge,
    register_partner,
    running,
    send_otp,
    unregistered,
)
from tests.test_cli import DEMO_ID, kb_cli, make_data_dir
from tests.test_wla import Wallet, bind, claims, hmac_token, public_pem, raw_token, sign, verify, wla_challenge

#: Partners of the servers here: one on the esignet WLA profile, one limited to RSA keys (as eSignet is).
ESIGNET_PARTNER = "esignet-wallet"
RSA_ONLY_PARTNER = "rsa-only-wallet"
INJI_AUDIENCE = "esignet-binding"
INJI_LIFETIME_SECONDS = 18000
LOCKOUT_AFTER = 3

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
STORES = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


@contextmanager
def server_on(settings: Settings, directory: Path, store: str, **update: Any) -> Iterator[RunningServer]:
    """A real server on a database of its own (SQLite file or PostgreSQL database), the session's token."""
    database = nullcontext(f"sqlite:///{directory / 'kb.db'}") if store == "sqlite" else fresh_database("kb_esignet")
    with database as url:
        values: dict[str, Any] = {
            "database_url": url,
            "outbox_path": directory / "outbox.jsonl",
            "wla_profile_by_partner": {ESIGNET_PARTNER: "esignet"},
            "allowed_key_types_by_partner": {RSA_ONLY_PARTNER: ["RSA"]},
            "auth_failures_before_lockout": LOCKOUT_AFTER,
            **update,
        }
        own = settings.model_copy(update=values)
        initialise(own)
        with running(own) as kb:
            for partner in (ESIGNET_PARTNER, RSA_ONLY_PARTNER):
                register_partner(kb.app.store, partner)
            yield kb


@pytest.fixture(scope="module", params=STORES)
def ekb(
    request: pytest.FixtureRequest, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with server_on(settings, tmp_path_factory.mktemp(f"esignet-{request.param}"), request.param) as kb:
        yield kb


def register(kb: RunningServer, individual_id: str | None = None) -> Person:
    p = Person(
        individual_id=individual_id or f"{secrets.randbelow(10**12):012d}",
        email=f"user{secrets.token_hex(3)}@example.org",
        phone=f"+4915{secrets.randbelow(10**8):08d}",
        pin=f"{secrets.randbelow(10**6):06d}",
    )
    register_identity(
        kb.app.service, kb.app.store, individual_id=p.individual_id, email=p.email, phone=p.phone, name="E", pin=p.pin
    )
    return p


def with_vid(kb: RunningServer, expires_at: datetime | None = None) -> tuple[Person, Person]:
    """A newly registered individual (canonical ID: a UIN) with one VID; the VID as a Person of its own."""
    uin = register(kb)
    vid = Person(f"{secrets.randbelow(10**16):016d}", uin.email, uin.phone, uin.pin)
    now = datetime.now(UTC)
    add_alias(
        kb.app.service,
        kb.app.store,
        individual_id=uin.individual_id,
        alias_id=vid.individual_id,
        alias_type="VID",
        expires_at=expires_at,
        now=now,
    )
    return uin, vid


def canonical(kb: RunningServer, p: Person) -> bytes:
    return kb.app.service.id_hmac(p.individual_id)


def bind_with(kb: RunningServer, p: Person, jwk: str, *challenges: pb.AuthChallenge, partner: str = PARTNER) -> Any:
    return kb.stub.DoKeyBinding(bind_request(p, jwk, *challenges), metadata=md(partner))


def answer(f: RpcFailure) -> tuple[grpc.StatusCode, str, str, str, dict[str, str]]:
    return f.code, f.reason, f.domain, f.message, f.metadata


# -- 1. OTPs a person can type into Inji -------------------------------------------------------


def outbox_otps(kb: RunningServer) -> dict[str, str]:
    lines = kb.app.settings.outbox.read_text().splitlines()
    return {m["transaction_id"]: m["otp"] for m in map(json.loads, lines)}


def test_default_otps_are_digits_of_the_configured_length(ekb: RunningServer) -> None:
    assert (ekb.app.settings.otp_alphabet, ekb.app.settings.otp_length) == ("digits", 6)
    p = register(ekb)
    request = pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"])
    sent = [ekb.stub.SendBindingOtp(request, metadata=md()).transaction_id for _ in range(1000)]
    otps = outbox_otps(ekb)
    issued = [otps[tx] for tx in sent]
    assert len(issued) == 1000
    assert all(re.fullmatch(r"[0-9]{6}", otp) for otp in issued), [o for o in issued if not o.isdigit()][:5]
    assert {otp[i] for otp in issued for i in range(6)} == set("0123456789")  # every digit, in every place
    # The last one binds (the others were replaced by it).
    _, jwk = new_wallet_key("ec-p256")
    assert bind_with(ekb, p, jwk, otp_challenge(issued[-1])).certificate


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    ("alphabet", "length", "shape"),
    [
        pytest.param("alphanumeric", 8, r"[A-Z0-9]{8}", id="alphanumeric-8"),
        pytest.param("digits", 4, r"[0-9]{4}", id="digits-4"),
    ],
)
def test_otp_alphabet_and_length_are_configurable(
    settings: Settings, tmp_path: Path, store: str, alphabet: str, length: int, shape: str
) -> None:
    with server_on(settings, tmp_path, store, otp_alphabet=alphabet, otp_length=length) as kb:
        p = register(kb)
        request = pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"])
        sent = [kb.stub.SendBindingOtp(request, metadata=md()).transaction_id for _ in range(200)]
        otps = outbox_otps(kb)
        issued = [otps[tx] for tx in sent]
        assert all(re.fullmatch(shape, otp) for otp in issued)
        if alphabet == "alphanumeric":
            assert any(not otp.isdigit() for otp in issued), "alphanumeric OTPs carry letters too"
            # The comparison is exact: the lower case of a letter is a wrong OTP (an attempt spent).
            tx = kb.stub.SendBindingOtp(request, metadata=md()).transaction_id
            while (lettered := outbox_otps(kb)[tx]).isdigit():
                tx = kb.stub.SendBindingOtp(request, metadata=md()).transaction_id
            _, jwk = new_wallet_key("ec-p256")
            f = failure(lambda: bind_with(kb, p, jwk, otp_challenge(lettered.lower())))
            assert (f.code, f.reason) == (UNAUTHENTICATED, "auth_failed")
            assert kb.app.store.otp_state(tx) == ("pending", 1)
            sent.append(kb.stub.SendBindingOtp(request, metadata=md()).transaction_id)
            issued.append(outbox_otps(kb)[sent[-1]])
        # The shape check follows the configured length: a 6-character OTP is malformed, and spends nothing.
        _, jwk = new_wallet_key("ec-p256")
        f = failure(lambda: bind_with(kb, p, jwk, otp_challenge("123456")))
        assert (f.code, f.reason) == (INVALID, "invalid_challenge")
        assert kb.app.store.otp_state(sent[-1]) == ("pending", 0)
        assert bind_with(kb, p, jwk, otp_challenge(issued[-1])).certificate
        # The format stays eSignet's name for it.
        formats = kb.stub.GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=md()
        )
        assert list(formats.formats) == ["alpha-numeric"]


# -- 2. eSignet's WLA token profile --------------------------------------------------------------


def inji_claims(sub: str, *, iat_offset: int = 0, now: int | None = None) -> dict[str, Any]:
    """What Inji's QrLoginServices signs: iss, sub, aud, iat, exp = iat + 18000, no jti.

    RS256 is deterministic: two tokens with the same claims are the same token (a replay). A test that
    makes several passes one ``now`` and distinct offsets, so that a second boundary cannot merge two."""
    iat = (int(time.time()) if now is None else now) + iat_offset
    return {"iss": "inji-wallet", "sub": sub, "aud": INJI_AUDIENCE, "iat": iat, "exp": iat + INJI_LIFETIME_SECONDS}


def inji_token(
    wallet: Wallet, sub: str | None = None, *, iat_offset: int = 0, now: int | None = None, **changes: Any
) -> str:
    body = inji_claims(sub or wallet.person.individual_id, iat_offset=iat_offset, now=now)
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    return sign(wallet.private, "RS256", wallet.thumbprint, body)


def jti_count(kb: RunningServer) -> int:
    return kb.app.store.count_rows("wla_jtis")


def test_inji_token_verifies_once_under_esignet_then_is_replayed(ekb: RunningServer) -> None:
    p = register(ekb)
    wallet = bind(ekb, p, "rsa-2048", ESIGNET_PARTNER)
    token = inji_token(wallet)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "RS256", "x5t#S256": wallet.thumbprint}
    before = jti_count(ekb)
    resp = verify(ekb, token, p.individual_id, partner=ESIGNET_PARTNER)
    assert resp.valid
    assert resp.thumbprint == wallet.thumbprint
    assert resp.jti == ""
    assert resp.partner_specific_user_token == wallet.bound.partner_specific_user_token
    assert jti_count(ekb) == before + 1  # the token's hash is its replay key, kept until its exp
    f = failure(lambda: verify(ekb, token, p.individual_id, partner=ESIGNET_PARTNER))
    assert (f.code, f.reason) == (UNAUTHENTICATED, "token_replayed")
    assert jti_count(ekb) == before + 1


def test_inji_token_is_a_wla_challenge_once_under_esignet(ekb: RunningServer) -> None:
    p = register(ekb)
    wallet = bind(ekb, p, "rsa-2048", ESIGNET_PARTNER)
    token = inji_token(wallet)
    _, jwk = new_wallet_key("rsa-2048")
    rebound = bind_with(ekb, p, jwk, wla_challenge(token), partner=ESIGNET_PARTNER)
    assert rebound.partner_specific_user_token == wallet.bound.partner_specific_user_token
    _, again = new_wallet_key("rsa-2048")
    f = failure(lambda: bind_with(ekb, p, again, wla_challenge(token), partner=ESIGNET_PARTNER))
    assert (f.code, f.reason) == (UNAUTHENTICATED, "auth_failed")


def test_inji_token_under_strict_is_too_long_lived(ekb: RunningServer) -> None:
    p = register(ekb)
    wallet = bind(ekb, p, "rsa-2048", PARTNER)
    token = inji_token(wallet)
    f = failure(lambda: verify(ekb, token, p.individual_id, audience=INJI_AUDIENCE, partner=PARTNER))
    assert (f.code, f.reason) == (INVALID, "token_lifetime_too_long")
    _, jwk = new_wallet_key("rsa-2048")
    f = failure(lambda: bind_with(ekb, p, jwk, wla_challenge(token), partner=PARTNER))
    assert (f.code, f.reason) == (UNAUTHENTICATED, "auth_failed")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"iss": None}, id="no-iss"),
        pytest.param({"iss": ""}, id="empty-iss"),
        pytest.param({"iss": 7}, id="numeric-iss"),
        pytest.param({"jti": ""}, id="empty-jti"),
        pytest.param({"exp": "soon"}, id="text-exp"),
    ],
)
def test_esignet_profile_refuses_incomplete_claims(ekb: RunningServer, changes: dict[str, Any]) -> None:
    p = register(ekb)
    wallet = bind(ekb, p, "rsa-2048", ESIGNET_PARTNER)
    before = jti_count(ekb)
    f = failure(lambda: verify(ekb, inji_token(wallet, **changes), p.individual_id, partner=ESIGNET_PARTNER))
    assert (f.code, f.reason) == (INVALID, "invalid_wla_token")
    assert jti_count(ekb) == before


def test_esignet_profile_lifetime_cap_and_a_jti_when_given(ekb: RunningServer) -> None:
    p = register(ekb)
    wallet = bind(ekb, p, "rsa-2048", ESIGNET_PARTNER)
    iat = int(time.time())
    longer = inji_token(wallet, exp=iat + INJI_LIFETIME_SECONDS + 1, iat=iat)
    f = failure(lambda: verify(ekb, longer, p.individual_id, partner=ESIGNET_PARTNER))
    assert (f.code, f.reason) == (INVALID, "token_lifetime_too_long")
    resp = verify(ekb, inji_token(wallet, jti="wallet-jti-1"), p.individual_id, partner=ESIGNET_PARTNER)
    assert resp.jti == "wallet-jti-1"
    # A token with the same jti is a replay, however it differs otherwise.
    f = failure(
        lambda: verify(
            ekb, inji_token(wallet, jti="wallet-jti-1", iat_offset=-5), p.individual_id, partner=ESIGNET_PARTNER
        )
    )
    assert (f.code, f.reason) == (UNAUTHENTICATED, "token_replayed")


def test_a_re_encoded_signature_does_not_make_a_used_token_new(ekb: RunningServer) -> None:
    """ECDSA: (r, s) and (r, n - s) both verify. The replay key is the signing input's hash, not the token's."""
    p = register(ekb)
    wallet = bind(ekb, p, "ec-p256", ESIGNET_PARTNER)
    body = inji_claims(p.individual_id)
    token = sign(wallet.private, "ES256", wallet.thumbprint, body)
    verify(ekb, token, p.individual_id, partner=ESIGNET_PARTNER)
    head, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    flipped = f"{head}.{payload}.{b64url(r.to_bytes(32, 'big') + (n - s).to_bytes(32, 'big'))}"
    assert flipped != token
    public = wallet.private.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(utils.encode_dss_signature(r, n - s), f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    f = failure(lambda: verify(ekb, flipped, p.individual_id, partner=ESIGNET_PARTNER))
    assert (f.code, f.reason) == (UNAUTHENTICATED, "token_replayed")


def _none(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return raw_token({"alg": "none", "x5t#S256": w.thumbprint}, c, b"")


def _hs256_public_key(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return hmac_token("HS256", public_pem(w.private), w.thumbprint, c)


def _foreign_key(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    other, _ = new_wallet_key("rsa-2048")
    return sign(other, "RS256", w.thumbprint, c)


def _no_x5t(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return sign(w.private, "RS256", None, c)


def _wrong_x5t(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return sign(w.private, "RS256", b64url(secrets.token_bytes(32)), c)


def _wrong_aud(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return sign(w.private, "RS256", w.thumbprint, {**c, "aud": "another-rp"})


def _wrong_sub(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    return sign(w.private, "RS256", w.thumbprint, {**c, "sub": register(kb).individual_id})


def _superseded(w: Wallet, c: dict[str, Any], kb: RunningServer, partner: str) -> str:
    bind(kb, w.person, "rsa-2048", partner)
    return sign(w.private, "RS256", w.thumbprint, c)


STRICT_REFUSALS = [
    pytest.param(_none, (INVALID, "invalid_token_algorithm"), id="alg-none"),
    pytest.param(_hs256_public_key, (INVALID, "invalid_token_algorithm"), id="HS256-with-the-public-key"),
    pytest.param(_foreign_key, (UNAUTHENTICATED, "invalid_token_signature"), id="foreign-key"),
    pytest.param(_no_x5t, (INVALID, "sha256_thumbprint_header_missing"), id="missing-x5t"),
    pytest.param(_wrong_x5t, (UNAUTHENTICATED, "sha256_thumbprint_mismatch"), id="wrong-x5t"),
    pytest.param(_wrong_aud, (UNAUTHENTICATED, "invalid_token_audience"), id="wrong-aud"),
    pytest.param(_wrong_sub, (UNAUTHENTICATED, "invalid_token_subject"), id="wrong-sub"),
    pytest.param(_superseded, (FAILED_PRECONDITION, "binding_superseded"), id="superseded-binding"),
]


@pytest.mark.parametrize(("spoil", "expected"), STRICT_REFUSALS)
def test_every_strict_refusal_but_lifetime_and_jti_holds_under_esignet(
    ekb: RunningServer,
    spoil: Callable[[Wallet, dict[str, Any], RunningServer, str], str],
    expected: tuple[grpc.StatusCode, str],
) -> None:
    answers = {}
    for partner in (PARTNER, ESIGNET_PARTNER):
        p = register(ekb)
        wallet = bind(ekb, p, "rsa-2048", partner)
        valid = claims(p.individual_id) if partner == PARTNER else inji_claims(p.individual_id)
        token = spoil(wallet, valid, ekb, partner)
        before = jti_count(ekb)
        f = failure(functools.partial(verify, ekb, token, p.individual_id, partner=partner))
        assert jti_count(ekb) == before
        _, jwk = new_wallet_key("ec-p256")
        g = failure(functools.partial(bind_with, ekb, p, jwk, wla_challenge(token), partner=partner))
        answers[partner] = (f.code, f.reason, g.code, g.reason)
    # As a WLA challenge every one is auth_failed (or invalid_challenge: alg none's empty signature is malformed).
    assert answers[PARTNER] == answers[ESIGNET_PARTNER]
    assert answers[PARTNER][:2] == expected
    assert answers[PARTNER][3] in {"auth_failed", "invalid_challenge"}


# -- 3. UIN and VIDs: one individual, several IDs -------------------------------------------------


def test_otp_sent_through_the_uin_binds_through_the_vid(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    tx, otp = send_otp(ekb, uin)
    _, jwk = new_wallet_key("ec-p256")
    assert bind_with(ekb, vid, jwk, otp_challenge(otp)).certificate
    assert ekb.app.store.otp_state(tx) == ("used", 1)
    # One outstanding OTP per individual, whichever ID asked: the VID's OTP replaces the UIN's.
    first, _ = send_otp(ekb, uin)
    second, otp2 = send_otp(ekb, vid)
    assert ekb.app.store.otp_state(first) == ("replaced", 0)
    _, jwk2 = new_wallet_key("ec-p256")
    assert bind_with(ekb, uin, jwk2, otp_challenge(otp2)).certificate
    assert ekb.app.store.otp_state(second) == ("used", 1)


def test_uin_then_vid_rebinding_supersedes_and_keeps_the_psut(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    first = bind(ekb, uin)
    second = bind(ekb, vid, "ed25519")
    assert second.bound.partner_specific_user_token == first.bound.partner_specific_user_token
    rows = ekb.app.store.bindings_for(canonical(ekb, uin), PARTNER)
    assert [(b.cert_thumbprint, str(b.status)) for b in rows] == [
        (first.thumbprint, "superseded"),
        (second.thumbprint, "active"),
    ]
    # Another partner gets another PSUT (unlinkable), the same through either ID.
    elsewhere = bind(ekb, vid, "rsa-2048", ESIGNET_PARTNER)
    assert elsewhere.bound.partner_specific_user_token != first.bound.partner_specific_user_token
    again = bind(ekb, uin, "rsa-2048", ESIGNET_PARTNER)
    assert again.bound.partner_specific_user_token == elsewhere.bound.partner_specific_user_token
    # Audit: every entry is in the individual's one chain, whichever ID was used; none under the VID's HMAC.
    chains = {row.chain_key for row in ekb.app.store.audit_rows(None, 1_000_000)}
    assert canonical(ekb, vid) not in chains
    own = [r for r in ekb.app.store.audit_rows(None, 1_000_000) if r.chain_key == canonical(ekb, uin)]
    assert [r.action for r in own].count("do_key_binding") == 4
    assert vid.individual_id not in first.bound.certificate
    assert uin.individual_id not in second.bound.certificate


def set_psut(kb: RunningServer, thumbprint: str, psut: str) -> None:
    url = kb.app.settings.database
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(kb.app.settings.database_path, timeout=5)) as conn, conn:
            assert conn.execute("UPDATE bindings SET psut = ? WHERE cert_thumbprint = ?", (psut, thumbprint)).rowcount
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            assert pg.execute("UPDATE bindings SET psut = %s WHERE cert_thumbprint = %s", (psut, thumbprint)).rowcount


def test_a_psut_issued_before_aliases_never_changes(ekb: RunningServer) -> None:
    """Before aliases the PSUT was an HMAC of the raw ID the request named: kept from the first binding."""
    uin = register(ekb)
    service: KeyBinderService = ekb.app.service
    legacy = b64url(service.hasher.mac("psut", PARTNER, uin.individual_id))
    old = bind(ekb, uin)
    # The binding as the code before aliases made it: its PSUT over the raw ID.
    set_psut(ekb, old.thumbprint, legacy)
    vid = Person(f"{secrets.randbelow(10**16):016d}", uin.email, uin.phone, uin.pin)
    add_alias(
        service,
        ekb.app.store,
        individual_id=uin.individual_id,
        alias_id=vid.individual_id,
        alias_type="VID",
        expires_at=None,
        now=datetime.now(UTC),
    )
    assert bind(ekb, uin).bound.partner_specific_user_token == legacy
    assert bind(ekb, vid).bound.partner_specific_user_token == legacy


def test_a_wallet_token_may_name_the_individual_by_any_active_id(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    wallet = bind(ekb, uin, "rsa-2048", ESIGNET_PARTNER)
    now = int(time.time())
    assert verify(ekb, inji_token(wallet, uin.individual_id, now=now), vid.individual_id, partner=ESIGNET_PARTNER).valid
    assert verify(ekb, inji_token(wallet, vid.individual_id, now=now), uin.individual_id, partner=ESIGNET_PARTNER).valid
    assert verify(
        ekb, inji_token(wallet, vid.individual_id, iat_offset=-1, now=now), vid.individual_id, partner=ESIGNET_PARTNER
    ).valid
    stranger = register(ekb)
    f = failure(
        lambda: verify(
            ekb, inji_token(wallet, stranger.individual_id, now=now), uin.individual_id, partner=ESIGNET_PARTNER
        )
    )
    assert (f.code, f.reason) == (UNAUTHENTICATED, "invalid_token_subject")
    assert revoke_alias(ekb.app.service, ekb.app.store, alias_id=vid.individual_id, now=datetime.now(UTC))
    f = failure(
        lambda: verify(
            ekb,
            inji_token(wallet, vid.individual_id, iat_offset=-2, now=now),
            uin.individual_id,
            partner=ESIGNET_PARTNER,
        )
    )
    assert (f.code, f.reason) == (UNAUTHENTICATED, "invalid_token_subject")


def test_revoke_binding_and_binding_nonce_through_the_vid(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    wallet = bind(ekb, uin)
    _, otp = send_otp(ekb, uin)
    revoked = ekb.stub.RevokeBinding(
        pb.RevokeBindingRequest(individual_id=vid.individual_id, challenges=[otp_challenge(otp)], reason="lost"),
        metadata=md(),
    )
    assert revoked.thumbprint == wallet.thumbprint
    nonce = ekb.stub.GetBindingNonce(pb.GetBindingNonceRequest(individual_id=vid.individual_id), metadata=md())
    assert ekb.app.store.nonce_usable(nonce.nonce, canonical(ekb, uin), PARTNER, datetime.now(UTC))


def expire_or_revoke(kb: RunningServer, how: str) -> tuple[Person, Person]:
    """An individual with a VID that no longer works: revoked, or past its expiry."""
    if how == "revoked":
        uin, vid = with_vid(kb)
        assert revoke_alias(kb.app.service, kb.app.store, alias_id=vid.individual_id, now=datetime.now(UTC))
        return uin, vid
    uin = register(kb)
    vid = Person(f"{secrets.randbelow(10**16):016d}", uin.email, uin.phone, uin.pin)
    past = datetime.now(UTC) - timedelta(seconds=1)
    service = kb.app.service
    alias = Alias(service.id_hmac(vid.individual_id), service.id_hmac(uin.individual_id), "VID", past, past)
    kb.app.store.add_alias(alias)
    return uin, vid


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_dead_alias_answers_exactly_like_an_unknown_id(ekb: RunningServer, how: str) -> None:
    uin, vid = expire_or_revoke(ekb, how)
    nobody = unregistered()
    wallet = bind(ekb, uin, "rsa-2048", ESIGNET_PARTNER)

    def answers(p: Person) -> list[tuple[Any, ...]]:
        _, jwk = new_wallet_key("ec-p256")
        sent = failure(
            lambda: ekb.stub.SendBindingOtp(
                pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"]), metadata=md()
            )
        )
        bound = failure(lambda: bind_with(ekb, p, jwk, pin_challenge(uin.pin)))
        token = inji_token(wallet, p.individual_id, iat_offset=-secrets.randbelow(100))
        verified = failure(lambda: verify(ekb, token, p.individual_id, partner=ESIGNET_PARTNER))
        revoked = failure(
            lambda: ekb.stub.RevokeBinding(
                pb.RevokeBindingRequest(individual_id=p.individual_id, challenges=[pin_challenge(uin.pin)], reason="r"),
                metadata=md(),
            )
        )
        return [answer(f) for f in (sent, bound, verified, revoked)]

    dead, unknown = answers(vid), answers(nobody)
    assert dead == unknown
    assert [a[1] for a in dead] == ["send_otp_failed", "auth_failed", "binding_not_found", "auth_failed"]


class Recorder:
    """Wraps a port: every method call is logged by name (never its arguments), then forwarded."""

    def __init__(self, target: object, name: str, log: list[str]) -> None:
        self._target, self._name, self._log = target, name, log

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._log.append(f"{self._name}.{attr}")
            return value(*args, **kwargs)

        return call


PORTS = ("hasher", "aliases", "identities", "otps", "bindings", "replay", "nonces", "limit_store", "audit_log")


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_dead_alias_does_the_same_hsm_and_database_work_as_an_unknown_id(
    ekb: RunningServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Same timing class: the same HSM and store calls, in the same order, for a dead alias and an unknown ID."""
    uin, vid = expire_or_revoke(ekb, how)
    service = ekb.app.service
    log: list[str] = []
    for port in PORTS:
        monkeypatch.setattr(service, port, Recorder(getattr(service, port), port, log))

    def work(p: Person) -> list[str]:
        log.clear()
        _, jwk = new_wallet_key("ec-p256")
        with suppress(grpc.RpcError):
            ekb.stub.SendBindingOtp(
                pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"]), metadata=md()
            )
        with suppress(grpc.RpcError):
            bind_with(ekb, p, jwk, pin_challenge(uin.pin))
        ekb.stub.GetBindingNonce(pb.GetBindingNonceRequest(individual_id=p.individual_id), metadata=md())
        return list(log)

    dead, unknown = work(vid), work(unregistered())
    assert dead == unknown
    assert dead.count("hasher.mac") >= 3
    assert "aliases.resolve_individual" in dead


def test_a_lockout_reached_through_the_uin_blocks_the_vid(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    wrong = f"{(int(uin.pin) + 1) % 10**6:06d}"
    for _ in range(LOCKOUT_AFTER):
        _, jwk = new_wallet_key("ec-p256")
        f = failure(functools.partial(bind_with, ekb, uin, jwk, pin_challenge(wrong)))
        assert f.reason == "auth_failed"
    _, jwk = new_wallet_key("ec-p256")
    f = failure(lambda: bind_with(ekb, vid, jwk, pin_challenge(uin.pin)))
    assert (f.code, f.reason) == (RESOURCE_EXHAUSTED, "too_many_attempts")


def test_an_id_cannot_be_both_an_individual_and_an_alias(ekb: RunningServer) -> None:
    uin, vid = with_vid(ekb)
    other = register(ekb)
    with pytest.raises(ValueError, match="alias of a registered individual"):
        register(ekb, vid.individual_id)
    with pytest.raises(ValueError, match="registered individual's own ID"):
        add_alias(
            ekb.app.service,
            ekb.app.store,
            individual_id=uin.individual_id,
            alias_id=other.individual_id,
            alias_type="VID",
            expires_at=None,
            now=datetime.now(UTC),
        )
    from server.aliases import AliasConflict

    with pytest.raises(AliasConflict):
        add_alias(
            ekb.app.service,
            ekb.app.store,
            individual_id=other.individual_id,
            alias_id=vid.individual_id,
            alias_type="VID",
            expires_at=None,
            now=datetime.now(UTC),
        )
    for bad in ("vid", "V ID", "", "A" * 33):
        with pytest.raises(ValueError, match="upper-case word"):
            add_alias(
                ekb.app.service,
                ekb.app.store,
                individual_id=uin.individual_id,
                alias_id="123123123",
                alias_type=bad,
                expires_at=None,
                now=datetime.now(UTC),
            )


# -- 4. Key types per partner ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "ed25519"])
def test_a_key_type_the_partner_may_not_bind_is_refused_before_any_challenge(ekb: RunningServer, kind: str) -> None:
    p = register(ekb)
    tx, otp = send_otp(ekb, p, RSA_ONLY_PARTNER)
    store = ekb.app.store
    rows = (store.count_rows("bindings"), store.count_rows("wallet_keys"), store.count_rows("otps"))
    _, jwk = new_wallet_key(kind)
    f = failure(lambda: bind_with(ekb, p, jwk, otp_challenge(otp), partner=RSA_ONLY_PARTNER))
    assert (f.code, f.reason) == (INVALID, "invalid_public_key")
    assert "RSA" in f.message
    assert "EC-P256" not in f.message
    assert "Ed25519" not in f.message
    assert store.otp_state(tx) == ("pending", 0)  # no attempt spent
    assert (store.count_rows("bindings"), store.count_rows("wallet_keys"), store.count_rows("otps")) == rows
    # The same OTP, with all its attempts, binds an RSA key; the default partner takes the other type.
    _, rsa_jwk = new_wallet_key("rsa-2048")
    assert bind_with(ekb, p, rsa_jwk, otp_challenge(otp), partner=RSA_ONLY_PARTNER).certificate
    assert bind(ekb, p, kind).bound.certificate


# -- 5. The CLI: identities alias add|revoke|list and aliases in identities import ----------------------


def test_alias_commands_and_import(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    vid = "5544332211"
    added = kb_cli("identities", "alias", "add", DEMO_ID, vid, "--expires-at", "2099-01-01T00:00:00Z", data_dir=data)
    assert added.returncode == 0, added.stderr
    listed = kb_cli("identities", "alias", "list", DEMO_ID, data_dir=data)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^VID\s+active\s+2099-01-01T00:00:00Z", listed.stdout, re.M), listed.stdout
    assert vid not in listed.stdout
    assert DEMO_ID not in listed.stdout
    taken = kb_cli("identities", "add", vid, data_dir=data)
    assert taken.returncode == 1
    assert "alias" in taken.stderr
    assert "Traceback" not in taken.stderr
    assert kb_cli("identities", "alias", "revoke", vid, data_dir=data).returncode == 0
    assert re.search(r"^VID\s+revoked", kb_cli("identities", "alias", "list", DEMO_ID, data_dir=data).stdout, re.M)
    again = kb_cli("identities", "alias", "revoke", vid, data_dir=data)
    assert again.returncode == 1
    assert "already" in again.stderr
    reused = kb_cli("identities", "alias", "add", DEMO_ID, vid, data_dir=data)
    assert reused.returncode == 1
    assert "revoked" in reused.stderr
    assert "Traceback" not in reused.stderr

    people = tmp_path / "people.json"
    entry = {"individual_id": "7777777777", "email": "v@example.org", "aliases": [{"id": "888888", "type": "UIN"}]}
    people.write_text(json.dumps([entry]))
    imported = kb_cli("identities", "import", str(people), data_dir=data)
    assert imported.returncode == 0, imported.stderr
    assert re.search(
        r"^UIN\s+active\s+-", kb_cli("identities", "alias", "list", "7777777777", data_dir=data).stdout, re.M
    )
    for aliases, message in (
        ([{"id": "999999", "type": "vid"}], "upper-case"),
        ([{"id": "999999", "type": "VID", "expires_at": "2001-01-01T00:00:00Z"}], "past"),
        ([{"id": "999999", "type": "VID", "expires_at": "2099-01-01"}], "time zone"),
        ([{"id": "7777777777", "type": "VID"}], "twice"),
        ([{"id": "999999"}], "strings"),
        ({"id": "999999"}, "array"),
    ):
        people.write_text(json.dumps([{"individual_id": "6666666666"}, {**entry, "aliases": aliases}]))
        bad = kb_cli("identities", "import", str(people), data_dir=data)
        assert bad.returncode == 1, bad.stderr
        assert message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert "imported" not in bad.stdout
    # Against what is registered already: checked before the first entry is written.
    for entries, message in (
        (
            [
                {"individual_id": "6666666666"},
                {"individual_id": "5555555555", "aliases": [{"id": DEMO_ID, "type": "VID"}]},
            ],
            "own ID",
        ),
        (
            [
                {"individual_id": "6666666666"},
                {"individual_id": "5555555555", "aliases": [{"id": "888888", "type": "VID"}]},
            ],
            "another individual",
        ),
        ([{"individual_id": "6666666666"}, {"individual_id": "888888"}], "alias of a registered individual"),
    ):
        people.write_text(json.dumps(entries))
        bad = kb_cli("identities", "import", str(people), data_dir=data)
        assert bad.returncode == 1, bad.stderr
        assert message in bad.stderr, bad.stderr
    nobody = kb_cli("identities", "alias", "list", "6666666666", data_dir=data)
    assert nobody.returncode == 1
    assert "no individual" in nobody.stderr


# -- 6. The preset: examples/esignet.toml ---------------------------------------------------------------

PRESET = Path(__file__).resolve().parent.parent / "examples" / "esignet.toml"


def test_the_esignet_preset_loads_as_documented(tmp_path: Path) -> None:
    loaded = load_settings(PRESET, data_dir=tmp_path)
    policy = loaded.policy()
    assert (policy.otp_alphabet, policy.otp_length) == ("digits", 6)
    rules = policy.wla_rules_for("any-partner")
    assert (rules.audience, rules.skew_seconds, rules.max_lifetime_seconds) == ("esignet-binding", 60, 18000)
    assert (rules.require_jti, rules.required_text_claims) == (False, ("iss",))
    assert policy.key_types_for("any-partner") == frozenset({"RSA"})
    assert loaded.cert_validity_days == 90
    assert loaded.proof_of_possession != "required"


@pytest.mark.parametrize("store", STORES)
def test_the_esignet_preset_serves_inji(settings: Settings, tmp_path: Path, store: str) -> None:
    """Inji's whole path under the preset: digit OTP, RSA key bound, Inji's token once, an EC key refused."""
    preset = tomllib.loads(PRESET.read_text())
    with server_on(settings, tmp_path, store, **preset) as kb:
        uin, vid = with_vid(kb)
        tx, otp = send_otp(kb, uin)
        assert re.fullmatch(r"[0-9]{6}", otp)
        _, ec_jwk = new_wallet_key("ec-p256")
        f = failure(lambda: bind_with(kb, vid, ec_jwk, otp_challenge(otp)))
        assert (f.code, f.reason) == (INVALID, "invalid_public_key")
        assert kb.app.store.otp_state(tx) == ("pending", 0)
        private, jwk = new_wallet_key("rsa-2048")
        bound = bind_with(kb, vid, jwk, otp_challenge(otp))
        wallet = Wallet(vid, private, jwk, bound)
        cert = x509.load_pem_x509_certificate(bound.certificate.encode())
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert days == 90
        token = inji_token(wallet, vid.individual_id)
        assert verify(kb, token, vid.individual_id).valid
        f = failure(lambda: verify(kb, token, vid.individual_id))
        assert f.reason == "token_replayed"
