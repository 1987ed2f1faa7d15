"""Server plumbing through the real port: health, reflection, limits, unexpected errors."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.decoding import MAX_REQUEST_BYTES, MAX_WIRE_BYTES
from server.serve import SERVICE_NAME
from tests.conftest import Person, RunningServer, bind_request, failure, md, otp_challenge


@pytest.mark.parametrize("service", ["", "keybinder.v1.KeyBinderService"])
def test_health_reports_serving(kb: RunningServer, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(kb.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_needs_no_partner_header(kb: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(kb.channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(kb: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(kb.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names


def test_reflection_serves_the_descriptor(kb: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(kb.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert response.file_descriptor_response.file_descriptor_proto


def test_oversized_request_is_refused_before_parsing(kb: RunningServer, person: Person) -> None:
    # Over our limit: refused unparsed, with the reason of the field that made it large.
    huge = "x" * (MAX_REQUEST_BYTES + 1)
    f = failure(lambda: kb.stub.DoKeyBinding(bind_request(person, huge, otp_challenge("ABC123")), metadata=md()))
    assert (f.code, f.reason, f.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_public_key",
        {"field": "public_key_jwk"},
    )
    # Over gRPC's own limit: refused by gRPC before it is even buffered whole.
    with pytest.raises(grpc.RpcError) as info:
        kb.stub.DoKeyBinding(bind_request(person, "x" * MAX_WIRE_BYTES, otp_challenge("ABC123")), metadata=md())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_jwk_just_over_the_jwk_limit_is_an_invalid_public_key(kb: RunningServer, person: Person) -> None:
    jwk = '{"kty": "EC", "pad": "' + "x" * 20_000 + '"}'
    err = failure(lambda: kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge("ABC123")), metadata=md()))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_public_key")


def test_unexpected_failure_is_internal_with_a_generic_message(
    kb: RunningServer, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> list[str]:
        raise RuntimeError("secret detail 246810 that must stay in the server log")

    monkeypatch.setattr(kb.app.service, "get_supported_challenge_formats", explode)
    err = failure(
        lambda: kb.stub.GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=md()
        )
    )
    assert (err.code, err.reason, err.domain) == (grpc.StatusCode.INTERNAL, "key_binding_failed", "keybinder")
    assert err.message == "internal error"
