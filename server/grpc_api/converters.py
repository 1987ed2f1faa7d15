"""All translation between protobuf messages and domain values."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf.timestamp_pb2 import Timestamp
from joserfc.jwk import ECKey, OKPKey, RSAKey

from server.auth.base import Challenge
from server.certs import to_pem, x5t_s256
from server.domain import Binding, BindingStatus
from server.gen.keybinder.v1 import keybinder_pb2 as pb
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
    """PEM list (issuers, then the CA certificates above them, each once) plus a JWKS with one key per
    issuer: kid = x5t#S256 of its certificate, x5c = that certificate and the chain above it. A CA
    certificate above an issuer is in the PEM list for path building, never a key of the JWKS."""
    keys = []
    certificates = [issuer for issuer, _ in chains]
    for cert, chain in chains:
        certificates += [ca for ca in chain if ca not in certificates]
        public = cert.public_key()
        jwk: dict[str, Any]
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = dict(ECKey.import_key(public).as_dict())
            alg = "ES384" if public.curve.key_size == 384 else "ES256"
        elif isinstance(public, rsa.RSAPublicKey):
            jwk, alg = dict(RSAKey.import_key(public).as_dict()), "RS256"
        elif isinstance(public, ed25519.Ed25519PublicKey):
            jwk, alg = dict(OKPKey.import_key(public).as_dict()), "EdDSA"
        else:
            raise TypeError(f"unsupported issuer key type {type(public).__name__}")
        jwk.update(
            kid=x5t_s256(cert),
            use="sig",
            alg=alg,
            x5c=[base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in [cert, *chain]],
        )
        jwk["x5t#S256"] = x5t_s256(cert)
        keys.append(jwk)
    return pb.GetIssuerCertificatesResponse(
        certificates=[to_pem(c) for c in certificates], jwks=json.dumps({"keys": keys}, sort_keys=True)
    )
