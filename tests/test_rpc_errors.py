"""RPC error contract through the real gRPC server: status code, ErrorInfo reason/domain, no leaks, no rows."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey

from server.domain import BindingStatus
from server.enrolment import register_identity
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.jwk import parse_wallet_jwk
from server.stores.sqlite import ts
from tests.conftest import (
    PARTNER,
    Person,
    RpcFailure,
    RunningServer,
    acceptable_pin,
    bind_request,
    failure,
    id_hmac,
    md,
    other_otp,
    other_pin,
    otp_challenge,
    pin_challenge,
    send_otp,
    unregistered,
)

OTHER_PARTNER = "other-wallet"
DOMAIN = "keybinder"
Metadata = tuple[tuple[str, str], ...]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# -- helpers ------------------------------------------------------------------------------


def assert_refused(f: RpcFailure, code: grpc.StatusCode, reason: str, *sent: str) -> None:
    """The status and ErrorInfo are as expected, and the message repeats none of the values sent."""
    assert (f.code, f.reason, f.domain) == (code, reason, DOMAIN), f
    for value in sent:
        if len(value.strip()) >= 4:  # shorter values could match the fixed wording by chance
            assert value not in f.message, f"the status message {f.message!r} echoes a value from the request"


def assert_masked_mobile(masked: str, phone: str) -> None:
    """Only the number's last four digits show, with '*' before them."""
    digits = "".join(c for c in phone if c in "0123456789")
    assert masked.endswith(digits[-4:]), masked
    assert masked[:-4], masked
    assert set(masked[:-4]) == {"*"}, masked


def new_jwk() -> str:
    return new_wallet_key("ec-p256")[1]


def fingerprint(jwk: str) -> str:
    return parse_wallet_jwk(jwk).fingerprint


def row_counts(kb: RunningServer) -> tuple[int, int]:
    return kb.app.store.count_rows("bindings"), kb.app.store.count_rows("wallet_keys")


@contextmanager
def no_new_rows(kb: RunningServer) -> Iterator[None]:
    """Nothing is written to bindings or wallet_keys inside the block."""
    before = row_counts(kb)
    yield
    assert row_counts(kb) == before


def register(kb: RunningServer, *, phone: bool | str = True, pin: bool = True) -> Person:
    """Register an individual like the `person` fixture; ``phone`` False: none, a string: that number."""
    random_number = f"+4915{secrets.randbelow(10**8):08d}"
    number = phone if isinstance(phone, str) else (random_number if phone else "")
    p = Person(
        individual_id=f"{secrets.randbelow(10**12):012d}",
        email=f"user{secrets.token_hex(3)}@example.org",
        phone=number,
        pin=acceptable_pin() if pin else "",
    )
    register_identity(
        kb.app.service,
        kb.app.store,
        individual_id=p.individual_id,
        email=p.email,
        phone=p.phone or None,
        name=None,
        pin=p.pin or None,
    )
    return p


def bind(kb: RunningServer, req: pb.DoKeyBindingRequest, partner: str = PARTNER) -> pb.DoKeyBindingResponse:
    resp: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(req, metadata=md(partner))
    return resp


def bind_failure(kb: RunningServer, req: pb.DoKeyBindingRequest, partner: str = PARTNER) -> RpcFailure:
    """A DoKeyBinding that must fail and must leave no binding and no wallet key behind."""
    with no_new_rows(kb):
        f = failure(lambda: kb.stub.DoKeyBinding(req, metadata=md(partner)))
    assert kb.app.store.key_owner(fingerprint(req.public_key_jwk)) is None
    return f


def assert_auth_failed(kb: RunningServer, req: pb.DoKeyBindingRequest, partner: str = PARTNER) -> RpcFailure:
    f = bind_failure(kb, req, partner)
    assert_refused(f, UNAUTHENTICATED, "auth_failed", req.individual_id, *(c.challenge for c in req.challenges))
    return f


def expire_otp(kb: RunningServer, transaction_id: str) -> None:
    """Simulate the clock passing the OTP's expiry: move its expires_at into the past in the database."""
    past = ts(datetime.now(UTC) - timedelta(seconds=1))
    with closing(sqlite3.connect(kb.app.settings.database_path, timeout=5)) as conn, conn:
        cur = conn.execute("UPDATE otps SET expires_at = ? WHERE transaction_id = ?", (past, transaction_id))
        assert cur.rowcount == 1


# -- metadata -------------------------------------------------------------------------------

RpcCall = Callable[[RunningServer, Person, str, Metadata], object]


def call_send_otp(kb: RunningServer, p: Person, otp: str, metadata: Metadata) -> object:
    return kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"]), metadata=metadata
    )


def call_do_key_binding(kb: RunningServer, p: Person, otp: str, metadata: Metadata) -> object:
    return kb.stub.DoKeyBinding(bind_request(p, new_jwk(), otp_challenge(otp)), metadata=metadata)


def call_formats(kb: RunningServer, p: Person, otp: str, metadata: Metadata) -> object:
    return kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=metadata
    )


RPCS: dict[str, RpcCall] = {
    "SendBindingOtp": call_send_otp,
    "DoKeyBinding": call_do_key_binding,
    "GetSupportedChallengeFormats": call_formats,
}


@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-metadata"),
        pytest.param((("partner-id", ""),), id="empty-partner-id"),
        pytest.param((("x-partner-id", PARTNER),), id="other-header-name"),
    ],
)
def test_missing_partner_header_is_refused(kb: RunningServer, person: Person, rpc: str, metadata: Metadata) -> None:
    tx, otp = send_otp(kb, person)
    with no_new_rows(kb):
        f = failure(lambda: RPCS[rpc](kb, person, otp, metadata))
    assert_refused(f, UNAUTHENTICATED, "required_header_missing", person.individual_id, otp)
    # The outstanding OTP was neither replaced nor charged an attempt.
    assert kb.app.store.otp_state(tx) == ("pending", 0)


@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize(
    "partner",
    [
        pytest.param("bad partner!", id="space-and-bang"),
        pytest.param("p" * 300, id="300-chars"),
        pytest.param("-leading-dash", id="leading-dash"),
        pytest.param("a/b", id="slash"),
    ],
)
def test_malformed_partner_is_refused(kb: RunningServer, person: Person, rpc: str, partner: str) -> None:
    tx, otp = send_otp(kb, person)
    with no_new_rows(kb):
        f = failure(lambda: RPCS[rpc](kb, person, otp, md(partner)))
    assert_refused(f, UNAUTHENTICATED, "invalid_partner", person.individual_id, otp)
    assert kb.app.store.otp_state(tx) == ("pending", 0)


@pytest.mark.parametrize(
    ("partner", "accepted"),
    [pytest.param("p" * 128, True, id="128-chars-accepted"), pytest.param("p" * 129, False, id="129-chars-refused")],
)
def test_partner_id_length_limit(kb: RunningServer, partner: str, accepted: bool) -> None:
    def call() -> object:
        return kb.stub.GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN"), metadata=md(partner)
        )

    if accepted:
        assert call() == pb.GetSupportedChallengeFormatsResponse(formats=["number"])
    else:
        assert_refused(failure(call), UNAUTHENTICATED, "invalid_partner")


# -- SendBindingOtp ----------------------------------------------------------------------

BAD_INDIVIDUAL_IDS = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="spaces-only"),
    pytest.param("\t\n", id="whitespace-only"),
    pytest.param("1234 5678", id="inner-space"),
    pytest.param(" 12345678", id="leading-space"),
    pytest.param("12345678\n", id="trailing-newline"),
    pytest.param("1234\x005678", id="nul-char"),
    pytest.param("1234\x1b5678", id="escape-char"),
    pytest.param("9" * 200, id="200-chars"),
    pytest.param("１２３４５６７８", id="fullwidth-digits"),
    pytest.param("münchen123", id="non-ascii-letter"),
    pytest.param("-12345678", id="leading-dash"),
    pytest.param("1234'; DROP TABLE individuals;--", id="sql-ish"),
]


@pytest.mark.parametrize("individual_id", BAD_INDIVIDUAL_IDS)
def test_send_otp_refuses_bad_individual_id(kb: RunningServer, individual_id: str) -> None:
    otps_before = kb.app.store.count_rows("otps")
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=["email"]), metadata=md()
        )
    )
    assert_refused(f, INVALID, "invalid_individual_id", individual_id)
    assert kb.app.store.count_rows("otps") == otps_before


@pytest.mark.parametrize(
    "channels",
    [
        pytest.param([], id="none"),
        pytest.param(["sms"], id="sms"),
        pytest.param([""], id="empty-string"),
        pytest.param(["email", "sms"], id="email-and-sms"),
        pytest.param([" email"], id="padded-email"),
    ],
)
def test_send_otp_refuses_bad_channel(kb: RunningServer, person: Person, channels: list[str]) -> None:
    otps_before = kb.app.store.count_rows("otps")
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=channels), metadata=md()
        )
    )
    assert_refused(f, INVALID, "invalid_otp_channel", person.individual_id)
    assert kb.app.store.count_rows("otps") == otps_before


@pytest.mark.parametrize(
    ("length", "code", "reason"),
    [
        pytest.param(128, grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed", id="128-chars-well-formed"),
        pytest.param(129, INVALID, "invalid_individual_id", id="129-chars-malformed"),
    ],
)
def test_individual_id_length_limit(kb: RunningServer, length: int, code: grpc.StatusCode, reason: str) -> None:
    long_id = "8" * length  # well-formed up to 128 characters, and not registered
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=long_id, otp_channels=["email"]), metadata=md()
        )
    )
    assert_refused(f, code, reason, long_id)


def test_send_otp_to_unknown_individual_fails(kb: RunningServer) -> None:
    nobody = unregistered()
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=nobody.individual_id, otp_channels=["email"]), metadata=md()
        )
    )
    assert_refused(f, grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed", nobody.individual_id)


@pytest.mark.parametrize(
    "channels", [pytest.param(["phone"], id="phone"), pytest.param(["email", "phone"], id="email-and-phone")]
)
def test_send_otp_without_phone_contact_fails(kb: RunningServer, channels: list[str]) -> None:
    no_phone = register(kb, phone=False)
    otps_before = kb.app.store.count_rows("otps")
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=no_phone.individual_id, otp_channels=channels), metadata=md()
        )
    )
    assert_refused(f, grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed", no_phone.individual_id, no_phone.email)
    assert kb.app.store.count_rows("otps") == otps_before  # nothing half-sent


class BrokenNotifier:
    """A notifier with a bug: it raises something other than DeliveryFailed."""

    def send(self, message: object) -> None:
        raise RuntimeError("notifier bug")


def test_unexpected_notifier_error_is_send_otp_failed_and_leaves_no_usable_otp(
    kb: RunningServer, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kb.app.service, "notifier", BrokenNotifier())
    otps_before = kb.app.store.count_rows("otps")
    f = failure(
        lambda: kb.stub.SendBindingOtp(
            pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email"]), metadata=md()
        )
    )
    assert_refused(f, grpc.StatusCode.FAILED_PRECONDITION, "send_otp_failed", person.individual_id)
    assert kb.app.store.count_rows("otps") == otps_before  # the undelivered OTP was discarded


def test_send_otp_returns_masked_contacts(kb: RunningServer, person: Person) -> None:
    resp = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email", "phone"]), metadata=md()
    )
    assert resp.transaction_id
    assert resp.masked_email == f"u***@{person.email.partition('@')[2]}" == "u***@example.org"
    assert_masked_mobile(resp.masked_mobile, person.phone)
    assert kb.app.store.otp_state(resp.transaction_id) == ("pending", 0)


def test_masked_mobile_of_formatted_number_ends_in_last_four_digits(kb: RunningServer) -> None:
    formatted = register(kb, phone="+49 170 123 45 67")
    resp = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=formatted.individual_id, otp_channels=["phone"]), metadata=md()
    )
    assert_masked_mobile(resp.masked_mobile, formatted.phone)


def test_send_otp_email_only_leaves_mobile_empty(kb: RunningServer, person: Person) -> None:
    resp = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email"]), metadata=md()
    )
    assert (resp.masked_email, resp.masked_mobile) == ("u***@example.org", "")


@pytest.mark.parametrize("channel", [pytest.param("EMAIL", id="upper"), pytest.param("Email", id="capitalised")])
def test_send_otp_channel_names_are_case_insensitive(kb: RunningServer, person: Person, channel: str) -> None:
    # server/service.py _parse_channels lower-cases each channel name, so "EMAIL" is accepted.
    resp = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=[channel]), metadata=md()
    )
    assert (resp.masked_email, resp.masked_mobile) == ("u***@example.org", "")
    assert kb.app.store.otp_state(resp.transaction_id) == ("pending", 0)


# -- GetSupportedChallengeFormats --------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "formats"),
    [
        pytest.param("OTP", ["alpha-numeric"], id="OTP"),
        pytest.param("PIN", ["number"], id="PIN"),
        pytest.param("FOO", [], id="unknown"),
        pytest.param("otp", [], id="lower-case-otp"),
        pytest.param("", [], id="empty"),
        pytest.param("WLA", ["jwt"], id="WLA"),
        pytest.param("BIO", [], id="BIO-no-matcher"),
    ],
)
def test_supported_challenge_formats(kb: RunningServer, factor: str, formats: list[str]) -> None:
    resp = kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type=factor), metadata=md()
    )
    assert list(resp.formats) == formats


# -- DoKeyBinding validation -------------------------------------------------------------

Build = Callable[[Person, str, str], pb.DoKeyBindingRequest]


def ch(factor: str, fmt: str, value: str) -> pb.AuthChallenge:
    return pb.AuthChallenge(auth_factor_type=factor, format=fmt, challenge=value)


def with_id(req: pb.DoKeyBindingRequest, individual_id: str) -> pb.DoKeyBindingRequest:
    req.individual_id = individual_id
    return req


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_with_private_d() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECKey.import_key(key.public_key()).as_dict()
    jwk["d"] = b64u(key.private_numbers().private_value.to_bytes(32, "big"))
    return json.dumps(jwk)


def jwk_rsa_1024() -> str:
    weak = rsa.generate_private_key(65537, 1024).public_key().public_numbers()  # noqa: S505 - weak on purpose
    # Built by hand: joserfc warns (an error under pytest's filter) when it exports a key this small.
    return json.dumps({"kty": "RSA", "n": b64u(weak.n.to_bytes(128, "big")), "e": b64u(weak.e.to_bytes(3, "big"))})


def jwk_rsa_small_factor() -> str:
    """n = 3 x a 2047-bit prime (the outside review bound one): anyone can derive the private key."""
    prime = rsa.generate_private_key(65537, 4094).private_numbers().p
    n = 3 * prime
    return json.dumps(
        {"kty": "RSA", "n": b64u(n.to_bytes((n.bit_length() + 7) // 8, "big")), "e": b64u(b"\x01\x00\x01")}
    )


def jwk_ec_p521() -> str:
    return json.dumps(ECKey.import_key(ec.generate_private_key(ec.SECP521R1()).public_key()).as_dict())


def jwk_off_curve() -> str:
    jwk = json.loads(new_jwk())
    y = bytearray(base64.urlsafe_b64decode(jwk["y"] + "=="))
    y[-1] ^= 1
    jwk["y"] = b64u(bytes(y))
    return json.dumps(jwk)


def jwk_oct() -> str:
    return json.dumps({"kty": "oct", "k": b64u(b"0123456789abcdef0123456789abcdef")})


@dataclass(frozen=True)
class Invalid:
    reason: str
    build: Build


def case(case_id: str, reason: str, build: Build) -> object:
    return pytest.param(Invalid(reason, build), id=case_id)


VALIDATION_CASES = [
    # number of challenges
    case("0-challenges", "invalid_no_of_challenges", lambda p, k, otp: bind_request(p, k)),
    case("6-challenges", "invalid_no_of_challenges", lambda p, k, otp: bind_request(p, k, *[otp_challenge(otp)] * 6)),
    # auth factor type
    case(
        "factor-FOO", "invalid_auth_factor_type", lambda p, k, otp: bind_request(p, k, ch("FOO", "alpha-numeric", otp))
    ),
    case(
        "factor-lower-otp",
        "invalid_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, ch("otp", "alpha-numeric", otp)),
    ),
    case(
        "WLA-wrong-format",
        "invalid_challenge_format",
        lambda p, k, otp: bind_request(p, k, ch("WLA", "alpha-numeric", f"{'a' * 40}.{'b' * 80}.{'c' * 40}")),
    ),
    case(
        "WLA-too-short",
        "invalid_challenge",
        lambda p, k, otp: bind_request(p, k, ch("WLA", "jwt", "a.b.c")),
    ),
    case(
        "WLA-not-three-parts",
        "invalid_challenge",
        lambda p, k, otp: bind_request(p, k, ch("WLA", "jwt", "a" * 200)),
    ),
    case(
        "factor-BIO", "invalid_auth_factor_type", lambda p, k, otp: bind_request(p, k, ch("BIO", "encoded-json", "e30"))
    ),
    case(
        "factor-empty", "invalid_auth_factor_type", lambda p, k, otp: bind_request(p, k, ch("", "alpha-numeric", otp))
    ),
    case(
        "unknown-factor-after-valid-otp",
        "invalid_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp), ch("FOO", "number", p.pin)),
    ),
    # format
    case("OTP-as-number", "invalid_challenge_format", lambda p, k, otp: bind_request(p, k, ch("OTP", "number", otp))),
    case(
        "PIN-as-alpha-numeric",
        "invalid_challenge_format",
        lambda p, k, otp: bind_request(p, k, ch("PIN", "alpha-numeric", p.pin)),
    ),
    case("OTP-format-empty", "invalid_challenge_format", lambda p, k, otp: bind_request(p, k, ch("OTP", "", otp))),
    case(
        "OTP-format-upper",
        "invalid_challenge_format",
        lambda p, k, otp: bind_request(p, k, ch("OTP", "ALPHA-NUMERIC", otp)),
    ),
    # challenge values
    case("OTP-5-chars", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp[:5]))),
    case("OTP-7-chars", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp + "A"))),
    case("OTP-empty", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(""))),
    case("OTP-with-dash", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp[:5] + "-"))),
    case(
        "OTP-with-control-char",
        "invalid_challenge",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp[:5] + "\x07")),
    ),
    case("OTP-trailing-newline", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp + "\n"))),
    case("OTP-non-ascii", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp[:5] + "é"))),
    case(
        "PIN-with-letters", "invalid_challenge", lambda p, k, otp: bind_request(p, k, pin_challenge(p.pin[:4] + "ab"))
    ),
    case("PIN-5-digits", "invalid_challenge", lambda p, k, otp: bind_request(p, k, pin_challenge(p.pin[:5]))),
    case("PIN-7-digits", "invalid_challenge", lambda p, k, otp: bind_request(p, k, pin_challenge(p.pin + "0"))),
    case(
        "PIN-fullwidth-digits", "invalid_challenge", lambda p, k, otp: bind_request(p, k, pin_challenge("１２３４５６"))
    ),
    case(
        "OTP-twice", "invalid_challenge", lambda p, k, otp: bind_request(p, k, otp_challenge(otp), otp_challenge(otp))
    ),
    case(
        "PIN-twice",
        "invalid_challenge",
        lambda p, k, otp: bind_request(p, k, pin_challenge(p.pin), pin_challenge(p.pin)),
    ),
    # bind_auth_factor_type
    case(
        "bind-empty",
        "invalid_bind_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp), factor=""),
    ),
    case(
        "bind-OTP",
        "invalid_bind_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp), factor="OTP"),
    ),
    case(
        "bind-lower-wla",
        "invalid_bind_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp), factor="wla"),
    ),
    case(
        "bind-PIN",
        "invalid_bind_auth_factor_type",
        lambda p, k, otp: bind_request(p, k, otp_challenge(otp), factor="PIN"),
    ),
    # public key
    case("jwk-not-json", "invalid_public_key", lambda p, k, otp: bind_request(p, "{not json", otp_challenge(otp))),
    case("jwk-empty", "invalid_public_key", lambda p, k, otp: bind_request(p, "", otp_challenge(otp))),
    case("jwk-array", "invalid_public_key", lambda p, k, otp: bind_request(p, "[]", otp_challenge(otp))),
    case(
        "jwk-private-d",
        "invalid_public_key",
        lambda p, k, otp: bind_request(p, jwk_with_private_d(), otp_challenge(otp)),
    ),
    case("jwk-rsa-1024", "invalid_public_key", lambda p, k, otp: bind_request(p, jwk_rsa_1024(), otp_challenge(otp))),
    case(
        "jwk-rsa-small-factor",
        "invalid_public_key",
        lambda p, k, otp: bind_request(p, jwk_rsa_small_factor(), otp_challenge(otp)),
    ),
    case("jwk-kty-oct", "invalid_public_key", lambda p, k, otp: bind_request(p, jwk_oct(), otp_challenge(otp))),
    case("jwk-ec-p521", "invalid_public_key", lambda p, k, otp: bind_request(p, jwk_ec_p521(), otp_challenge(otp))),
    case("jwk-off-curve", "invalid_public_key", lambda p, k, otp: bind_request(p, jwk_off_curve(), otp_challenge(otp))),
    # individual ID
    case("id-empty", "invalid_individual_id", lambda p, k, otp: with_id(bind_request(p, k, otp_challenge(otp)), "")),
    case("id-blank", "invalid_individual_id", lambda p, k, otp: with_id(bind_request(p, k, otp_challenge(otp)), "   ")),
    case(
        "id-inner-space",
        "invalid_individual_id",
        lambda p, k, otp: with_id(
            bind_request(p, k, otp_challenge(otp)), p.individual_id[:6] + " " + p.individual_id[6:]
        ),
    ),
    case(
        "id-control-char",
        "invalid_individual_id",
        lambda p, k, otp: with_id(bind_request(p, k, otp_challenge(otp)), p.individual_id + "\x00"),
    ),
    case(
        "id-200-chars",
        "invalid_individual_id",
        lambda p, k, otp: with_id(bind_request(p, k, otp_challenge(otp)), "7" * 200),
    ),
    case(
        "id-non-ascii",
        "invalid_individual_id",
        lambda p, k, otp: with_id(bind_request(p, k, otp_challenge(otp)), "ñ1234567"),
    ),
]


@pytest.mark.parametrize("invalid", VALIDATION_CASES)
def test_do_key_binding_refuses_invalid_request(kb: RunningServer, person: Person, invalid: Invalid) -> None:
    tx, otp = send_otp(kb, person)
    req = invalid.build(person, new_jwk(), otp)
    with no_new_rows(kb):
        f = failure(lambda: kb.stub.DoKeyBinding(req, metadata=md()))
    sent = [person.individual_id, req.individual_id, otp, person.pin, *(c.challenge for c in req.challenges)]
    assert_refused(f, INVALID, invalid.reason, *sent)
    # Validation happens before any secret is touched: the OTP is not charged an attempt.
    assert kb.app.store.otp_state(tx) == ("pending", 0)


# -- authentication failures -------------------------------------------------------------


def test_wrong_otp_fails(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(other_otp(otp))))
    assert kb.app.store.otp_state(tx) == ("pending", 1)


def test_a_letter_in_a_digit_otp_is_a_wrong_otp(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    # Digit OTPs by default; a letter keeps the alpha-numeric shape, so it is a wrong answer (an attempt
    # spent), not a malformed one. The exact comparison of letters' case: tests/test_esignet.py (alphanumeric).
    assert otp.isdigit()
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge("A" + otp[1:])))
    assert kb.app.store.otp_state(tx) == ("pending", 1)


def test_otp_never_requested_fails(kb: RunningServer, person: Person) -> None:
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge("ABC123")))


def test_otp_sent_for_one_partner_fails_for_another(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person, partner=PARTNER)
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(otp)), partner=OTHER_PARTNER)
    # Partner B's attempt does not touch partner A's OTP; A can still use it.
    assert kb.app.store.otp_state(tx) == ("pending", 0)
    bind(kb, bind_request(person, new_jwk(), otp_challenge(otp)), partner=PARTNER)
    assert kb.app.store.otp_state(tx) == ("used", 1)


def test_expired_otp_fails(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    expire_otp(kb, tx)  # simulates the clock moving past the OTP's TTL
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(otp)))
    assert kb.app.store.otp_state(tx) == ("pending", 0)


def test_used_otp_cannot_be_reused(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    bind(kb, bind_request(person, new_jwk(), otp_challenge(otp)))
    assert kb.app.store.otp_state(tx) == ("used", 1)
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(otp)))
    assert len(kb.app.store.bindings_for(id_hmac(kb, person), PARTNER)) == 1


def test_new_otp_replaces_the_previous_one(kb: RunningServer, person: Person) -> None:
    tx1, otp1 = send_otp(kb, person)
    tx2, otp2 = send_otp(kb, person)
    assert kb.app.store.otp_state(tx1) == ("replaced", 0)
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(otp1)))
    assert kb.app.store.otp_state(tx2) == ("pending", 1)  # the guess was charged to the live OTP
    bind(kb, bind_request(person, new_jwk(), otp_challenge(otp2)))
    assert kb.app.store.otp_state(tx2) == ("used", 2)
    assert kb.app.store.otp_state(tx1) == ("replaced", 0)


def test_correct_otp_after_max_attempts_fails(kb: RunningServer, person: Person) -> None:
    assert kb.app.settings.otp_max_attempts == 3
    tx, otp = send_otp(kb, person)
    for _ in range(3):
        assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(other_otp(otp))))
    assert kb.app.store.otp_state(tx) == ("pending", 3)
    assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(otp)))
    assert kb.app.store.otp_state(tx) == ("pending", 3)
    # A freshly sent OTP starts a new allowance.
    _, fresh = send_otp(kb, person)
    bind(kb, bind_request(person, new_jwk(), otp_challenge(fresh)))


def test_wrong_pin_fails(kb: RunningServer, person: Person) -> None:
    assert_auth_failed(kb, bind_request(person, new_jwk(), pin_challenge(other_pin(person.pin))))


def test_pin_for_individual_without_pin_fails(kb: RunningServer) -> None:
    no_pin = register(kb, pin=False)
    assert_auth_failed(kb, bind_request(no_pin, new_jwk(), pin_challenge("000000")))
    assert_auth_failed(kb, bind_request(no_pin, new_jwk(), pin_challenge("123456")))


@pytest.mark.parametrize(
    "challenge",
    [
        pytest.param(otp_challenge("ABC123"), id="OTP"),
        pytest.param(pin_challenge("123456"), id="PIN"),
        pytest.param(None, id="OTP-and-PIN"),
    ],
)
def test_unknown_individual_fails(kb: RunningServer, challenge: pb.AuthChallenge | None) -> None:
    nobody = unregistered()
    challenges = [challenge] if challenge is not None else [otp_challenge("ABC123"), pin_challenge("123456")]
    assert_auth_failed(kb, bind_request(nobody, new_jwk(), *challenges))


@pytest.mark.parametrize("otp_first", [pytest.param(True, id="otp-then-pin"), pytest.param(False, id="pin-then-otp")])
def test_correct_otp_with_wrong_pin_fails_and_keeps_the_otp(kb: RunningServer, person: Person, otp_first: bool) -> None:
    tx, otp = send_otp(kb, person)
    pair = [otp_challenge(otp), pin_challenge(other_pin(person.pin))]
    assert_auth_failed(kb, bind_request(person, new_jwk(), *(pair if otp_first else pair[::-1])))
    assert kb.app.store.otp_state(tx) == ("pending", 1)  # charged an attempt, not consumed
    resp = bind(kb, bind_request(person, new_jwk(), otp_challenge(otp), pin_challenge(person.pin)))
    assert resp.certificate
    assert kb.app.store.otp_state(tx) == ("used", 2)


def test_unknown_individual_and_wrong_otp_are_indistinguishable(kb: RunningServer, person: Person) -> None:
    _, otp = send_otp(kb, person)
    wrong = assert_auth_failed(kb, bind_request(person, new_jwk(), otp_challenge(other_otp(otp))))
    unknown = assert_auth_failed(kb, bind_request(unregistered(), new_jwk(), otp_challenge(other_otp(otp))))
    assert wrong == unknown


# -- duplicate keys and rebinding --------------------------------------------------------


def test_key_bound_to_one_individual_is_refused_for_another(kb: RunningServer, person: Person) -> None:
    _, shared = new_wallet_key("ec-p256")
    _, otp_a = send_otp(kb, person)
    bind(kb, bind_request(person, shared, otp_challenge(otp_a)))
    assert kb.app.store.key_owner(fingerprint(shared)) == id_hmac(kb, person)

    other = register(kb)
    tx_b, otp_b = send_otp(kb, other)
    with no_new_rows(kb):
        f = failure(lambda: kb.stub.DoKeyBinding(bind_request(other, shared, otp_challenge(otp_b)), metadata=md()))
    assert_refused(f, grpc.StatusCode.ALREADY_EXISTS, "duplicate_public_key", other.individual_id, otp_b)
    assert kb.app.store.bindings_for(id_hmac(kb, other), PARTNER) == []
    assert kb.app.store.key_owner(fingerprint(shared)) == id_hmac(kb, person)
    assert kb.app.store.otp_state(tx_b) == ("pending", 1)  # B's OTP is not consumed by the refusal

    # The owner may bind the same key again (a new certificate, the old binding superseded).
    _, otp_a2 = send_otp(kb, person)
    bind(kb, bind_request(person, shared, otp_challenge(otp_a2)))
    statuses = [b.status for b in kb.app.store.bindings_for(id_hmac(kb, person), PARTNER)]
    assert statuses == [BindingStatus.SUPERSEDED, BindingStatus.ACTIVE]


def test_unauthenticated_caller_cannot_learn_who_owns_a_key(kb: RunningServer, person: Person) -> None:
    _, shared = new_wallet_key("ec-p256")
    _, otp_a = send_otp(kb, person)
    bind(kb, bind_request(person, shared, otp_challenge(otp_a)))

    other = register(kb)
    _, otp_b = send_otp(kb, other)
    with no_new_rows(kb):
        f = failure(
            lambda: kb.stub.DoKeyBinding(bind_request(other, shared, otp_challenge(other_otp(otp_b))), metadata=md())
        )
    # Authentication comes first: a wrong OTP with someone else's key is auth_failed, not duplicate_public_key.
    assert_refused(f, UNAUTHENTICATED, "auth_failed", other.individual_id, otp_b)
    with no_new_rows(kb):
        f = failure(
            lambda: kb.stub.DoKeyBinding(bind_request(unregistered(), shared, pin_challenge("123456")), metadata=md())
        )
    assert_refused(f, UNAUTHENTICATED, "auth_failed")


def test_same_key_in_another_jwk_spelling_is_still_a_duplicate(kb: RunningServer, person: Person) -> None:
    _, shared = new_wallet_key("ec-p256")
    _, otp_a = send_otp(kb, person)
    bind(kb, bind_request(person, shared, otp_challenge(otp_a)))

    respelled = json.dumps({**dict(reversed(list(json.loads(shared).items()))), "alg": "ES256", "use": "sig"})
    other = register(kb)
    _, otp_b = send_otp(kb, other)
    with no_new_rows(kb):
        f = failure(lambda: kb.stub.DoKeyBinding(bind_request(other, respelled, otp_challenge(otp_b)), metadata=md()))
    assert_refused(f, grpc.StatusCode.ALREADY_EXISTS, "duplicate_public_key", other.individual_id, otp_b)


def test_rebinding_supersedes_previous_binding_per_partner(kb: RunningServer, person: Person) -> None:
    hm = id_hmac(kb, person)
    _, otp1 = send_otp(kb, person)
    first = bind(kb, bind_request(person, new_jwk(), otp_challenge(otp1)))
    _, otp2 = send_otp(kb, person)
    second_key = new_jwk()
    second = bind(kb, bind_request(person, second_key, otp_challenge(otp2)))

    rows = kb.app.store.bindings_for(hm, PARTNER)
    assert [(b.status, b.cert_thumbprint) for b in rows] == [
        (BindingStatus.SUPERSEDED, first.thumbprint),
        (BindingStatus.ACTIVE, second.thumbprint),
    ]
    assert rows[0].superseded_at is not None
    assert rows[1].superseded_at is None
    assert rows[1].key_fingerprint == fingerprint(second_key)
    assert first.partner_specific_user_token == second.partner_specific_user_token

    # Another partner's binding is independent: both partners keep one active binding.
    _, otp3 = send_otp(kb, person, partner=OTHER_PARTNER)
    third = bind(kb, bind_request(person, new_jwk(), otp_challenge(otp3)), partner=OTHER_PARTNER)
    other_rows = kb.app.store.bindings_for(hm, OTHER_PARTNER)
    assert [(b.status, b.cert_thumbprint) for b in other_rows] == [(BindingStatus.ACTIVE, third.thumbprint)]
    assert [b.status for b in kb.app.store.bindings_for(hm, PARTNER)] == [
        BindingStatus.SUPERSEDED,
        BindingStatus.ACTIVE,
    ]
    assert third.partner_specific_user_token != second.partner_specific_user_token


def test_pin_only_binding_succeeds(kb: RunningServer, person: Person) -> None:
    jwk = new_jwk()
    resp = bind(kb, bind_request(person, jwk, pin_challenge(person.pin)))
    cert = x509.load_pem_x509_certificate(resp.certificate.encode())
    assert cert.subject.rfc4514_string() == f"CN={resp.partner_specific_user_token}"
    rows = kb.app.store.bindings_for(id_hmac(kb, person), PARTNER)
    assert [(b.status, b.key_fingerprint) for b in rows] == [(BindingStatus.ACTIVE, fingerprint(jwk))]


# -- concurrency ---------------------------------------------------------------------------


def _reraise(err: grpc.RpcError) -> NoReturn:
    raise err


def test_one_otp_binds_once_under_concurrency(kb: RunningServer, person: Person) -> None:
    tx, otp = send_otp(kb, person)
    keys = [new_jwk() for _ in range(10)]
    barrier = threading.Barrier(len(keys))
    successes: list[pb.DoKeyBindingResponse] = []
    errors: list[grpc.RpcError] = []
    lock = threading.Lock()

    def attempt(jwk: str) -> None:
        req = bind_request(person, jwk, otp_challenge(otp))
        barrier.wait(10)
        try:
            resp = kb.stub.DoKeyBinding(req, metadata=md(), timeout=30)
        except grpc.RpcError as err:
            with lock:
                errors.append(err)
        else:
            with lock:
                successes.append(resp)

    threads = [threading.Thread(target=attempt, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)

    assert len(successes) == 1
    assert len(errors) == len(keys) - 1
    for err in errors:
        f = failure(lambda e=err: _reraise(e))  # type: ignore[misc]
        assert (f.code, f.reason, f.domain) in {
            (UNAUTHENTICATED, "auth_failed", DOMAIN),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_attempts", DOMAIN),
        }, f
        assert otp not in f.message
        assert person.individual_id not in f.message

    rows = kb.app.store.bindings_for(id_hmac(kb, person), PARTNER)
    assert [b.status for b in rows] == [BindingStatus.ACTIVE]
    assert rows[0].cert_thumbprint == successes[0].thumbprint
    # The winner's key is claimed for this individual; so may be the keys of callers who also passed the
    # OTP check but lost the race to consume it (the claim precedes the commit), never for anyone else.
    owners = [kb.app.store.key_owner(fingerprint(k)) for k in keys]
    claimed = [o for o in owners if o is not None]
    assert set(claimed) == {id_hmac(kb, person)}
    assert 1 <= len(claimed) <= 3  # at most the OTP's 3 attempts passed the check
    assert kb.app.store.key_owner(rows[0].key_fingerprint) == id_hmac(kb, person)
    state = kb.app.store.otp_state(tx)
    assert state is not None
    assert state[0] == "used"


def test_same_new_key_bound_concurrently_by_two_individuals(kb: RunningServer, person: Person) -> None:
    other = register(kb)
    _, shared = new_wallet_key("ec-p256")
    requests = [(p, bind_request(p, shared, otp_challenge(send_otp(kb, p)[1]))) for p in (person, other)]
    barrier = threading.Barrier(len(requests))
    outcomes: dict[str, pb.DoKeyBindingResponse | grpc.RpcError] = {}

    def attempt(p: Person, req: pb.DoKeyBindingRequest) -> None:
        barrier.wait(10)
        try:
            outcomes[p.individual_id] = kb.stub.DoKeyBinding(req, metadata=md(), timeout=30)
        except grpc.RpcError as err:
            outcomes[p.individual_id] = err

    threads = [threading.Thread(target=attempt, args=pr) for pr in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    winners = [p for p in (person, other) if isinstance(outcomes[p.individual_id], pb.DoKeyBindingResponse)]
    assert len(winners) == 1
    (winner,) = winners
    (loser,) = [p for p in (person, other) if p is not winner]
    err = outcomes[loser.individual_id]
    assert isinstance(err, grpc.RpcError)
    assert_refused(
        failure(lambda: _reraise(err)), grpc.StatusCode.ALREADY_EXISTS, "duplicate_public_key", loser.individual_id
    )
    assert kb.app.store.key_owner(fingerprint(shared)) == id_hmac(kb, winner)
    assert kb.app.store.bindings_for(id_hmac(kb, loser), PARTNER) == []
    assert [b.status for b in kb.app.store.bindings_for(id_hmac(kb, winner), PARTNER)] == [BindingStatus.ACTIVE]
