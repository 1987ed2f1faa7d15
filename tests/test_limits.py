"""Abuse limits through the real gRPC server: OTP send limits, the failed-challenge lockout, RetryInfo."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.config import load_settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.limits import Limits, RateRule
from server.stores import postgres as pg
from server.stores.postgres import PostgresStore
from server.stores.sqlite import SqliteStore
from tests.conftest import (
    PARTNER,
    Person,
    RunningServer,
    bind_request,
    failure,
    fresh_database,
    id_hmac,
    md,
    new_person,
    other_otp,
    other_pin,
    otp_challenge,
    pin_challenge,
    register_partner,
    send_otp,
    unregistered,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
OTHER_PARTNER = "limits-other-wallet"
#: Five failures in 15 minutes lock out for 30 s: shorter than the test server's 60 s OTP lifetime, so an
#: OTP sent before the lockout is still good after it.
LOCKOUT_SECONDS = 30
TIGHT = Limits(
    otp_sends_per_individual=RateRule(3, 600),
    otp_sends_per_partner=RateRule(1_000, 60),
    auth_failures=RateRule(5, 900),
    lockout_seconds=LOCKOUT_SECONDS,
)


class SteppingClock:
    """The real time plus an offset the test moves forward: the injectable clock of the service."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock(kb: RunningServer, monkeypatch: pytest.MonkeyPatch) -> SteppingClock:
    stepping = SteppingClock()
    monkeypatch.setattr(kb.app.service, "clock", stepping)
    return stepping


@pytest.fixture
def limits(kb: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Callable[[Limits], None]:
    """Give the running server other limits for one test (the session's are loose)."""

    def apply(new: Limits) -> None:
        monkeypatch.setattr(kb.app.service, "policy", replace(kb.app.service.policy, limits=new))

    apply(TIGHT)
    return apply


def retry_delay(call: Callable[[], object]) -> int:
    """The RPC must fail with too_many_attempts; the seconds of its google.rpc.RetryInfo."""
    f = failure(call)
    assert (f.code, f.reason) == (EXHAUSTED, "too_many_attempts"), f
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)
    assert status is not None
    retries = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retries) == 1, status
    retry = error_details_pb2.RetryInfo()
    retries[0].Unpack(retry)
    assert retry.retry_delay.nanos == 0
    return int(retry.retry_delay.seconds)


def bind(kb: RunningServer, p: Person, *challenges: pb.AuthChallenge) -> pb.DoKeyBindingResponse:
    request = bind_request(p, new_wallet_key("ec-p256")[1], *challenges)
    response: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(request, metadata=md())
    return response


def refused(kb: RunningServer, p: Person, challenge: pb.AuthChallenge) -> tuple[grpc.StatusCode, str]:
    f = failure(lambda: bind(kb, p, challenge))
    return f.code, f.reason


# -- the failed-challenge lockout -------------------------------------------------------------------


@pytest.mark.usefixtures("limits")
def test_brute_force_otp_guessing_is_locked_out_and_the_right_otp_waits(
    kb: RunningServer, person: Person, clock: SteppingClock
) -> None:
    tx1, otp1 = send_otp(kb, person)
    wrong = otp_challenge(other_otp(otp1))
    # Per OTP, as before: three guesses, then the OTP is spent (the fourth is auth_failed too).
    assert [refused(kb, person, wrong) for _ in range(4)] == [(UNAUTHENTICATED, "auth_failed")] * 4
    assert kb.app.store.otp_state(tx1) == ("pending", 3)

    tx2, otp2 = send_otp(kb, person)
    # The fifth failure for this individual starts the lockout.
    assert refused(kb, person, otp_challenge(other_otp(otp2))) == (UNAUTHENTICATED, "auth_failed")

    # Now even the correct OTP is refused, before it is looked at: its attempts are not spent.
    assert retry_delay(lambda: bind(kb, person, otp_challenge(otp2))) == LOCKOUT_SECONDS
    assert kb.app.store.otp_state(tx2) == ("pending", 1)
    # So is every other factor and every other RPC that takes challenges (the PIN is right too).
    assert retry_delay(lambda: bind(kb, person, pin_challenge(person.pin))) == LOCKOUT_SECONDS
    revoke = pb.RevokeBindingRequest(
        individual_id=person.individual_id, challenges=[pin_challenge(person.pin)], reason="lost phone"
    )
    assert retry_delay(lambda: kb.stub.RevokeBinding(revoke, metadata=md())) == LOCKOUT_SECONDS

    clock.advance(LOCKOUT_SECONDS - 1)
    assert retry_delay(lambda: bind(kb, person, otp_challenge(otp2))) == 1
    assert kb.app.store.bindings_for(id_hmac(kb, person), PARTNER) == []

    clock.advance(1)
    response = bind(kb, person, otp_challenge(otp2))
    assert response.certificate.startswith("-----BEGIN CERTIFICATE-----")
    assert kb.app.store.otp_state(tx2) == ("used", 2)


@pytest.mark.usefixtures("limits")
def test_a_success_forgives_no_failure(kb: RunningServer, person: Person, clock: SteppingClock) -> None:
    wrong = pin_challenge(other_pin(person.pin))
    assert [refused(kb, person, wrong) for _ in range(4)] == [(UNAUTHENTICATED, "auth_failed")] * 4
    bind(kb, person, pin_challenge(person.pin))
    # The success reset nothing: one more failure is the fifth in the window.
    assert refused(kb, person, wrong) == (UNAUTHENTICATED, "auth_failed")
    assert retry_delay(lambda: bind(kb, person, pin_challenge(person.pin))) == LOCKOUT_SECONDS
    # Failures expire with their window: after the lockout the individual has five attempts again.
    clock.advance(LOCKOUT_SECONDS)
    assert [refused(kb, person, wrong) for _ in range(4)] == [(UNAUTHENTICATED, "auth_failed")] * 4
    bind(kb, person, pin_challenge(person.pin))


@pytest.mark.usefixtures("limits")
def test_unknown_individuals_lock_out_like_known_ones(kb: RunningServer, person: Person) -> None:
    """Nothing to enumerate: the same answers, in the same order, for a registered and an unknown ID."""
    nobody = unregistered()
    wrong_person, wrong_nobody = pin_challenge(other_pin(person.pin)), pin_challenge(nobody.pin)
    for _ in range(5):
        assert (
            refused(kb, person, wrong_person) == refused(kb, nobody, wrong_nobody) == (UNAUTHENTICATED, "auth_failed")
        )
    assert retry_delay(lambda: bind(kb, person, wrong_person)) == retry_delay(lambda: bind(kb, nobody, wrong_nobody))


@pytest.mark.usefixtures("limits")
def test_lockout_is_per_individual(kb: RunningServer, person: Person) -> None:
    other = new_person(kb)
    for _ in range(5):
        refused(kb, person, pin_challenge(other_pin(person.pin)))
    assert retry_delay(lambda: bind(kb, person, pin_challenge(person.pin))) == LOCKOUT_SECONDS
    assert bind(kb, other, pin_challenge(other.pin)).thumbprint


def test_lockout_is_in_the_database_for_every_process(kb: RunningServer, limits: Callable[[Limits], None]) -> None:
    """Another process (here: another store on the same database file) sees the lockout."""
    p = new_person(kb)
    for _ in range(5):
        refused(kb, p, pin_challenge(other_pin(p.pin)))
    other_process = SqliteStore(kb.app.settings.database_path)
    try:
        identity, locked_until = other_process.identity_and_lock(id_hmac(kb, p))
    finally:
        other_process.close()
    assert identity is not None
    assert locked_until is not None
    assert locked_until > datetime.now(UTC) + timedelta(seconds=LOCKOUT_SECONDS - 5)


def test_postgres_replicas_share_counters() -> None:
    """Two stores on one PostgreSQL database, as two replicas: failures through one lock out on the other."""
    with fresh_database("kb_limits") as url:
        pg.migrate(url)
        first, second = PostgresStore(url), PostgresStore(url)
        try:
            from server.audit import individual_event

            who = secrets.token_bytes(32)
            now = datetime.now(UTC)
            rules = Limits(auth_failures=RateRule(4, 900), lockout_seconds=60)
            for n in range(4):
                replica = (first, second)[n % 2]
                event = individual_event(who, now, PARTNER, "do_key_binding", "refused", "auth_failed")
                replica.record_auth_failure(who, now, rules, audit=event, lockout_audit=event)
            assert first.identity_and_lock(who) == second.identity_and_lock(who) == (None, now + timedelta(seconds=60))
            partner_rule = RateRule(3, 60)
            counts = [(first, second)[n % 2].count_partner_otp_send(PARTNER, now, partner_rule) for n in range(4)]
            assert counts == [0, 0, 0, 60]
        finally:
            first.close()
            second.close()


# -- OTP send limits -----------------------------------------------------------------------------------


def send(kb: RunningServer, p: Person, partner: str = PARTNER) -> pb.SendBindingOtpResponse:
    request = pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"])
    response: pb.SendBindingOtpResponse = kb.stub.SendBindingOtp(request, metadata=md(partner))
    return response


@pytest.mark.usefixtures("limits")
def test_otp_sends_per_individual(kb: RunningServer, person: Person, clock: SteppingClock) -> None:
    send(kb, person)
    send(kb, person, OTHER_PARTNER)  # counted per individual, whichever partner asks
    last = send(kb, person)
    clock.advance(60)
    assert retry_delay(lambda: send(kb, person)) == 600 - 60
    assert retry_delay(lambda: send(kb, person, OTHER_PARTNER)) == 600 - 60
    # The refused sends replaced nothing: the last OTP sent is still the one that works.
    assert kb.app.store.otp_state(last.transaction_id) == ("pending", 0)
    assert send(kb, new_person(kb)).transaction_id  # others are not affected
    clock.advance(600 - 60)
    send(kb, person)


def test_otp_sends_per_partner_per_minute(
    kb: RunningServer, person: Person, clock: SteppingClock, limits: Callable[[Limits], None]
) -> None:
    limits(replace(TIGHT, otp_sends_per_partner=RateRule(4, 60)))
    partner = f"burst-{secrets.token_hex(4)}"
    register_partner(kb.app.store, partner)
    send(kb, person, partner)
    send(kb, new_person(kb), partner)
    # Unknown individuals count too: that is what bounds probing for registered IDs.
    for _ in range(2):
        assert failure(lambda: send(kb, unregistered(), partner)).reason == "send_otp_failed"
    clock.advance(10)
    assert retry_delay(lambda: send(kb, new_person(kb), partner)) == 50
    assert retry_delay(lambda: send(kb, unregistered(), partner)) == 50
    send(kb, person, OTHER_PARTNER)  # another partner is not affected
    clock.advance(50)
    send(kb, person, partner)


# -- configuration -------------------------------------------------------------------------------------


def test_limits_come_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(data_dir=tmp_path).policy().limits == Limits()
    config = tmp_path / "keybinder.toml"
    config.write_text("otp_sends_per_individual = 2\nauth_failures_before_lockout = 7\nlockout_seconds = 120\n")
    monkeypatch.setenv("KEYBINDER_OTP_SENDS_PER_PARTNER_PER_MINUTE", "50")
    limits = load_settings(config, data_dir=tmp_path, otp_send_window_seconds=300).policy().limits
    assert limits == Limits(
        otp_sends_per_individual=RateRule(2, 300),
        otp_sends_per_partner=RateRule(50, 60),
        auth_failures=RateRule(7, 900),
        lockout_seconds=120,
    )


@pytest.mark.parametrize(
    "setting",
    ["otp_sends_per_individual", "auth_failures_before_lockout", "lockout_seconds", "otp_send_window_seconds"],
)
def test_limits_must_be_positive(tmp_path: Path, setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        load_settings(None, data_dir=tmp_path, **{setting: 0})
