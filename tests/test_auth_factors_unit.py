"""Fast unit tests of each auth-factor module and the registry, above in-memory fakes of the ports.

No HSM, no database, no gRPC: the fakes (tests/fakes.py) stand in for them and are themselves checked by the
store contract suite. The same factors run for real in tests/test_auth_factors.py.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from server.auth import REGISTRY, AuthContext, Challenge, Factors, check_factor_settings
from server.auth.base import Attempt, AuthFactor
from server.auth.kbi import MAC_KBI, KbiFactor, decode_answers, enrolment_hmacs, normalise
from server.auth.otp import MAC_OTP, OtpFactor
from server.auth.pin import PinFactor, pin_hmac
from server.auth.wla import WlaFactor
from server.certs import Issuer, build_issuer_certificate, issue_wallet_certificate, to_pem, x5t_s256
from server.domain import Binding, Identity, OtpRecord
from server.errors import InvalidAuthFactorTypeError, InvalidChallengeError, InvalidChallengeFormatError
from server.jwk import parse_wallet_jwk
from server.policy import KbiField, strptime_format
from server.wla import TokenRules
from tests.fakes import FakeClock, FakeHasher, MemoryStore

PARTNER = "unit-wallet"
FIELDS = (KbiField("dob", "date", "dd/MM/yyyy"), KbiField("fullName", "text"))


def kbi_challenge(answers: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(answers).encode()).rstrip(b"=").decode()


class World:
    """One individual in the fakes, with a PIN and KBI attributes enrolled."""

    def __init__(self) -> None:
        self.hasher = FakeHasher()
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.individual_id = f"{secrets.randbelow(10**12):012d}"
        self.id_hmac = self.hasher.mac("individual-id", self.individual_id)
        self.pin = "246810"
        self.identity = Identity(self.id_hmac, None, None, "U", pin_hmac(self.hasher, self.id_hmac, self.pin))
        kbi = enrolment_hmacs(self.hasher, FIELDS, self.id_hmac, {"dob": "1990-04-01", "fullName": "Zoë  Müller"})
        self.store.upsert_identity(self.identity, kbi=kbi)
        self.ctx = AuthContext(
            self.hasher,
            self.clock,
            self.store,
            self.store,
            self.store,
            self.store,
            unit_rules,
            exact_subject,
            kbi_fields=FIELDS,
        )

    def attempt(self, *, known: bool = True) -> Attempt:
        return Attempt(self.identity if known else None, self.individual_id, self.id_hmac, PARTNER)

    def send_otp(self, otp: str = "123456") -> str:
        tid = secrets.token_urlsafe(24)
        now = self.clock.now()
        record = OtpRecord(tid, self.id_hmac, PARTNER, self.hasher.mac(MAC_OTP, tid, otp), now, now + timedelta(60), 3)
        self.store.replace_otp(record)
        return tid


@pytest.fixture
def world() -> World:
    return World()


# -- every registered factor keeps the contract -------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_registered_factor_is_an_auth_factor_named_as_registered(world: World, name: str) -> None:
    factor = REGISTRY[name](world.ctx)
    assert isinstance(factor, OtpFactor | PinFactor | WlaFactor | KbiFactor)
    checked: AuthFactor = factor
    assert checked.name == name
    assert checked.format in {"alpha-numeric", "number", "jwt", "base64url-encoded-json"}
    assert not checked.well_formed("")


# -- OTP ----------------------------------------------------------------------------------------


def test_otp_right_answer_passes_and_names_the_transaction_to_consume(world: World) -> None:
    tid = world.send_otp("A1B2C3")
    otp = OtpFactor(world.hasher, world.clock, world.store)
    assert otp.well_formed("A1B2C3")
    assert not otp.well_formed("A1B2C")
    assert not otp.well_formed("A1B2C!")
    verdict = otp.verify(world.attempt(), "A1B2C3")
    assert (verdict.passed, verdict.consumed_otp) == (True, tid)
    assert world.store.otp_state(tid) == ("pending", 1)  # consumed with the binding, not here


def test_otp_wrong_answers_spend_the_attempts(world: World) -> None:
    tid = world.send_otp("A1B2C3")
    otp = OtpFactor(world.hasher, world.clock, world.store)
    assert [otp.verify(world.attempt(), "ZZZZZZ").passed for _ in range(3)] == [False] * 3
    assert not otp.verify(world.attempt(), "A1B2C3").passed  # the right one comes too late
    assert world.store.otp_state(tid) == ("pending", 3)


def test_otp_without_an_outstanding_otp_fails(world: World) -> None:
    assert not OtpFactor(world.hasher, world.clock, world.store).verify(world.attempt(), "123456").passed


# -- PIN ----------------------------------------------------------------------------------------


def test_pin(world: World) -> None:
    pin = PinFactor(world.hasher)
    assert pin.well_formed("012345")
    assert not pin.well_formed("01234a")
    assert not pin.well_formed("0123456")
    assert pin.verify(world.attempt(), world.pin).passed
    assert not pin.verify(world.attempt(), "135790").passed
    assert not pin.verify(world.attempt(known=False), world.pin).passed
    no_pin = Attempt(Identity(world.id_hmac, None, None, None, None), world.individual_id, world.id_hmac, PARTNER)
    assert not pin.verify(no_pin, world.pin).passed


# -- WLA ----------------------------------------------------------------------------------------


def bound_wallet(world: World) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A wallet key with an active WLA binding in the fake store (issuer key in software: no HSM here)."""
    now = world.clock.now()
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert = build_issuer_certificate(issuer_key, common_name="unit", now=now, validity=timedelta(days=30))
    wallet = ec.generate_private_key(ec.SECP256R1())
    jwk = json.dumps(ECKey.import_key(wallet.public_key()).as_dict())
    cert = issue_wallet_certificate(
        Issuer("unit", issuer_cert, issuer_key),
        parse_wallet_jwk(jwk).public_key,
        psut="psut",
        now=now,
        validity=timedelta(days=1),
    )
    thumbprint = x5t_s256(cert)
    binding = Binding(
        world.id_hmac,
        PARTNER,
        "WLA",
        "psut",
        "fp",
        to_pem(cert),
        thumbprint,
        "1",
        "unit",
        now,
        cert.not_valid_after_utc,
    )
    world.store.commit_binding(binding, consume_otp=None, now=now)
    return wallet, thumbprint


def wla_token(world: World, wallet: ec.EllipticCurvePrivateKey, thumbprint: str, *, sub: str | None = None) -> str:
    iat = int(world.clock.now().timestamp())
    claims = {"sub": sub or world.individual_id, "aud": "unit", "iat": iat, "exp": iat + 60, "jti": str(uuid.uuid4())}
    header = {"alg": "ES256", "x5t#S256": thumbprint}
    return jws.serialize_compact(header, json.dumps(claims).encode(), ECKey.import_key(wallet), algorithms=["ES256"])


def unit_rules(partner_id: str) -> TokenRules:
    return TokenRules("unit")


def exact_subject(individual_id: str) -> Callable[[str], bool]:
    return lambda sub: sub == individual_id


def test_wla_right_token_passes_once(world: World) -> None:
    wallet, thumbprint = bound_wallet(world)
    wla = WlaFactor(world.store, world.store, world.clock, unit_rules, exact_subject)
    token = wla_token(world, wallet, thumbprint)
    assert wla.well_formed(token)
    assert wla.verify(world.attempt(), token).passed
    assert not wla.verify(world.attempt(), token).passed  # replayed


def test_wla_refusals_are_failures_with_the_reason_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    wallet, thumbprint = bound_wallet(world)
    wla = WlaFactor(world.store, world.store, world.clock, unit_rules, exact_subject)
    with caplog.at_level(logging.INFO, logger="server.auth.wla"):
        assert not wla.verify(world.attempt(), wla_token(world, wallet, thumbprint, sub="someone-else")).passed
        other = ec.generate_private_key(ec.SECP256R1())
        assert not wla.verify(world.attempt(), wla_token(world, other, thumbprint)).passed
    assert [r.getMessage() for r in caplog.records] == [
        "WLA challenge refused: invalid_token_subject",
        "WLA challenge refused: invalid_token_signature",
    ]


# -- KBI ----------------------------------------------------------------------------------------


def test_kbi_normalises_text_and_dates() -> None:
    text, date = KbiField("name"), KbiField("dob", "date", "dd/MM/yyyy")
    assert normalise(text, "  Zoë\u00a0 MÜLLER \t") == "zoë müller"  # NFKC (no-break space), case, whitespace
    assert normalise(text, "ｆｕｌｌ") == "full"  # fullwidth letters, NFKC
    assert normalise(text, "Straße") == normalise(text, "STRASSE")  # case folding, not lower()
    assert normalise(text, "   ") is None
    assert normalise(text, "x" * 257) is None
    assert normalise(date, "01/04/1990") == normalise(date, "1990-04-01") == "1990-04-01"
    assert normalise(date, "31/02/1990") is None
    assert strptime_format("yyyy-MM-dd") == "%Y-%m-%d"
    for bad in ("dd/mm/yyyy", "yyyy-MM", "yyyy-MM-dd HH", "yyyy-MM-dd-dd"):
        with pytest.raises(ValueError, match="KBI date format"):
            strptime_format(bad)


def test_kbi_right_answers_pass_in_any_spelling(world: World) -> None:
    kbi = KbiFactor(world.hasher, world.store, FIELDS)
    challenge = kbi_challenge({"dob": "01/04/1990", "fullName": "ZOË MÜLLER"})
    assert kbi.well_formed(challenge)
    assert kbi.verify(world.attempt(), challenge).passed
    padded = base64.urlsafe_b64encode(json.dumps({"dob": "1990-04-01", "fullName": "zoë müller"}).encode()).decode()
    assert kbi.verify(world.attempt(), padded).passed  # padding or not, as Java's URL decoder


def test_kbi_wrong_or_unenrolled_answers_fail(world: World) -> None:
    kbi = KbiFactor(world.hasher, world.store, FIELDS)
    assert not kbi.verify(world.attempt(), kbi_challenge({"dob": "02/04/1990", "fullName": "Zoë Müller"})).passed
    assert not kbi.verify(world.attempt(), kbi_challenge({"dob": "01/04/1990", "fullName": "Zoe Muller"})).passed
    right = kbi_challenge({"dob": "01/04/1990", "fullName": "Zoë Müller"})
    assert not kbi.verify(world.attempt(known=False), right).passed
    world.store.upsert_identity(world.identity)  # no KBI attributes enrolled any more
    assert not kbi.verify(world.attempt(), right).passed


@pytest.mark.parametrize(
    "challenge",
    [
        pytest.param(kbi_challenge({"dob": "01/04/1990"}), id="field-missing"),
        pytest.param(kbi_challenge({"dob": "01/04/1990", "fullName": "Z", "pet": "x"}), id="unknown-field"),
        pytest.param(kbi_challenge({"dob": "1 April 1990", "fullName": "Z"}), id="not-a-date"),
        pytest.param(kbi_challenge({"dob": "01/04/1990", "fullName": 7}), id="not-a-string"),
        pytest.param(kbi_challenge({"dob": "01/04/1990", "fullName": ""}), id="empty"),
        pytest.param(kbi_challenge(["01/04/1990", "Z"]), id="not-an-object"),
        pytest.param("eyJkb2IiOiAi", id="truncated-json"),
        pytest.param("not base64!", id="not-base64url"),
        pytest.param("A" * 2049, id="too-long"),
        pytest.param(base64.urlsafe_b64encode(b"\xff\xfe{}").decode(), id="not-utf8"),
    ],
)
def test_kbi_malformed_challenges_are_not_well_formed(challenge: str) -> None:
    assert decode_answers(challenge, FIELDS) is None


def test_kbi_enrolment_needs_every_configured_field_and_never_echoes_a_value() -> None:
    hasher = FakeHasher()
    with pytest.raises(ValueError, match=r"unknown KBI field\(s\) \['pet'\]"):
        enrolment_hmacs(hasher, FIELDS, b"id", {"dob": "1990-04-01", "fullName": "Z", "pet": "secret-pet"})
    with pytest.raises(ValueError, match=r"\['fullName'\] missing") as missing:
        enrolment_hmacs(hasher, FIELDS, b"id", {"dob": "1990-04-01"})
    with pytest.raises(ValueError, match="'dob' must be a date") as bad_date:
        enrolment_hmacs(hasher, FIELDS, b"id", {"dob": "secret-1990", "fullName": "Z"})
    assert "secret" not in str(missing.value) + str(bad_date.value)
    assert hasher.calls == []  # nothing hashed for a refused enrolment
    stored = enrolment_hmacs(hasher, FIELDS, b"id", {"dob": "01/04/1990", "fullName": " z "})
    assert set(stored) == {"dob", "fullName"}
    assert hasher.calls == [MAC_KBI, MAC_KBI]
    assert all(len(v) == 32 for v in stored.values())


# -- the registry and the rules ----------------------------------------------------------------------


def test_factors_validate_count_factor_format_shape_and_rules(world: World) -> None:
    factors = Factors(world.ctx, {"OTP", "PIN", "WLA", "KBI"}, [{"OTP"}, {"PIN"}, {"WLA"}])
    right_kbi = kbi_challenge({"dob": "01/04/1990", "fullName": "Zoë Müller"})
    factors.validate(
        [Challenge("KBI", "base64url-encoded-json", right_kbi), Challenge("OTP", "alpha-numeric", "1A2B3C")]
    )
    with pytest.raises(InvalidAuthFactorTypeError, match=r"\['KBI'\] do not suffice together; a binding needs OTP"):
        factors.validate([Challenge("KBI", "base64url-encoded-json", right_kbi)])
    with pytest.raises(InvalidChallengeFormatError):
        factors.validate([Challenge("KBI", "encoded-json", right_kbi)])
    with pytest.raises(InvalidChallengeError, match="malformed KBI"):
        factors.validate([Challenge("KBI", "base64url-encoded-json", "e30"), Challenge("PIN", "number", "123456")])
    with pytest.raises(InvalidAuthFactorTypeError, match="unsupported"):
        factors.validate([Challenge("BIO", "encoded-json", "{}")])
    assert factors.supported_formats("KBI") == ["base64url-encoded-json"]
    assert factors.supported_formats("BIO") == []


def test_a_factor_missing_from_the_registry_is_not_offered_and_its_rules_lapse(world: World) -> None:
    registry = {name: build for name, build in REGISTRY.items() if name != "PIN"}
    factors = Factors(world.ctx, {"OTP", "PIN", "WLA"}, [{"OTP"}, {"PIN"}, {"WLA"}], registry)
    assert sorted(factors) == ["OTP", "WLA"]
    assert factors.supported_formats("PIN") == []
    assert factors.rules == (frozenset({"OTP"}), frozenset({"WLA"}))
    with pytest.raises(InvalidAuthFactorTypeError, match="unsupported"):
        factors.validate([Challenge("PIN", "number", "123456")])


def test_factor_settings_are_checked() -> None:
    check_factor_settings(["OTP", "KBI"], [["OTP"], ["PIN"]], kbi_fields=FIELDS)
    cases: list[tuple[list[str], list[list[str]], tuple[KbiField, ...], str]] = [
        (["OTP", "SMS"], [["OTP"]], (), r"unknown factor\(s\) \['SMS'\]"),
        (["OTP", "KBI"], [["OTP"]], (), "configure kbi_fields"),
        (["KBI"], [["OTP"]], FIELDS, "no combination can be met"),
        (["OTP"], [[]], (), "empty combination"),
        (["OTP"], [], (), "at least one combination"),
        (["OTP"], [["OTP"]], (KbiField("a"), KbiField("a")), "each field id may appear once"),
    ]
    for factors, rules, fields, message in cases:
        with pytest.raises(ValueError, match=message):
            check_factor_settings(factors, rules, kbi_fields=fields)


def test_kbi_challenge_may_carry_the_individual_id_as_esignet_forms_do(world: World) -> None:
    """eSignet lists the individual-ID field among the KBI field details; its value must be the request's ID."""
    with_id = (KbiField("individualId"), *FIELDS)  # field details pasted from eSignet
    kbi = KbiFactor(world.hasher, world.store, with_id, "individualId")
    answers = {"dob": "01/04/1990", "fullName": "Zoë Müller"}
    assert kbi.verify(world.attempt(), kbi_challenge(answers)).passed  # the ID is optional in the challenge
    assert kbi.verify(world.attempt(), kbi_challenge({**answers, "individualId": world.individual_id})).passed
    assert not kbi.verify(world.attempt(), kbi_challenge({**answers, "individualId": "someone-else"})).passed
    assert not kbi.well_formed(kbi_challenge({**answers, "individualId": 7}))
    # The ID field is no question: enrolment neither needs nor takes it.
    assert set(enrolment_hmacs(world.hasher, with_id, b"id", {"dob": "1990-04-01", "fullName": "z"})) == {
        "dob",
        "fullName",
    }
    with pytest.raises(ValueError, match=r"unknown KBI field\(s\) \['individualId'\]"):
        enrolment_hmacs(world.hasher, with_id, b"id", {"dob": "1990-04-01", "fullName": "z", "individualId": "1"})
    with pytest.raises(ValueError, match="configure at least one question"):
        check_factor_settings(["OTP"], [["OTP"]], kbi_fields=(KbiField("individualId"),))
