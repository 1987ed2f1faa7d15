"""Requests that cannot be decoded (too large, invalid UTF-8, malformed wire data) get a reason code.

Left to grpcio, a request whose string field holds invalid UTF-8 fails in the generated deserializer and
the client sees UNKNOWN with no ErrorInfo; one over gRPC's size limit gets RESOURCE_EXHAUSTED with none.
``add_servicer`` registers each KeyBinderService method with a deserializer that refuses a request over
``MAX_REQUEST_BYTES`` before it is parsed, and an undecodable one with the reason of the field at fault
(found by reading the raw fields without the UTF-8 check), e.g. ``invalid_challenge`` for
``challenges[0].challenge``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, empty_pb2
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from server import errors
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.status import to_status

#: The largest request parsed; a JWK is at most 16 KiB and five challenges at most ~40 KiB.
MAX_REQUEST_BYTES = 128 * 1024
#: gRPC's own limit, above ours so that a request between the two gets a reason code; beyond it gRPC
#: refuses with RESOURCE_EXHAUSTED (no ErrorInfo) without buffering more.
MAX_WIRE_BYTES = 4 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["KeyBinderService"]
_LENGTH_DELIMITED = 2

#: The eSignet reason of each request field, by field name (the same name means the same thing in every RPC).
FIELD_ERRORS: dict[str, type[errors.KeyBinderError]] = {
    "individual_id": errors.InvalidIndividualIdError,
    "otp_channels": errors.InvalidOtpChannelError,
    "challenges": errors.InvalidChallengeError,
    "auth_factor_type": errors.InvalidAuthFactorTypeError,
    "format": errors.InvalidChallengeFormatError,
    "challenge": errors.InvalidChallengeError,
    "public_key_jwk": errors.InvalidPublicKeyError,
    "bind_auth_factor_type": errors.InvalidBindAuthFactorTypeError,
    "token": errors.InvalidWlaTokenError,
    "proof_of_possession": errors.InvalidProofOfPossessionError,
    "reason": errors.InvalidRevocationReasonError,
}


class Undecodable:
    """Stands in for the request message; the handler answers with ``error``."""

    def __init__(self, error: errors.KeyBinderError) -> None:
        self.error = error


def _raw_fields(raw: bytes) -> list[Any]:
    """The message's fields as protobuf's unknown fields: numbers and raw bytes, no UTF-8 check."""
    holder = empty_pb2.Empty()
    holder.ParseFromString(raw)
    fields = UnknownFieldSet(holder)
    return [fields[i] for i in range(len(fields))]


def bad_utf8_field(raw: bytes, message: descriptor.Descriptor) -> str | None:
    """The path of the first string field (nested ones too) whose bytes are not UTF-8, if any."""
    seen: dict[int, int] = {}
    for item in _raw_fields(raw):
        field = message.fields_by_number.get(item.field_number)
        index = seen.get(item.field_number, 0)
        seen[item.field_number] = index + 1
        if field is None or item.wire_type != _LENGTH_DELIMITED:
            continue
        name = f"{field.name}[{index}]" if field.is_repeated else field.name
        if field.type == descriptor.FieldDescriptor.TYPE_STRING:
            try:
                item.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            nested = bad_utf8_field(item.data, field.message_type)
            if nested is not None:
                return f"{name}.{nested}"
    return None


def largest_field(raw: bytes, message: descriptor.Descriptor) -> str | None:
    sizes: dict[str, int] = {}
    for item in _raw_fields(raw):
        field = message.fields_by_number.get(item.field_number)
        if field is not None and item.wire_type == _LENGTH_DELIMITED:
            sizes[field.name] = sizes.get(field.name, 0) + len(item.data)
    return max(sizes, key=lambda name: sizes[name]) if sizes else None


def _field_error(path: str | None, sentence: str) -> errors.KeyBinderError:
    leaf = path.rsplit(".", 1)[-1].split("[", 1)[0] if path else ""
    error_type = FIELD_ERRORS.get(leaf, errors.InvalidArgumentError)
    return error_type(sentence, metadata={"field": path} if path else None)


def safe_deserializer(message: descriptor.Descriptor, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            if len(raw) > MAX_REQUEST_BYTES:
                field = largest_field(raw, message)
                return Undecodable(_field_error(field, f"the request exceeds {MAX_REQUEST_BYTES} bytes"))
            try:
                return parse(raw)
            except DecodeError:
                field = bad_utf8_field(raw, message)
                if field is not None:
                    return Undecodable(_field_error(field, f"{field} is not valid UTF-8"))
                return Undecodable(errors.InvalidArgumentError("the request is not a valid protobuf message"))
        except DecodeError:  # the raw fields themselves are malformed
            return Undecodable(errors.InvalidArgumentError("the request is not a valid protobuf message"))

    return deserialize


def _refusing(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort_with_status(to_status(request.error))
        return await behavior(request, context)

    return handle


def add_servicer(servicer: object, server: grpc.aio.Server) -> None:
    """Register every unary KeyBinderService method of ``servicer`` with the safe deserializer and the
    refusal of undecodable requests built in once, here, rather than by an interceptor on every call
    (which would rebuild the handler per request)."""
    handlers = {}
    for method in _SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _refusing(getattr(servicer, method.name)),
            request_deserializer=safe_deserializer(method.input_type, request_type.FromString),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)
