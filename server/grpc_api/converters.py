"""All translation between protobuf messages and domain values."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from server.challenges import Challenge
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.service import KeyBindingResult, SendOtpResult


def challenges_from_proto(request: pb.DoKeyBindingRequest) -> list[Challenge]:
    return [Challenge(c.auth_factor_type, c.format, c.challenge) for c in request.challenges]


def send_otp_to_proto(result: SendOtpResult) -> pb.SendBindingOtpResponse:
    return pb.SendBindingOtpResponse(
        transaction_id=result.transaction_id,
        masked_email=result.masked_email,
        masked_mobile=result.masked_mobile,
    )


def key_binding_to_proto(result: KeyBindingResult) -> pb.DoKeyBindingResponse:
    expires = Timestamp()
    expires.FromDatetime(result.expires_at)
    return pb.DoKeyBindingResponse(
        certificate=result.certificate_pem,
        partner_specific_user_token=result.psut,
        expires_at=expires,
        thumbprint=result.thumbprint,
    )
