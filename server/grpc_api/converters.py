"""All translation between protobuf messages and domain values."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from server.auth.base import Challenge
from server.domain import Binding, BindingStatus
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.issuers import issuer_jwks, published_pems
from server.service import KeyBindingResult, SendOtpResult, WalletTokenResult

_STATUS = {
    BindingStatus.ACTIVE: pb.BINDING_STATUS_ACTIVE,
    BindingStatus.SUPERSEDED: pb.BINDING_STATUS_SUPERSEDED,
    BindingStatus.REVOKED: pb.BINDING_STATUS_REVOKED,
    BindingStatus.EXPIRED: pb.BINDING_STATUS_EXPIRED,
}


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def challenges_from_proto(challenges: Iterable[pb.AuthChallenge]) -> list[Challenge]:
    return [Challenge(c.auth_factor_type, c.format, c.challenge) for c in challenges]


def send_otp_to_proto(result: SendOtpResult) -> pb.SendBindingOtpResponse:
    return pb.SendBindingOtpResponse(
        transaction_id=result.transaction_id,
        masked_email=result.masked_email,
        masked_mobile=result.masked_mobile,
    )


def key_binding_to_proto(result: KeyBindingResult) -> pb.DoKeyBindingResponse:
    return pb.DoKeyBindingResponse(
        certificate=result.certificate_pem,
        partner_specific_user_token=result.psut,
        expires_at=timestamp(result.expires_at),
        thumbprint=result.thumbprint,
    )


def wallet_token_to_proto(result: WalletTokenResult) -> pb.VerifyWalletTokenResponse:
    return pb.VerifyWalletTokenResponse(
        valid=True,
        partner_specific_user_token=result.psut,
        thumbprint=result.thumbprint,
        binding_expires_at=timestamp(result.binding_expires_at),
        jti=result.jti,
        token_expires_at=timestamp(result.token_expires_at),
    )


def binding_to_proto(binding: Binding, status: BindingStatus) -> pb.GetBindingResponse:
    ended = binding.revoked_at or binding.superseded_at
    return pb.GetBindingResponse(
        status=_STATUS[status],
        thumbprint=binding.cert_thumbprint,
        partner_specific_user_token=binding.psut,
        bind_auth_factor_type=binding.auth_factor_type,
        certificate=binding.certificate_pem,
        created_at=timestamp(binding.created_at),
        expires_at=timestamp(binding.expires_at),
        ended_at=timestamp(ended) if ended is not None else None,
        revocation_reason=binding.revocation_reason or "",
    )


def issuers_to_proto(chains: list[tuple[x509.Certificate, list[x509.Certificate]]]) -> pb.GetIssuerCertificatesResponse:
    """The PEM list (for path building) and the JWKS (server/issuers.py builds both)."""
    return pb.GetIssuerCertificatesResponse(
        certificates=published_pems(chains), jwks=json.dumps(issuer_jwks(chains), sort_keys=True)
    )
