"""Hostile input through the real server: each gets its reason code, never INTERNAL or UNKNOWN.

The gaps left by tests/test_fuzz.py and tests/test_jwk.py: requests protobuf cannot decode (invalid
UTF-8, broken wire data), requests over the size limit, Ed25519 keys that are no curve points or of
small order, JWKs that repeat a member, control characters, and IDs outside the configured pattern.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message

from server.config import load_settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.decoding import MAX_REQUEST_BYTES
from server.grpc_api.demo import new_wallet_key
from tests.conftest import (
    Person,
    RpcFailure,
    RunningServer,
    bind_request,
    failure,
    md,
    otp_challenge,
    pin_challenge,
    unregistered,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE = "/keybinder.v1.KeyBinderService/"
#: Replaced in the serialized request by bytes of the same length that are not UTF-8.
MARK = "QQQQQQ"


def raw_call(kb: RunningServer, method: str, raw: bytes) -> Callable[[], object]:
    call = kb.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    return lambda: call(raw, metadata=md(), timeout=10)


def with_bad_utf8(request: Message, bad: bytes) -> bytes:
    raw = request.SerializeToString()
    assert raw.count(MARK.encode()) == 1
    return raw.replace(MARK.encode(), bad.ljust(len(MARK), b"Q"))


def assert_reason(f: RpcFailure, reason: str, field: str | None = None) -> None:
    assert (f.code, f.reason, f.domain) == (INVALID, reason, "keybinder"), f
    if field is not None:
        assert f.metadata == {"field": field}


# -- requests protobuf cannot decode -----------------------------------------------------------------

CHALLENGES = [pin_challenge("123456"), otp_challenge("ABC123")]
BAD_UTF8 = {
    "lone-ff": b"\xff",
    "surrogate": b"\xed\xa0\x80",
    "overlong-slash": b"\xc0\xaf",
    "truncated": b"\xe2\x82",
}


def challenge_with(field: str) -> list[pb.AuthChallenge]:
    first = pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge="123456")
    setattr(first, field, MARK)
    return [CHALLENGES[1], first]


UNDECODABLE: list[tuple[str, Message, str, str]] = [
    ("SendBindingOtp", pb.SendBindingOtpRequest(individual_id=MARK, otp_channels=["email"]), "invalid_individual_id",
     "individual_id"),
    ("SendBindingOtp", pb.SendBindingOtpRequest(individual_id="123", otp_channels=["email", MARK]),
     "invalid_otp_channel", "otp_channels[1]"),
    ("DoKeyBinding", pb.DoKeyBindingRequest(individual_id="123", challenges=challenge_with("challenge")),
     "invalid_challenge", "challenges[1].challenge"),
    ("DoKeyBinding", pb.DoKeyBindingRequest(individual_id="123", challenges=challenge_with("format")),
     "invalid_challenge_format", "challenges[1].format"),
    ("DoKeyBinding", pb.DoKeyBindingRequest(individual_id="123", challenges=challenge_with("auth_factor_type")),
     "invalid_auth_factor_type", "challenges[1].auth_factor_type"),
    ("DoKeyBinding", pb.DoKeyBindingRequest(individual_id="1", challenges=CHALLENGES, public_key_jwk=MARK),
     "invalid_public_key", "public_key_jwk"),
    ("DoKeyBinding", pb.DoKeyBindingRequest(individual_id="1", challenges=CHALLENGES, bind_auth_factor_type=MARK),
     "invalid_bind_auth_factor_type", "bind_auth_factor_type"),
    ("VerifyWalletToken", pb.VerifyWalletTokenRequest(token=MARK, individual_id="123"), "invalid_wla_token", "token"),
    ("RevokeBinding", pb.RevokeBindingRequest(individual_id="123", challenges=CHALLENGES, reason=MARK),
     "invalid_revocation_reason", "reason"),
    ("GetSupportedChallengeFormats", pb.GetSupportedChallengeFormatsRequest(auth_factor_type=MARK),
     "invalid_auth_factor_type", "auth_factor_type"),
]  # fmt: skip


@pytest.mark.parametrize("bad", list(BAD_UTF8.values()), ids=list(BAD_UTF8))
@pytest.mark.parametrize(
    ("method", "request_", "reason", "field"), UNDECODABLE, ids=[f"{u[0]}-{u[3]}" for u in UNDECODABLE]
)
def test_invalid_utf8_gets_the_fields_reason(
    kb: RunningServer, method: str, request_: Message, reason: str, field: str, bad: bytes
) -> None:
    assert_reason(failure(raw_call(kb, method, with_bad_utf8(request_, bad))), reason, field)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x0a\x10short", id="length-past-the-end"),
        pytest.param(b"\x0f", id="invalid-wire-type"),
        pytest.param(b"\x80", id="truncated-varint"),
    ],
)
def test_broken_wire_data_is_an_invalid_request(kb: RunningServer, raw: bytes) -> None:
    assert_reason(failure(raw_call(kb, "DoKeyBinding", raw)), "invalid_request")


def test_request_over_the_size_limit_is_refused_unparsed_with_the_fields_reason(
    kb: RunningServer, person: Person
) -> None:
    megabyte_jwk = json.dumps({"kty": "EC", "crv": "P-256", "x": "A" * 1_000_000, "y": "B"})
    request = bind_request(person, megabyte_jwk, pin_challenge(person.pin))
    assert_reason(failure(lambda: kb.stub.DoKeyBinding(request, metadata=md())), "invalid_public_key", "public_key_jwk")
    many = pb.SendBindingOtpRequest(
        individual_id=person.individual_id, otp_channels=["email"] * (MAX_REQUEST_BYTES // 6)
    )
    f = failure(lambda: kb.stub.SendBindingOtp(many, metadata=md()))
    assert_reason(f, "invalid_otp_channel", "otp_channels")


# -- field limits and characters ---------------------------------------------------------------------


def test_too_many_otp_channels(kb: RunningServer, person: Person) -> None:
    request = pb.SendBindingOtpRequest(individual_id=person.individual_id, otp_channels=["email", "phone"] * 3)
    assert_reason(failure(lambda: kb.stub.SendBindingOtp(request, metadata=md())), "invalid_otp_channel")


@pytest.mark.parametrize(
    ("challenge", "reason"),
    [
        (pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge="AB\x00C12"), "invalid_challenge"),
        (pb.AuthChallenge(auth_factor_type="OTP", format="alpha-numeric", challenge="ABC12\n"), "invalid_challenge"),
        (pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge="12\t456"), "invalid_challenge"),
        (pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge="١٢٣٤٥٦"), "invalid_challenge"),
        (pb.AuthChallenge(auth_factor_type="WLA", format="jwt", challenge="a" * 60 + ".\x1b." + "b" * 60),
         "invalid_challenge"),
        (pb.AuthChallenge(auth_factor_type="PIN\x00", format="number", challenge="123456"), "invalid_auth_factor_type"),
        (pb.AuthChallenge(auth_factor_type="PIN", format="number\u202e", challenge="123456"),
         "invalid_challenge_format"),
    ],
)  # fmt: skip
def test_control_characters_in_challenges(
    kb: RunningServer, person: Person, challenge: pb.AuthChallenge, reason: str
) -> None:
    request = bind_request(person, new_wallet_key("ec-p256")[1], challenge)
    f = failure(lambda: kb.stub.DoKeyBinding(request, metadata=md()))
    assert_reason(f, reason)
    assert f.metadata == {"challenge_index": "0"}


@pytest.mark.parametrize(
    "individual_id",
    [
        pytest.param("12345\x00", id="nul"),
        pytest.param("12\n345", id="newline"),
        pytest.param("abc\u202edef", id="bidi-override"),
        pytest.param("abc\u200bdef", id="zero-width-space"),
        pytest.param("\x7f12345", id="delete"),
        pytest.param("1" * 257, id="over-256-chars"),
    ],
)
def test_individual_id_guard_holds_whatever_the_configured_pattern(
    kb: RunningServer, monkeypatch: pytest.MonkeyPatch, individual_id: str
) -> None:
    monkeypatch.setattr(kb.app.service, "_id_pattern", re.compile(r".{1,1000}", re.DOTALL))  # a careless config
    request = pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=["email"])
    assert_reason(failure(lambda: kb.stub.SendBindingOtp(request, metadata=md())), "invalid_individual_id")
    # The same ID is refused by DoKeyBinding as well, before any secret is touched.
    bind = bind_request(Person(individual_id, "", "", ""), new_wallet_key("ec-p256")[1], pin_challenge("123456"))
    assert_reason(failure(lambda: kb.stub.DoKeyBinding(bind, metadata=md())), "invalid_individual_id")


def test_individual_ids_outside_the_configured_pattern(kb: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = load_settings(data_dir=kb.app.settings.data_dir, individual_id_pattern=r"[0-9]{12}").individual_id_pattern
    monkeypatch.setattr(kb.app.service, "_id_pattern", re.compile(pattern))
    for bad in ("12345", "1234567890123", "12345678901a", "１２３４５６７８９０１２"):  # the last in full-width digits
        request = pb.SendBindingOtpRequest(individual_id=bad, otp_channels=["email"])
        assert_reason(failure(lambda r=request: kb.stub.SendBindingOtp(r, metadata=md())), "invalid_individual_id")  # type: ignore[misc]
    good = pb.SendBindingOtpRequest(individual_id=unregistered().individual_id, otp_channels=["email"])
    assert failure(lambda: kb.stub.SendBindingOtp(good, metadata=md())).reason == "send_otp_failed"


def test_invalid_individual_id_pattern_is_a_configuration_error(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="individual_id_pattern is not a valid regular expression"):
        load_settings(individual_id_pattern="[0-9")


# -- JWK checks the existing suite lacked --------------------------------------------------------------

ED_P = 2**255 - 19
ED_D = -121665 * pow(121666, -1, ED_P) % ED_P


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def okp(x: bytes) -> str:
    return json.dumps({"kty": "OKP", "crv": "Ed25519", "x": b64u(x)})


def y_off_the_curve() -> bytes:
    """The encoding of a y for which no x exists: x^2 = (y^2 - 1) / (d y^2 + 1) is not a square mod p."""
    for y in range(2, 1000):
        x2 = (y * y - 1) * pow(ED_D * y * y + 1, -1, ED_P) % ED_P
        if pow(x2, (ED_P - 1) // 2, ED_P) == ED_P - 1:
            return y.to_bytes(32, "little")
    raise AssertionError("unreachable: half of all y are off the curve")


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(okp(y_off_the_curve()), id="ed25519-not-on-curve"),
        pytest.param(okp(b"\xff" * 31 + b"\x7f"), id="ed25519-y-not-below-p"),
        pytest.param(okp(bytes(31) + b"\x80"), id="ed25519-negative-zero-x"),
        pytest.param(okp(b"\x01" + bytes(31)), id="ed25519-neutral-element"),
        pytest.param(okp(bytes(32)), id="ed25519-order-4"),
        pytest.param(
            okp(bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")), id="order-2"
        ),
        pytest.param(
            okp(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")), id="order-8"
        ),
        pytest.param('{"kty": "RSA", "kty": "EC"}', id="repeated-kty"),
    ],
)
def test_jwk_refused_as_invalid_public_key(kb: RunningServer, person: Person, jwk: str) -> None:
    request = bind_request(person, jwk, pin_challenge(person.pin))
    assert_reason(failure(lambda: kb.stub.DoKeyBinding(request, metadata=md())), "invalid_public_key")


def test_repeated_member_in_an_otherwise_valid_jwk(kb: RunningServer, person: Person) -> None:
    _, jwk = new_wallet_key("ed25519")
    members = json.loads(jwk)
    other = json.loads(new_wallet_key("ed25519")[1])["x"]
    repeated = json.dumps(members)[:-1] + f', "x": "{other}"}}'
    request = bind_request(person, repeated, pin_challenge(person.pin))
    assert_reason(failure(lambda: kb.stub.DoKeyBinding(request, metadata=md())), "invalid_public_key")
    # The same key without the repetition binds: the refusal was for the repetition alone.
    assert kb.stub.DoKeyBinding(bind_request(person, jwk, pin_challenge(person.pin)), metadata=md()).thumbprint
