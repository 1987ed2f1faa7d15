"""Binding lifecycle through the real gRPC server: proof of possession, revocation, status, issuers, migration."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey
from yoyo import get_backend, read_migrations

from server.domain import Binding, BindingStatus
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import WalletPrivateKey, new_wallet_key
from server.jwk import parse_wallet_jwk
from server.service import b64url
from server.stores import sqlite as sqlite_store
from server.stores.sqlite import SqliteStore, ts
from tests.conftest import (
    PARTNER,
    POP_OFF_PARTNER,
    POP_REQUIRED_PARTNER,
    Person,
    RpcFailure,
    RunningServer,
    bind_request,
    failure,
    id_hmac,
    jose_key,
    md,
    new_person,
    other_otp,
    other_pin,
    otp_challenge,
    pin_challenge,
    send_otp,
    unregistered,
)

DOMAIN = "keybinder"
AUDIENCE = "keybinder"
OTHER_PARTNER = "lifecycle-other-wallet"
Metadata = tuple[tuple[str, str], ...]
IssuerPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

#: The JWS alg a wallet uses by default for each key kind of `server.grpc_api.demo.new_wallet_key`.
DEFAULT_ALG = {"ec-p256": "ES256", "ec-p384": "ES384", "rsa-2048": "RS256", "ed25519": "EdDSA"}


# -- helpers ------------------------------------------------------------------------------


def assert_refused(f: RpcFailure, code: grpc.StatusCode, reason: str) -> None:
    assert (f.code, f.reason, f.domain) == (code, reason, DOMAIN), f


def sign_jws(private: WalletPrivateKey, alg: str, payload: dict[str, Any] | bytes, **header: Any) -> str:
    """A compact JWS made by joserfc, as a wallet makes it."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with warnings.catch_warnings():
        # joserfc flags the "EdDSA" name as deprecated (RFC 9864); wallets still send it.
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        return jws.serialize_compact({"alg": alg, **header}, data, jose_key(private), algorithms=[alg])


def proof(private: WalletPrivateKey, nonce: str, *, alg: str | None = None, aud: str = AUDIENCE) -> str:
    """A proof of possession over ``nonce``; ``alg`` defaults to the key's usual algorithm."""
    return sign_jws(private, alg or default_alg(private), {"nonce": nonce, "aud": aud})


def default_alg(private: WalletPrivateKey) -> str:
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return "ES384" if private.curve.key_size == 384 else "ES256"
    return "RS256" if isinstance(private, rsa.RSAPrivateKey) else "EdDSA"


def raw_jws(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A hand-made compact JWS, for headers a JOSE library refuses to produce for the key."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def ecdsa_raw(private: ec.EllipticCurvePrivateKey, digest: hashes.HashAlgorithm) -> Callable[[bytes], bytes]:
    """A JOSE-style (r || s) ECDSA signer with ``digest``, whatever the curve."""
    size = (private.curve.key_size + 7) // 8

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def with_proof(req: pb.DoKeyBindingRequest, pop: str) -> pb.DoKeyBindingRequest:
    req.proof_of_possession = pop
    return req


def fingerprint(jwk: str) -> str:
    return parse_wallet_jwk(jwk).fingerprint


def bind(kb: RunningServer, req: pb.DoKeyBindingRequest, partner: str = PARTNER) -> pb.DoKeyBindingResponse:
    resp: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(req, metadata=md(partner))
    return resp


def bind_with_pin(
    kb: RunningServer, p: Person, kind: str = "ec-p256", partner: str = PARTNER
) -> pb.DoKeyBindingResponse:
    return bind(kb, bind_request(p, new_wallet_key(kind)[1], pin_challenge(p.pin)), partner)


def bind_refused(kb: RunningServer, p: Person, req: pb.DoKeyBindingRequest, partner: str) -> RpcFailure:
    """A DoKeyBinding that must fail and must leave no binding and no wallet key behind."""
    before = list(kb.app.store.bindings_for(id_hmac(kb, p), partner))
    f = failure(lambda: kb.stub.DoKeyBinding(req, metadata=md(partner)))
    assert list(kb.app.store.bindings_for(id_hmac(kb, p), partner)) == before
    assert kb.app.store.key_owner(fingerprint(req.public_key_jwk)) is None
    return f


def binding_nonce(kb: RunningServer, p: Person, partner: str = POP_REQUIRED_PARTNER) -> str:
    resp: pb.GetBindingNonceResponse = kb.stub.GetBindingNonce(
        pb.GetBindingNonceRequest(individual_id=p.individual_id), metadata=md(partner)
    )
    return resp.nonce


def get_binding(
    kb: RunningServer, partner: str = PARTNER, *, thumbprint: str = "", psut: str = ""
) -> pb.GetBindingResponse:
    req = (
        pb.GetBindingRequest(thumbprint=thumbprint)
        if thumbprint
        else pb.GetBindingRequest(partner_specific_user_token=psut)
    )
    resp: pb.GetBindingResponse = kb.stub.GetBinding(req, metadata=md(partner))
    return resp


def revoke_request(
    p: Person, *challenges: pb.AuthChallenge, reason: str = "device_lost", factor: str = ""
) -> pb.RevokeBindingRequest:
    return pb.RevokeBindingRequest(
        individual_id=p.individual_id, challenges=list(challenges), reason=reason, bind_auth_factor_type=factor
    )


def revoke(kb: RunningServer, req: pb.RevokeBindingRequest, partner: str = PARTNER) -> pb.RevokeBindingResponse:
    resp: pb.RevokeBindingResponse = kb.stub.RevokeBinding(req, metadata=md(partner))
    return resp


def active_thumbprint(kb: RunningServer, p: Person, partner: str = PARTNER) -> str | None:
    active = kb.app.store.active_binding(id_hmac(kb, p), partner, "WLA")
    return active.cert_thumbprint if active is not None else None


@contextmanager
def database(kb: RunningServer) -> Iterator[sqlite3.Connection]:
    """The server's SQLite file, opened directly (one transaction, committed on exit)."""
    with closing(sqlite3.connect(kb.app.settings.database_path, timeout=5)) as conn, conn:
        yield conn


def move_into_past(kb: RunningServer, table: str, key_column: str, key: str) -> datetime:
    """Simulate the clock passing a row's expiry: set its expires_at one second into the past."""
    statements = {
        ("bindings", "cert_thumbprint"): "UPDATE bindings SET expires_at = ? WHERE cert_thumbprint = ?",
        ("binding_nonces", "nonce"): "UPDATE binding_nonces SET expires_at = ? WHERE nonce = ?",
    }
    past = datetime.now(UTC) - timedelta(seconds=1)
    with database(kb) as conn:
        assert conn.execute(statements[table, key_column], (ts(past), key)).rowcount == 1
    return past


def when(stamp: Timestamp) -> datetime:
    """A protobuf Timestamp as an aware UTC datetime."""
    return stamp.ToDatetime(tzinfo=UTC)


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _reraise(err: grpc.RpcError) -> NoReturn:
    raise err


def wla_token(private: WalletPrivateKey, thumbprint: str, individual_id: str) -> str:
    """A WLA token as a wallet signs it with its bound key."""
    now = int(time.time())
    claims = {"sub": individual_id, "aud": AUDIENCE, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())}
    return sign_jws(private, default_alg(private), claims, **{"x5t#S256": thumbprint})


def wla_challenge(token: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type="WLA", format="jwt", challenge=token)


# -- proof of possession: partner policy "required" ---------------------------------------


def test_pop_required_missing_proof_is_refused(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    _, jwk = new_wallet_key("ec-p256")
    f = bind_refused(kb, person, bind_request(person, jwk, otp_challenge(otp)), POP_REQUIRED_PARTNER)
    assert_refused(f, INVALID, "proof_of_possession_required")
    assert kb.app.store.bindings_for(id_hmac(kb, person), POP_REQUIRED_PARTNER) == []
    # Refused before any secret is checked: no OTP attempt is charged.
    assert kb.app.store.otp_state(tx) == ("pending", 0)


def test_pop_required_correct_proof_over_otp_transaction_binds(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    resp = bind(kb, with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, tx)), POP_REQUIRED_PARTNER)
    assert resp.thumbprint == active_thumbprint(kb, person, POP_REQUIRED_PARTNER)
    assert spki(load_cert(resp.certificate).public_key()) == spki(private.public_key())
    assert kb.app.store.otp_state(tx) == ("used", 1)


@dataclass(frozen=True)
class BadProof:
    """Builds a proof that must be refused, from the wallet key and the OTP transaction id."""

    make: Callable[[WalletPrivateKey, str], str]
    #: Only a nonce check needs the individual, so only it comes after the challenges (and their attempt).
    charges_attempt: bool = False

    @property
    def otp_state(self) -> tuple[str, int]:
        return ("pending", 1 if self.charges_attempt else 0)


def _signed_by_other_key(private: WalletPrivateKey, tx: str) -> str:
    return proof(new_wallet_key("ec-p256")[0], tx)


def _other_key_named_in_jwk_header(private: WalletPrivateKey, tx: str) -> str:
    """Signed by an attacker's key that the header offers as "jwk": the server must use the bound key only."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    header_jwk = ECKey.import_key(attacker.public_key()).as_dict()
    return sign_jws(attacker, "ES256", {"nonce": tx, "aud": AUDIENCE}, jwk=header_jwk)


BAD_PROOFS = [
    pytest.param(BadProof(_signed_by_other_key), id="signed-by-another-key"),
    pytest.param(BadProof(_other_key_named_in_jwk_header), id="other-key-in-jwk-header"),
    pytest.param(BadProof(lambda k, tx: proof(k, tx, aud="someone-else")), id="wrong-aud"),
    pytest.param(BadProof(lambda k, tx: sign_jws(k, "ES256", {"nonce": tx})), id="aud-missing"),
    pytest.param(BadProof(lambda k, tx: sign_jws(k, "ES256", {"aud": AUDIENCE})), id="nonce-missing"),
    pytest.param(BadProof(lambda k, tx: sign_jws(k, "ES256", {"nonce": 1, "aud": AUDIENCE})), id="nonce-not-string"),
    pytest.param(BadProof(lambda k, tx: proof(k, secrets.token_urlsafe(24)), True), id="nonce-never-issued"),
    pytest.param(BadProof(lambda k, tx: proof(k, tx + "x"), True), id="nonce-altered"),
    pytest.param(BadProof(lambda k, tx: sign_jws(k, "ES256", b"not json")), id="payload-not-json"),
    pytest.param(BadProof(lambda k, tx: sign_jws(k, "ES256", b'["nonce"]')), id="payload-not-object"),
    pytest.param(BadProof(lambda k, tx: "garbage-that-is-no-jws"), id="not-a-jws"),
    pytest.param(BadProof(lambda k, tx: proof(k, tx)[:-8] + "AAAAAAAA"), id="signature-altered"),
]


@pytest.mark.parametrize("bad", BAD_PROOFS)
def test_pop_required_bad_proof_is_refused(kb: RunningServer, person: Person, bad: BadProof) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), bad.make(private, tx))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == bad.otp_state


def _es384_header_on_p256(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return raw_jws({"alg": "ES384"}, payload, ecdsa_raw(private, hashes.SHA384()))


def _es256_header_on_p384(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return raw_jws({"alg": "ES256"}, payload, ecdsa_raw(private, hashes.SHA256()))


def _eddsa_header_on_p256(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return raw_jws({"alg": "EdDSA"}, payload, ecdsa_raw(private, hashes.SHA256()))


def _es256_header_on_ed25519(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    return raw_jws({"alg": "ES256"}, payload, private.sign)


def _rs512_on_rsa(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    return sign_jws(private, "RS512", payload)


def _none(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    return raw_jws({"alg": "none"}, payload, lambda data: b"")


def _hs256_with_public_jwk(private: WalletPrivateKey, payload: dict[str, Any]) -> str:
    secret = json.dumps(jose_key(private).as_dict(private=False)).encode()
    return raw_jws({"alg": "HS256"}, payload, lambda data: hmac.new(secret, data, hashlib.sha256).digest())


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        pytest.param("ec-p256", _es384_header_on_p256, id="ES384-on-P256"),
        pytest.param("ec-p384", _es256_header_on_p384, id="ES256-on-P384"),
        pytest.param("ec-p256", _eddsa_header_on_p256, id="EdDSA-on-P256"),
        pytest.param("ed25519", _es256_header_on_ed25519, id="ES256-on-Ed25519"),
        pytest.param("rsa-2048", _rs512_on_rsa, id="RS512-on-RSA"),
        pytest.param("ec-p256", _none, id="none"),
        pytest.param("ec-p256", _hs256_with_public_jwk, id="HS256-public-jwk-as-secret"),
    ],
)
def test_pop_alg_not_matching_the_key_is_refused(
    kb: RunningServer, person: Person, kind: str, make: Callable[[WalletPrivateKey, dict[str, Any]], str]
) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key(kind)
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), make(private, {"nonce": tx, "aud": AUDIENCE}))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")


@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        pytest.param("ec-p256", "ES256", id="P256-ES256"),
        pytest.param("ec-p384", "ES384", id="P384-ES384"),
        pytest.param("rsa-2048", "RS256", id="RSA2048-RS256"),
        pytest.param("rsa-2048", "PS256", id="RSA2048-PS256"),
        pytest.param("ed25519", "EdDSA", id="Ed25519-EdDSA"),
        pytest.param("ed25519", "Ed25519", id="Ed25519-Ed25519"),
    ],
)
def test_pop_required_correct_proof_binds_every_key_type(
    kb: RunningServer, person: Person, kind: str, alg: str
) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key(kind)
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, tx, alg=alg))
    resp = bind(kb, req, POP_REQUIRED_PARTNER)
    status = get_binding(kb, POP_REQUIRED_PARTNER, thumbprint=resp.thumbprint)
    assert status.status == pb.BINDING_STATUS_ACTIVE
    assert spki(load_cert(status.certificate).public_key()) == spki(private.public_key())
    assert kb.app.store.key_owner(fingerprint(jwk)) == id_hmac(kb, person)


def test_pop_with_binding_nonce_binds_once(kb: RunningServer, person: Person) -> None:
    before = datetime.now(UTC)
    resp_nonce: pb.GetBindingNonceResponse = kb.stub.GetBindingNonce(
        pb.GetBindingNonceRequest(individual_id=person.individual_id), metadata=md(POP_REQUIRED_PARTNER)
    )
    nonce = resp_nonce.nonce
    assert len(nonce) >= 32
    assert before < when(resp_nonce.expires_at) <= datetime.now(UTC) + timedelta(seconds=61)

    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, nonce))
    first = bind(kb, req, POP_REQUIRED_PARTNER)
    assert first.thumbprint == active_thumbprint(kb, person, POP_REQUIRED_PARTNER)
    with database(kb) as conn:
        (used_at,) = conn.execute("SELECT used_at FROM binding_nonces WHERE nonce = ?", (nonce,)).fetchone()
    assert used_at is not None

    # The same nonce, even signed by another key of the same individual, is spent.
    private2, jwk2 = new_wallet_key("ec-p256")
    again = with_proof(bind_request(person, jwk2, pin_challenge(person.pin)), proof(private2, nonce))
    assert_refused(bind_refused(kb, person, again, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert active_thumbprint(kb, person, POP_REQUIRED_PARTNER) == first.thumbprint


def test_pop_nonce_binds_once_under_concurrency(kb: RunningServer, person: Person) -> None:
    nonce = binding_nonce(kb, person)
    keys = [new_wallet_key("ec-p256") for _ in range(6)]
    barrier = threading.Barrier(len(keys))
    outcomes: list[pb.DoKeyBindingResponse | grpc.RpcError] = []
    lock = threading.Lock()

    def attempt(private: WalletPrivateKey, jwk: str) -> None:
        req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, nonce))
        barrier.wait(10)
        try:
            outcome: pb.DoKeyBindingResponse | grpc.RpcError = bind(kb, req, POP_REQUIRED_PARTNER)
        except grpc.RpcError as err:
            outcome = err
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt, args=key) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)

    wins = [o for o in outcomes if isinstance(o, pb.DoKeyBindingResponse)]
    losses = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert (len(wins), len(losses)) == (1, len(keys) - 1)
    for err in losses:
        f = failure(lambda e=err: _reraise(e))  # type: ignore[misc]
        # Refused by the nonce check, or (lost the race) by the single-use claim at commit.
        assert (f.code, f.reason, f.domain) in {
            (INVALID, "invalid_proof_of_possession", DOMAIN),
            (UNAUTHENTICATED, "auth_failed", DOMAIN),
        }, f
    rows = kb.app.store.bindings_for(id_hmac(kb, person), POP_REQUIRED_PARTNER)
    assert [(b.status, b.cert_thumbprint) for b in rows] == [(BindingStatus.ACTIVE, wins[0].thumbprint)]


def test_pop_nonce_of_another_individual_is_refused(kb: RunningServer, person: Person) -> None:
    other = new_person(kb)
    nonce = binding_nonce(kb, other)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, nonce))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    # Not spent by the refusal: its owner can still use it.
    bind(
        kb, with_proof(bind_request(other, jwk, pin_challenge(other.pin)), proof(private, nonce)), POP_REQUIRED_PARTNER
    )


def test_pop_otp_transaction_of_another_individual_is_refused(kb: RunningServer, person: Person) -> None:
    other = new_person(kb)
    other_tx, _ = send_otp(kb, other, POP_REQUIRED_PARTNER)
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, other_tx))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(other_tx) == ("pending", 0)
    assert kb.app.store.otp_state(tx) == ("pending", 1)


def test_pop_nonce_issued_to_another_partner_is_refused(kb: RunningServer, person: Person) -> None:
    nonce = binding_nonce(kb, person, partner=PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, nonce))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")


def test_pop_expired_nonce_is_refused(kb: RunningServer, person: Person) -> None:
    nonce = binding_nonce(kb, person)
    move_into_past(kb, "binding_nonces", "nonce", nonce)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, nonce))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")


def test_pop_otp_transaction_without_the_otp_challenge_is_refused(kb: RunningServer, person: Person) -> None:
    tx, _ = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, pin_challenge(person.pin)), proof(private, tx))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == ("pending", 0)


def test_pop_transaction_of_a_replaced_otp_is_refused(kb: RunningServer, person: Person) -> None:
    old_tx, _ = send_otp(kb, person, POP_REQUIRED_PARTNER)
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, old_tx))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == ("pending", 1)


def test_refused_proof_does_not_consume_the_otp(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")

    wrong_key = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(new_wallet_key("ec-p256")[0], tx))
    assert_refused(bind_refused(kb, person, wrong_key, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == ("pending", 0)
    missing = bind_request(person, jwk, otp_challenge(otp))
    assert_refused(bind_refused(kb, person, missing, POP_REQUIRED_PARTNER), INVALID, "proof_of_possession_required")
    assert kb.app.store.otp_state(tx) == ("pending", 0)

    # Neither refusal touched the OTP: the correct request binds with its first attempt.
    resp = bind(kb, with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, tx)), POP_REQUIRED_PARTNER)
    assert resp.thumbprint == active_thumbprint(kb, person, POP_REQUIRED_PARTNER)
    assert kb.app.store.otp_state(tx) == ("used", 1)


def test_proofs_with_unknown_nonces_use_up_the_otp_attempts(kb: RunningServer, person: Person) -> None:
    # A nonce is checked against the individual only after the challenges, so each try costs an attempt.
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    for _ in range(3):
        req = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, secrets.token_urlsafe(24)))
        assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == ("pending", 3)
    correct = with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, tx))
    assert_refused(bind_refused(kb, person, correct, POP_REQUIRED_PARTNER), UNAUTHENTICATED, "auth_failed")


def test_wrong_otp_with_correct_proof_is_auth_failed(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person, POP_REQUIRED_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(other_otp(otp))), proof(private, tx))
    assert_refused(bind_refused(kb, person, req, POP_REQUIRED_PARTNER), UNAUTHENTICATED, "auth_failed")


# -- proof of possession: "optional" (default) and "off" partners --------------------------


def test_pop_optional_partner_binds_without_proof(kb: RunningServer, person: Person) -> None:
    _, otp = send_otp(kb, person)
    resp = bind(kb, bind_request(person, new_wallet_key("ec-p256")[1], otp_challenge(otp)))
    assert resp.thumbprint == active_thumbprint(kb, person)


@pytest.mark.parametrize("nonce_source", [pytest.param("otp", id="otp-transaction"), pytest.param("nonce", id="nonce")])
def test_pop_optional_partner_accepts_a_correct_proof(kb: RunningServer, person: Person, nonce_source: str) -> None:
    tx, otp = send_otp(kb, person)
    nonce = tx if nonce_source == "otp" else binding_nonce(kb, person, partner=PARTNER)
    private, jwk = new_wallet_key("ed25519")
    resp = bind(kb, with_proof(bind_request(person, jwk, otp_challenge(otp)), proof(private, nonce)))
    assert resp.thumbprint == active_thumbprint(kb, person)


@pytest.mark.parametrize("bad", BAD_PROOFS)
def test_pop_optional_partner_verifies_a_proof_when_present(kb: RunningServer, person: Person, bad: BadProof) -> None:
    tx, otp = send_otp(kb, person)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), bad.make(private, tx))
    assert_refused(bind_refused(kb, person, req, PARTNER), INVALID, "invalid_proof_of_possession")
    assert kb.app.store.otp_state(tx) == bad.otp_state


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(BadProof(lambda k, tx: "garbage"), id="garbage"),
        pytest.param(BadProof(_signed_by_other_key), id="signed-by-another-key"),
        pytest.param(BadProof(lambda k, tx: proof(k, "never-issued")), id="nonce-never-issued"),
    ],
)
def test_pop_off_partner_ignores_the_proof(kb: RunningServer, person: Person, bad: BadProof) -> None:
    tx, otp = send_otp(kb, person, POP_OFF_PARTNER)
    private, jwk = new_wallet_key("ec-p256")
    req = with_proof(bind_request(person, jwk, otp_challenge(otp)), bad.make(private, tx))
    resp = bind(kb, req, POP_OFF_PARTNER)
    assert resp.thumbprint == active_thumbprint(kb, person, POP_OFF_PARTNER)
    assert kb.app.store.otp_state(tx) == ("used", 1)


def test_get_binding_nonce_refuses_a_bad_individual_id(kb: RunningServer) -> None:
    f = failure(lambda: kb.stub.GetBindingNonce(pb.GetBindingNonceRequest(individual_id=""), metadata=md()))
    assert_refused(f, INVALID, "invalid_individual_id")


# -- metadata on the new RPCs ---------------------------------------------------------------

NewRpc = Callable[[RunningServer, Metadata], object]

NEW_RPCS: dict[str, NewRpc] = {
    "RevokeBinding": lambda kb, m: kb.stub.RevokeBinding(
        revoke_request(unregistered(), pin_challenge("123456")), metadata=m
    ),
    "GetBinding": lambda kb, m: kb.stub.GetBinding(pb.GetBindingRequest(thumbprint="x" * 43), metadata=m),
    "GetBindingNonce": lambda kb, m: kb.stub.GetBindingNonce(
        pb.GetBindingNonceRequest(individual_id="123456789012"), metadata=m
    ),
    "GetIssuerCertificates": lambda kb, m: kb.stub.GetIssuerCertificates(pb.GetIssuerCertificatesRequest(), metadata=m),
}


@pytest.mark.parametrize("rpc", list(NEW_RPCS))
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        pytest.param((), "required_header_missing", id="no-partner-id"),
        pytest.param((("partner-id", ""),), "required_header_missing", id="empty-partner-id"),
        pytest.param((("partner-id", "bad partner!"),), "invalid_partner", id="malformed-partner-id"),
    ],
)
def test_new_rpcs_require_the_partner_header(kb: RunningServer, rpc: str, metadata: Metadata, reason: str) -> None:
    assert_refused(failure(lambda: NEW_RPCS[rpc](kb, metadata)), UNAUTHENTICATED, reason)


# -- RevokeBinding --------------------------------------------------------------------------


def test_revoke_with_otp(kb: RunningServer, person: Person) -> None:
    bound = bind_with_pin(kb, person)
    tx, otp = send_otp(kb, person)
    before = datetime.now(UTC)
    resp = revoke(kb, revoke_request(person, otp_challenge(otp)))
    after = datetime.now(UTC)
    assert resp.thumbprint == bound.thumbprint
    assert before - timedelta(seconds=1) <= when(resp.revoked_at) <= after + timedelta(seconds=1)
    assert kb.app.store.otp_state(tx) == ("used", 1)
    assert active_thumbprint(kb, person) is None

    status = get_binding(kb, thumbprint=bound.thumbprint)
    assert status.status == pb.BINDING_STATUS_REVOKED
    assert status.revocation_reason == "device_lost"
    assert status.HasField("ended_at")
    assert when(status.ended_at) == when(resp.revoked_at)
    assert status.certificate == bound.certificate


def test_revoke_twice_is_binding_not_found(kb: RunningServer, person: Person) -> None:
    bind_with_pin(kb, person)
    revoke(kb, revoke_request(person, pin_challenge(person.pin)))
    tx, otp = send_otp(kb, person)
    f = failure(lambda: revoke(kb, revoke_request(person, otp_challenge(otp))))
    assert_refused(f, NOT_FOUND, "binding_not_found")
    assert kb.app.store.otp_state(tx) == ("pending", 1)


@pytest.mark.parametrize(
    "factor", [pytest.param("", id="factor-empty-means-WLA"), pytest.param("WLA", id="factor-WLA")]
)
def test_revoke_with_pin(kb: RunningServer, person: Person, factor: str) -> None:
    bound = bind_with_pin(kb, person)
    resp = revoke(kb, revoke_request(person, pin_challenge(person.pin), factor=factor, reason="x" * 200))
    assert resp.thumbprint == bound.thumbprint
    assert get_binding(kb, thumbprint=bound.thumbprint).revocation_reason == "x" * 200


def test_revoke_with_the_wallets_own_wla_token(kb: RunningServer, person: Person) -> None:
    private, jwk = new_wallet_key("ed25519")
    bound = bind(kb, bind_request(person, jwk, pin_challenge(person.pin)))
    token = wla_token(private, bound.thumbprint, person.individual_id)
    resp = revoke(kb, revoke_request(person, wla_challenge(token), reason="user_request"))
    assert resp.thumbprint == bound.thumbprint
    assert get_binding(kb, thumbprint=bound.thumbprint).status == pb.BINDING_STATUS_REVOKED


def test_revoke_with_a_superseded_keys_wla_token_fails(kb: RunningServer, person: Person) -> None:
    old_private, old_jwk = new_wallet_key("ec-p256")
    old = bind(kb, bind_request(person, old_jwk, pin_challenge(person.pin)))
    new = bind_with_pin(kb, person)
    token = wla_token(old_private, old.thumbprint, person.individual_id)
    f = failure(lambda: revoke(kb, revoke_request(person, wla_challenge(token))))
    assert_refused(f, UNAUTHENTICATED, "auth_failed")
    assert active_thumbprint(kb, person) == new.thumbprint


@pytest.mark.parametrize("wrong", [pytest.param("otp", id="wrong-otp"), pytest.param("pin", id="wrong-pin")])
def test_revoke_with_failed_challenge_keeps_the_binding(kb: RunningServer, person: Person, wrong: str) -> None:
    bound = bind_with_pin(kb, person)
    tx, otp = send_otp(kb, person)
    challenge = otp_challenge(other_otp(otp)) if wrong == "otp" else pin_challenge(other_pin(person.pin))
    assert_refused(failure(lambda: revoke(kb, revoke_request(person, challenge))), UNAUTHENTICATED, "auth_failed")
    assert active_thumbprint(kb, person) == bound.thumbprint
    assert get_binding(kb, thumbprint=bound.thumbprint).status == pb.BINDING_STATUS_ACTIVE
    assert kb.app.store.otp_state(tx) == (("pending", 1) if wrong == "otp" else ("pending", 0))


def test_revoke_for_unknown_individual_is_auth_failed(kb: RunningServer) -> None:
    f = failure(lambda: revoke(kb, revoke_request(unregistered(), pin_challenge("123456"))))
    assert_refused(f, UNAUTHENTICATED, "auth_failed")


def test_revoke_without_binding_is_not_found_and_keeps_the_otp(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    assert_refused(
        failure(lambda: revoke(kb, revoke_request(person, otp_challenge(otp)))), NOT_FOUND, "binding_not_found"
    )
    # Charged an attempt, but not consumed: the same OTP still binds.
    assert kb.app.store.otp_state(tx) == ("pending", 1)
    resp = bind(kb, bind_request(person, new_wallet_key("ec-p256")[1], otp_challenge(otp)))
    assert resp.thumbprint == active_thumbprint(kb, person)
    assert kb.app.store.otp_state(tx) == ("used", 2)


def test_revoke_cannot_reach_another_partners_binding(kb: RunningServer, person: Person) -> None:
    bound = bind_with_pin(kb, person)
    _, otp = send_otp(kb, person, OTHER_PARTNER)
    f = failure(lambda: revoke(kb, revoke_request(person, otp_challenge(otp)), OTHER_PARTNER))
    assert_refused(f, NOT_FOUND, "binding_not_found")
    assert active_thumbprint(kb, person) == bound.thumbprint


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 201, id="201-chars"),
        pytest.param("device\x00lost", id="nul"),
        pytest.param("device lost\n", id="trailing-newline"),
        pytest.param("device\tlost", id="tab"),
        pytest.param("lost\x7f", id="DEL"),
        pytest.param("appareil perdu à Paris", id="non-ascii"),
    ],
)
def test_revoke_refuses_bad_reason(kb: RunningServer, person: Person, reason: str) -> None:
    bound = bind_with_pin(kb, person)
    tx, otp = send_otp(kb, person)
    f = failure(lambda: revoke(kb, revoke_request(person, otp_challenge(otp), reason=reason)))
    assert_refused(f, INVALID, "invalid_revocation_reason")
    assert active_thumbprint(kb, person) == bound.thumbprint
    assert kb.app.store.otp_state(tx) == ("pending", 0)


def _ch(factor: str, fmt: str, value: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type=factor, format=fmt, challenge=value)


RevokeBuild = Callable[[Person, str], pb.RevokeBindingRequest]


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(lambda p, otp: revoke_request(p), "invalid_no_of_challenges", id="0-challenges"),
        pytest.param(
            lambda p, otp: revoke_request(p, *[otp_challenge(otp)] * 6), "invalid_no_of_challenges", id="6-challenges"
        ),
        pytest.param(
            lambda p, otp: revoke_request(p, _ch("FOO", "alpha-numeric", otp)),
            "invalid_auth_factor_type",
            id="factor-FOO",
        ),
        pytest.param(
            lambda p, otp: revoke_request(p, _ch("OTP", "number", otp)), "invalid_challenge_format", id="OTP-as-number"
        ),
        pytest.param(lambda p, otp: revoke_request(p, otp_challenge(otp[:5])), "invalid_challenge", id="OTP-5-chars"),
        pytest.param(
            lambda p, otp: revoke_request(p, pin_challenge(p.pin), pin_challenge(p.pin)),
            "invalid_challenge",
            id="PIN-twice",
        ),
        pytest.param(
            lambda p, otp: revoke_request(p, otp_challenge(otp), factor="PIN"),
            "invalid_bind_auth_factor_type",
            id="bind-factor-PIN",
        ),
        pytest.param(
            lambda p, otp: pb.RevokeBindingRequest(individual_id="", challenges=[otp_challenge(otp)], reason="lost"),
            "invalid_individual_id",
            id="id-empty",
        ),
    ],
)
def test_revoke_refuses_invalid_request(kb: RunningServer, person: Person, build: RevokeBuild, reason: str) -> None:
    bound = bind_with_pin(kb, person)
    tx, otp = send_otp(kb, person)
    assert_refused(failure(lambda: revoke(kb, build(person, otp))), INVALID, reason)
    assert active_thumbprint(kb, person) == bound.thumbprint
    assert kb.app.store.otp_state(tx) == ("pending", 0)


def test_binding_again_after_revocation(kb: RunningServer, person: Person) -> None:
    old = bind_with_pin(kb, person)
    revoke(kb, revoke_request(person, pin_challenge(person.pin), reason="stolen"))
    _, otp = send_otp(kb, person)
    new = bind(kb, bind_request(person, new_wallet_key("ec-p384")[1], otp_challenge(otp)))
    assert active_thumbprint(kb, person) == new.thumbprint
    assert get_binding(kb, thumbprint=new.thumbprint).status == pb.BINDING_STATUS_ACTIVE
    assert get_binding(kb, psut=new.partner_specific_user_token).thumbprint == new.thumbprint
    # The revoked binding stays revoked (a new binding supersedes only active ones).
    old_status = get_binding(kb, thumbprint=old.thumbprint)
    assert (old_status.status, old_status.revocation_reason) == (pb.BINDING_STATUS_REVOKED, "stolen")


# -- GetBinding ----------------------------------------------------------------------------


def test_get_binding_by_thumbprint_is_active(kb: RunningServer, person: Person) -> None:
    before = datetime.now(UTC)
    bound = bind_with_pin(kb, person)
    after = datetime.now(UTC)
    status = get_binding(kb, thumbprint=bound.thumbprint)
    cert = load_cert(status.certificate)
    assert status.status == pb.BINDING_STATUS_ACTIVE
    assert status.thumbprint == bound.thumbprint
    assert status.certificate == bound.certificate
    assert status.partner_specific_user_token == bound.partner_specific_user_token
    assert status.bind_auth_factor_type == "WLA"
    assert before - timedelta(seconds=1) <= when(status.created_at) <= after
    assert when(status.expires_at) == when(bound.expires_at) == cert.not_valid_after_utc
    assert not status.HasField("ended_at")
    assert status.revocation_reason == ""


def test_get_binding_after_rebinding(kb: RunningServer, person: Person) -> None:
    old = bind_with_pin(kb, person)
    new = bind_with_pin(kb, person, "ed25519")
    old_status = get_binding(kb, thumbprint=old.thumbprint)
    new_status = get_binding(kb, thumbprint=new.thumbprint)
    assert old_status.status == pb.BINDING_STATUS_SUPERSEDED
    assert old_status.HasField("ended_at")
    assert when(old_status.ended_at) == when(new_status.created_at)  # superseded at the new binding's creation
    assert old_status.revocation_reason == ""
    assert new_status.status == pb.BINDING_STATUS_ACTIVE
    assert not new_status.HasField("ended_at")

    by_psut = get_binding(kb, psut=new.partner_specific_user_token)
    assert (by_psut.status, by_psut.thumbprint) == (pb.BINDING_STATUS_ACTIVE, new.thumbprint)


def test_get_binding_by_psut_after_revocation_is_the_revoked_latest(kb: RunningServer, person: Person) -> None:
    bind_with_pin(kb, person)
    latest = bind_with_pin(kb, person)
    revoked = revoke(kb, revoke_request(person, pin_challenge(person.pin)))
    assert revoked.thumbprint == latest.thumbprint
    by_psut = get_binding(kb, psut=latest.partner_specific_user_token)
    assert (by_psut.status, by_psut.thumbprint) == (pb.BINDING_STATUS_REVOKED, latest.thumbprint)
    assert by_psut.revocation_reason == "device_lost"


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        pytest.param(pb.GetBindingRequest(), "invalid_request", id="no-selector"),
        pytest.param(pb.GetBindingRequest(bind_auth_factor_type="WLA"), "invalid_request", id="factor-only"),
        pytest.param(pb.GetBindingRequest(thumbprint=""), "invalid_request", id="empty-thumbprint"),
        pytest.param(pb.GetBindingRequest(thumbprint="t" * 65), "invalid_request", id="thumbprint-65-chars"),
        pytest.param(pb.GetBindingRequest(partner_specific_user_token="p" * 65), "invalid_request", id="psut-65-chars"),
        pytest.param(
            pb.GetBindingRequest(partner_specific_user_token="p" * 43, bind_auth_factor_type="PIN"),
            "invalid_bind_auth_factor_type",
            id="psut-factor-PIN",
        ),
    ],
)
def test_get_binding_refuses_invalid_request(kb: RunningServer, request_: pb.GetBindingRequest, reason: str) -> None:
    assert_refused(failure(lambda: kb.stub.GetBinding(request_, metadata=md())), INVALID, reason)


def test_get_binding_unknown_is_not_found(kb: RunningServer) -> None:
    unknown = b64url(secrets.token_bytes(32))
    assert_refused(failure(lambda: get_binding(kb, thumbprint=unknown)), NOT_FOUND, "binding_not_found")
    assert_refused(failure(lambda: get_binding(kb, psut=unknown)), NOT_FOUND, "binding_not_found")


def test_get_binding_of_another_partner_is_not_found(kb: RunningServer, person: Person) -> None:
    bound = bind_with_pin(kb, person)
    f = failure(lambda: get_binding(kb, OTHER_PARTNER, thumbprint=bound.thumbprint))
    assert_refused(f, NOT_FOUND, "binding_not_found")
    f = failure(lambda: get_binding(kb, OTHER_PARTNER, psut=bound.partner_specific_user_token))
    assert_refused(f, NOT_FOUND, "binding_not_found")
    assert get_binding(kb, PARTNER, thumbprint=bound.thumbprint).status == pb.BINDING_STATUS_ACTIVE


def test_get_binding_expired(kb: RunningServer, person: Person) -> None:
    bound = bind_with_pin(kb, person)
    # Simulates the passing of time: the certificate's notAfter (as stored) is now in the past.
    past = move_into_past(kb, "bindings", "cert_thumbprint", bound.thumbprint)
    status = get_binding(kb, thumbprint=bound.thumbprint)
    assert status.status == pb.BINDING_STATUS_EXPIRED
    assert when(status.expires_at) == past
    assert not status.HasField("ended_at")
    by_psut = get_binding(kb, psut=bound.partner_specific_user_token)
    assert (by_psut.status, by_psut.thumbprint) == (pb.BINDING_STATUS_EXPIRED, bound.thumbprint)


# -- GetIssuerCertificates ------------------------------------------------------------------


def jwk_public_key(jwk: dict[str, Any]) -> IssuerPublicKey:
    if jwk["kty"] == "EC":
        return ECKey.import_key(jwk).public_key
    if jwk["kty"] == "RSA":
        return RSAKey.import_key(jwk).public_key
    public = OKPKey.import_key(jwk).public_key
    assert isinstance(public, ed25519.Ed25519PublicKey)
    return public


def expected_jwk_alg(public: PublicKeyTypes) -> str:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ES384" if public.curve.key_size == 384 else "ES256"
    return "RS256" if isinstance(public, rsa.RSAPublicKey) else "EdDSA"


def verify_cert_signature(public: IssuerPublicKey, cert: x509.Certificate) -> None:
    """Raises InvalidSignature unless ``public`` signed ``cert``."""
    digest = cert.signature_hash_algorithm
    if isinstance(public, ec.EllipticCurvePublicKey):
        assert digest is not None
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(digest))
    elif isinstance(public, rsa.RSAPublicKey):
        assert digest is not None
        public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), digest)
    else:
        public.verify(cert.signature, cert.tbs_certificate_bytes)


def openssl_verify(ca_file: Path, cert_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), str(cert_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def foreign_certificate() -> x509.Certificate:
    """A self-signed certificate from no KeyBinder issuer (negative control for openssl)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a keybinder wallet")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_issuer_certificates_verify_every_wallet_certificate(kb: RunningServer, person: Person, tmp_path: Path) -> None:
    wallets = [
        load_cert(bind_with_pin(kb, person, kind).certificate) for kind in ("ec-p256", "ec-p384", "rsa-2048", "ed25519")
    ]
    issuers: pb.GetIssuerCertificatesResponse = kb.stub.GetIssuerCertificates(
        pb.GetIssuerCertificatesRequest(), metadata=md()
    )
    assert len(issuers.certificates) >= 1
    issuer_certs = [load_cert(pem) for pem in issuers.certificates]
    for cert in issuer_certs:
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    ca_file = tmp_path / "issuers.pem"
    ca_file.write_text("".join(issuers.certificates))
    for index, wallet in enumerate(wallets):
        cert_file = tmp_path / f"wallet-{index}.pem"
        cert_file.write_bytes(wallet.public_bytes(serialization.Encoding.PEM))
        result = openssl_verify(ca_file, cert_file)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{cert_file}: OK"

    foreign_file = tmp_path / "foreign.pem"
    foreign_file.write_bytes(foreign_certificate().public_bytes(serialization.Encoding.PEM))
    assert openssl_verify(ca_file, foreign_file).returncode != 0


def test_issuer_jwks_matches_the_certificates(kb: RunningServer, person: Person) -> None:
    wallet = load_cert(bind_with_pin(kb, person).certificate)
    issuers: pb.GetIssuerCertificatesResponse = kb.stub.GetIssuerCertificates(
        pb.GetIssuerCertificatesRequest(), metadata=md()
    )
    issuer_certs = [load_cert(pem) for pem in issuers.certificates]
    keys = json.loads(issuers.jwks)["keys"]
    assert len(keys) == len(issuer_certs)

    by_kid: dict[str, dict[str, Any]] = {}
    for cert in issuer_certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        kid = b64url(hashlib.sha256(der).digest())
        (jwk,) = [k for k in keys if k["kid"] == kid]
        assert jwk["x5t#S256"] == kid
        assert base64.b64decode(jwk["x5c"][0], validate=True) == der
        assert len(jwk["x5c"]) == 1
        assert jwk["use"] == "sig"
        assert jwk["alg"] == expected_jwk_alg(cert.public_key())
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk), "private members in the JWKS"
        assert spki(jwk_public_key(jwk)) == spki(cert.public_key())
        by_kid[kid] = jwk
    assert len(by_kid) == len(issuer_certs)

    (issuer,) = [c for c in issuer_certs if c.subject == wallet.issuer]
    wallet.verify_directly_issued_by(issuer)
    issuer_jwk = by_kid[b64url(hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER)).digest())]
    verify_cert_signature(jwk_public_key(issuer_jwk), wallet)
    with pytest.raises(InvalidSignature):
        verify_cert_signature(jwk_public_key(issuer_jwk), foreign_certificate())


# -- migration safety -------------------------------------------------------------------------

V1_SNAPSHOT = {
    "individuals": "SELECT id_hmac, email, phone, name, pin_hmac, created_at, updated_at"
    " FROM individuals ORDER BY rowid",
    "otps": "SELECT transaction_id, id_hmac, partner_id, otp_hmac, created_at, expires_at, attempts, max_attempts,"
    " state FROM otps ORDER BY rowid",
    "bindings": "SELECT id, id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem,"
    " cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at, superseded_at"
    " FROM bindings ORDER BY id",
    "wallet_keys": "SELECT key_fingerprint, id_hmac, created_at FROM wallet_keys ORDER BY rowid",
}
V1_HMAC = b"\x01" * 32
V1_PARTNER = "legacy-wallet"
BINDING_V1_INSERT = (
    "INSERT INTO bindings (id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem,"
    " cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at, superseded_at)"
    " VALUES (?, ?, 'WLA', 'psut-legacy', ?, ?, ?, ?, 'keybinder-issuer', ?, ?, ?, ?)"
)


def apply_v1_only(path: Path) -> None:
    backend = get_backend(f"sqlite:///{path}")
    try:
        migrations = read_migrations(sqlite_store.migrations_dir())
        v1 = migrations.filter(lambda m: m.id == "0001_initial")
        assert [m.id for m in v1] == ["0001_initial"]
        with backend.lock():
            backend.apply_migrations(backend.to_apply(v1))
    finally:
        backend.connection.close()


def fill_v1(conn: sqlite3.Connection) -> None:
    t1, t2, t3 = "2025-01-01T10:00:00.000000Z", "2025-02-01T10:00:00.000000Z", "2026-01-01T10:00:00.000000Z"
    conn.execute(
        "INSERT INTO individuals (id_hmac, email, phone, name, pin_hmac, created_at, updated_at)"
        " VALUES (?, 'legacy@example.org', '+491500000001', 'Legacy', ?, ?, ?)",
        (V1_HMAC, b"\x02" * 32, t1, t1),
    )
    conn.execute(
        "INSERT INTO otps (transaction_id, id_hmac, partner_id, otp_hmac, created_at, expires_at, attempts,"
        " max_attempts, state) VALUES ('legacy-tx', ?, ?, ?, ?, ?, 1, 3, 'pending')",
        (V1_HMAC, V1_PARTNER, b"\x03" * 32, t2, "2099-01-01T00:00:00.000000Z"),
    )
    for n, (status, superseded) in enumerate([("superseded", t2), ("active", None)], start=1):
        conn.execute(
            BINDING_V1_INSERT,
            (
                V1_HMAC,
                V1_PARTNER,
                f"fp-{n}",
                f"-----BEGIN CERTIFICATE-----\nLEGACY{n}\n-----END CERTIFICATE-----\n",
                f"thumb-{n}",
                f"{n:x}",
                status,
                t1 if n == 1 else t2,
                t3,
                superseded,
            ),
        )
        conn.execute(
            "INSERT INTO wallet_keys (key_fingerprint, id_hmac, created_at) VALUES (?, ?, ?)", (f"fp-{n}", V1_HMAC, t1)
        )


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with closing(sqlite3.connect(path)) as conn:
        return {table: conn.execute(sql).fetchall() for table, sql in V1_SNAPSHOT.items()}


def test_migration_from_v1_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    apply_v1_only(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        fill_v1(conn)
    before = snapshot(path)
    assert [len(rows) for rows in before.values()] == [1, 1, 2, 2]

    # Every migration after v1 (0001) applies, and none of them loses a row.
    assert sqlite_store.migrate(path) == len(list(Path(sqlite_store.migrations_dir()).glob("*.sql"))) - 1
    assert snapshot(path) == before
    assert sqlite_store.migrate(path) == 0

    with closing(sqlite3.connect(path)) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert {
            "wla_jtis",
            "binding_nonces",
            "bindings_by_psut",
            "bindings_one_active",
            "bindings_by_individual",
            "otps_one_pending",
        } <= names
        assert "bindings_v2" not in names
        new_columns = conn.execute("SELECT revoked_at, revocation_reason FROM bindings").fetchall()
        assert new_columns == [(None, None), (None, None)]

    store = SqliteStore(path)
    try:
        rows = store.bindings_for(V1_HMAC, V1_PARTNER)
        assert [(b.status, b.cert_thumbprint) for b in rows] == [
            (BindingStatus.SUPERSEDED, "thumb-1"),
            (BindingStatus.ACTIVE, "thumb-2"),
        ]
        assert rows[0].superseded_at == datetime(2025, 2, 1, 10, tzinfo=UTC)
        assert rows[1].expires_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
        assert store.otp_state("legacy-tx") == ("pending", 1)
        identity = store.get_identity(V1_HMAC)
        assert identity is not None
        assert (identity.email, identity.pin_hmac) == ("legacy@example.org", b"\x02" * 32)
        assert store.key_owner("fp-2") == V1_HMAC

        # A binding made after the migration gets a later id and supersedes the migrated active one.
        now = datetime.now(UTC)
        store.commit_binding(
            Binding(
                id_hmac=V1_HMAC,
                partner_id=V1_PARTNER,
                auth_factor_type="WLA",
                psut="psut-legacy",
                key_fingerprint="fp-3",
                certificate_pem="-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n",
                cert_thumbprint="thumb-3",
                serial_hex="3",
                issuer_key_label="keybinder-issuer",
                created_at=now,
                expires_at=now + timedelta(days=1),
            ),
            consume_otp=None,
            now=now,
        )
        assert [(b.status, b.cert_thumbprint) for b in store.bindings_for(V1_HMAC, V1_PARTNER)] == [
            (BindingStatus.SUPERSEDED, "thumb-1"),
            (BindingStatus.SUPERSEDED, "thumb-2"),
            (BindingStatus.ACTIVE, "thumb-3"),
        ]
    finally:
        store.close()

    # The schema itself still allows one active binding per (individual, partner, factor).
    second_active = (V1_HMAC, V1_PARTNER, "fp-4", "pem", "thumb-4", "4", "active", "t", "t", None)
    with closing(sqlite3.connect(path)) as conn:
        with pytest.raises(sqlite3.IntegrityError), conn:
            conn.execute(BINDING_V1_INSERT, second_active)
        with pytest.raises(sqlite3.IntegrityError), conn:
            conn.execute(BINDING_V1_INSERT, (*second_active[:6], "bogus", *second_active[7:]))
        with conn:  # a revoked row for the same triple is allowed by the v2 CHECK and the index
            conn.execute(BINDING_V1_INSERT, (*second_active[:6], "revoked", *second_active[7:]))
        assert conn.execute("SELECT count(*) FROM bindings WHERE status = 'active'").fetchone() == (1,)
