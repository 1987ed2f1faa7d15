"""Structured logs: JSON lines with the request context, one access line per RPC, x-request-id echoed back,
text on a terminal, and no secret in any field."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from server.config import Settings
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import new_wallet_key
from server.logs import clean_header, make_handler, use_json
from tests.conftest import (
    PARTNER,
    Person,
    RunningServer,
    bind_request,
    md,
    new_person,
    other_otp,
    other_pin,
    otp_challenge,
    pin_challenge,
    running,
    send_otp,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class JsonLog:
    """A JSON handler on the root logger, as `keybinder serve` installs it, writing to memory."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def access(self, request_id: str) -> dict[str, Any]:
        [line] = [x for x in self.lines() if x["logger"] == "keybinder.access" and x["request_id"] == request_id]
        return line


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[JsonLog]:
    caplog.set_level(logging.INFO)
    log = JsonLog()
    handler = make_handler("json", log.stream)
    logging.getLogger().addHandler(handler)
    try:
        yield log
    finally:
        logging.getLogger().removeHandler(handler)


def trailing(call: grpc.Call | grpc.RpcError) -> dict[str, str]:
    return {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}


def test_the_callers_request_id_is_logged_and_returned(kb: RunningServer, json_log: JsonLog) -> None:
    request = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP")
    metadata = (*md(), ("x-request-id", "req-42/abc"))
    response, call = kb.stub.GetSupportedChallengeFormats.with_call(request, metadata=metadata)
    assert list(response.formats) == ["alpha-numeric"]
    assert trailing(call)["x-request-id"] == "req-42/abc"
    line = json_log.access("req-42/abc")
    assert line["method"] == "GetSupportedChallengeFormats"
    assert line["partner"] == PARTNER
    assert line["outcome"] == "ok"
    assert line["reason"] is None
    assert line["code"] == "OK"
    assert isinstance(line["duration_ms"], float)
    assert 0 < line["duration_ms"] < 10_000
    assert line["level"] == "INFO"
    assert line["pid"] == os.getpid()
    assert line["time"].startswith(time.strftime("%Y-", time.gmtime()))


def test_without_a_request_id_one_is_generated(kb: RunningServer, json_log: JsonLog) -> None:
    request = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN")
    _, call = kb.stub.GetSupportedChallengeFormats.with_call(request, metadata=md())
    request_id = trailing(call)["x-request-id"]
    assert UUID.match(request_id)
    assert json_log.access(request_id)["outcome"] == "ok"
    _, again = kb.stub.GetSupportedChallengeFormats.with_call(request, metadata=md())
    assert trailing(again)["x-request-id"] != request_id


@pytest.mark.parametrize("bad", ["x" * 129, ""], ids=["too-long", "empty"])
def test_an_unusable_request_id_is_replaced(kb: RunningServer, json_log: JsonLog, bad: str) -> None:
    request = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="PIN")
    _, call = kb.stub.GetSupportedChallengeFormats.with_call(request, metadata=(*md(), ("x-request-id", bad)))
    request_id = trailing(call)["x-request-id"]
    assert UUID.match(request_id)
    assert json_log.access(request_id)["code"] == "OK"
    if bad:
        assert bad not in json_log.stream.getvalue()


def test_header_values_are_checked_before_they_are_logged() -> None:
    # gRPC clients only send printable ASCII in text metadata; the server does not rely on it.
    assert clean_header("abc-123_/:.=") == "abc-123_/:.="
    assert clean_header("x" * 128) == "x" * 128
    for bad in ("x" * 129, "", "a\nb", "a\x00", "caf\u00e9", b"bytes", None):
        assert clean_header(bad) is None


def test_a_refusal_logs_its_reason_and_still_returns_the_request_id(
    kb: RunningServer, person: Person, json_log: JsonLog
) -> None:
    _, jwk = new_wallet_key("ec-p256")
    request = bind_request(person, jwk, pin_challenge(other_pin(person.pin)))
    with pytest.raises(grpc.RpcError) as info:
        kb.stub.DoKeyBinding(request, metadata=(*md("other-partner"), ("x-request-id", "bad-pin-1")))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    meta = trailing(info.value)
    assert meta["x-request-id"] == "bad-pin-1"
    assert any(k == "grpc-status-details-bin" for k, _ in info.value.trailing_metadata() or ())
    line = json_log.access("bad-pin-1")
    assert (line["method"], line["partner"]) == ("DoKeyBinding", "other-partner")
    assert (line["outcome"], line["reason"], line["code"]) == ("refused", "auth_failed", "UNAUTHENTICATED")
    assert line["duration_ms"] > 0


def test_a_missing_partner_is_logged_as_none(kb: RunningServer, json_log: JsonLog) -> None:
    request = pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP")
    with pytest.raises(grpc.RpcError) as info:
        kb.stub.GetSupportedChallengeFormats(request, metadata=(("x-request-id", "no-partner"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    line = json_log.access("no-partner")
    assert line["partner"] is None
    assert line["reason"] == "required_header_missing"


def wla_refusal(stub: pb_grpc.KeyBinderServiceStub, person: Person, request_id: str) -> None:
    """A DoKeyBinding whose WLA challenge fails verification: the service logs why, inside the call."""
    _, jwk = new_wallet_key("ec-p256")
    token = "eyJhbGciOiJFUzI1NiJ9." + "A" * 120 + ".sig"
    challenge = pb.AuthChallenge(auth_factor_type="WLA", format="jwt", challenge=token)
    with pytest.raises(grpc.RpcError) as info:
        stub.DoKeyBinding(bind_request(person, jwk, challenge), metadata=(*md(), ("x-request-id", request_id)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def service_lines(log: JsonLog, request_id: str) -> list[dict[str, Any]]:
    # The service and the auth factors (server/auth/) log inside the call.
    return [
        x
        for x in log.lines()
        if x.get("request_id") == request_id and x["logger"].startswith(("server.service", "server.auth."))
    ]


def test_lines_logged_inside_the_call_carry_the_context_on_the_event_loop(
    kb: RunningServer, person: Person, json_log: JsonLog
) -> None:
    assert kb.server._executor is None  # SQLite by default: service calls run inline
    wla_refusal(kb.stub, person, "inline-1")
    [line] = service_lines(json_log, "inline-1")
    assert line["message"].startswith("WLA challenge refused")
    assert (line["method"], line["partner"]) == ("DoKeyBinding", PARTNER)


def test_lines_logged_inside_the_call_carry_the_context_on_a_thread_pool(
    settings: Settings, kb: RunningServer, json_log: JsonLog
) -> None:
    with running(settings.model_copy(update={"rpc_threads": 2})) as threaded:
        assert threaded.server._executor is not None
        wla_refusal(threaded.stub, new_person(kb), "threaded-1")
    [line] = service_lines(json_log, "threaded-1")
    assert line["message"].startswith("WLA challenge refused")
    assert line["method"] == "DoKeyBinding"
    assert json_log.access("threaded-1")["reason"] == "auth_failed"


def test_no_secret_reaches_any_log_field(kb: RunningServer, person: Person, json_log: JsonLog) -> None:
    """The hygiene test checks messages; structured fields (cause, partner, ...) must be as clean."""
    tx, otp = send_otp(kb, person)
    _, jwk = new_wallet_key("ec-p256")
    wrong_otp, wrong_pin = other_otp(otp), other_pin(person.pin)
    for challenge in (otp_challenge(wrong_otp), pin_challenge(wrong_pin)):
        with pytest.raises(grpc.RpcError):
            kb.stub.DoKeyBinding(bind_request(person, jwk, challenge), metadata=md())
    kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp), pin_challenge(person.pin)), metadata=md())
    metadata = md()  # the real API key, accepted
    kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=metadata
    )
    wrong_key = (("partner-id", PARTNER), ("partner-api-key", "kb_" + uuid.uuid4().hex))  # refused
    with pytest.raises(grpc.RpcError):
        kb.stub.GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=wrong_key
        )
    text = json_log.stream.getvalue()
    assert len([x for x in json_log.lines() if x["logger"] == "keybinder.access"]) >= 5
    hsm_pin = (kb.app.settings.data_dir / "hsm-pin").read_text().strip()
    for name, value in {
        "OTP": otp,
        "wrong OTP": wrong_otp,
        "PIN": person.pin,
        "wrong PIN": wrong_pin,
        "HSM PIN": hsm_pin,
        "individual ID": person.individual_id,
        "partner API key": metadata[-1][1],
        "wrong partner API key": wrong_key[-1][1],
    }.items():
        assert value not in text, f"{name} reached the log"
    assert tx  # transaction ids are not secret


def test_text_format_for_people() -> None:
    stream = io.StringIO()
    handler = make_handler("text", stream)
    record = logging.LogRecord("keybinder.access", logging.INFO, __file__, 1, "DoKeyBinding ok OK 1.0ms", (), None)
    record.request_id, record.partner = "r-1", "wallet"
    handler.handle(record)
    line = stream.getvalue()
    assert "INFO keybinder.access DoKeyBinding ok OK 1.0ms [request_id=r-1 partner=wallet]" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert use_json("auto", tty) is False
            assert use_json("json", tty) is True
    finally:
        os.close(leader)
        os.close(follower)
    assert use_json("auto", io.StringIO()) is True
    assert use_json("text", io.StringIO()) is False
