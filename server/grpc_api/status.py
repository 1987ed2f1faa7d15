"""Domain errors to gRPC status with google.rpc.ErrorInfo (and RetryInfo) details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import KeyBinderError, Status

ERROR_DOMAIN = "keybinder"

_CODES: dict[Status, int] = {
    Status.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Status.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    Status.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    Status.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Status.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    Status.UNAVAILABLE: code_pb2.UNAVAILABLE,
    Status.INTERNAL: code_pb2.INTERNAL,
    Status.NOT_FOUND: code_pb2.NOT_FOUND,
    Status.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
}


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(err: KeyBinderError) -> grpc.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))]
    retry_after = getattr(err, "retry_after_seconds", None)
    if retry_after is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after))))
    return rpc_status.to_status(status_pb2.Status(code=_CODES[err.status], message=err.message, details=details))


def internal_status() -> grpc.Status:
    """For errors we did not foresee: a generic sentence; the detail goes to the server log."""
    info = error_details_pb2.ErrorInfo(reason="key_binding_failed", domain=ERROR_DOMAIN)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)])
    )
