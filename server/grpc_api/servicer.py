"""The KeyBinderService servicer: a thin async adapter over the synchronous service layer."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from server.errors import KeyBinderError, RequiredHeaderMissingError
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api import converters
from server.grpc_api.status import internal_status, to_status
from server.observability import Rpc, otps_sent
from server.service import KeyBinderService

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def partner_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "partner-id" and isinstance(value, str) and value:
            return value
    raise RequiredHeaderMissingError("the partner-id header is required")


def mapped_errors(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn domain errors into their status; anything unforeseen into a generic INTERNAL."""

    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        # Observability: request context for logs, the access-log line (with a refusal's reason and
        # cause) and metrics at the end, x-request-id in the trailing metadata (see server.observability).
        with Rpc(name, context) as rpc:
            try:
                return await method(self, request, context)
            except KeyBinderError as err:
                rpc.refused(err)
                await context.abort_with_status(rpc.status(to_status(err)))
            except asyncio.CancelledError:
                raise
            except Exception:
                if context.code() is not None:  # already aborted
                    raise
                log.exception("%s failed unexpectedly", name)
                rpc.failed()
                await context.abort_with_status(rpc.status(internal_status()))
        raise AssertionError("unreachable")  # abort_with_status always raises

    return wrapper


class KeyBinderServicer(pb_grpc.KeyBinderServiceServicer):
    def __init__(self, service: KeyBinderService, executor: Executor | None) -> None:
        self.service = service
        self.executor = executor

    async def _run(self, fn: Callable[[], Resp]) -> Resp:
        # Service calls block on the HSM and the database: on a thread pool they overlap those waits;
        # without one (executor None) they run right here, which costs the least CPU when every wait
        # is short (SQLite, an in-process HSM).
        if self.executor is None:
            return fn()
        # The request context (server.logs) follows the call: run_in_executor does not copy it.
        return await asyncio.get_running_loop().run_in_executor(self.executor, contextvars.copy_context().run, fn)

    @mapped_errors
    async def SendBindingOtp(  # noqa: N802 - name fixed by the proto
        self, request: pb.SendBindingOtpRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendBindingOtpResponse:
        partner = partner_id(context)
        result = await self._run(
            lambda: self.service.send_binding_otp(partner, request.individual_id, list(request.otp_channels))
        )
        otps_sent(request.otp_channels)  # observability: OTPs sent by channel
        return converters.send_otp_to_proto(result)

    @mapped_errors
    async def DoKeyBinding(  # noqa: N802
        self, request: pb.DoKeyBindingRequest, context: grpc.aio.ServicerContext
    ) -> pb.DoKeyBindingResponse:
        partner = partner_id(context)
        challenges = converters.challenges_from_proto(request.challenges)
        result = await self._run(
            lambda: self.service.do_key_binding(
                partner,
                request.individual_id,
                challenges,
                request.public_key_jwk,
                request.bind_auth_factor_type,
                request.proof_of_possession,
            )
        )
        return converters.key_binding_to_proto(result)

    @mapped_errors
    async def GetSupportedChallengeFormats(  # noqa: N802
        self, request: pb.GetSupportedChallengeFormatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSupportedChallengeFormatsResponse:
        self.service.check_partner(partner_id(context))
        formats = self.service.get_supported_challenge_formats(request.auth_factor_type)
        return pb.GetSupportedChallengeFormatsResponse(formats=formats)

    @mapped_errors
    async def VerifyWalletToken(  # noqa: N802
        self, request: pb.VerifyWalletTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyWalletTokenResponse:
        partner = partner_id(context)
        result = await self._run(
            lambda: self.service.verify_wallet_token(
                partner, request.token, request.individual_id, request.expected_audience, request.bind_auth_factor_type
            )
        )
        return converters.wallet_token_to_proto(result)

    @mapped_errors
    async def GetIssuerCertificates(  # noqa: N802
        self, request: pb.GetIssuerCertificatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIssuerCertificatesResponse:
        self.service.check_partner(partner_id(context))
        certificates = await self._run(self.service.issuer_certificates)
        return converters.issuers_to_proto(certificates)

    @mapped_errors
    async def RevokeBinding(  # noqa: N802
        self, request: pb.RevokeBindingRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeBindingResponse:
        partner = partner_id(context)
        challenges = converters.challenges_from_proto(request.challenges)
        revoked = await self._run(
            lambda: self.service.revoke_binding(
                partner, request.individual_id, challenges, request.reason, request.bind_auth_factor_type
            )
        )
        assert revoked.revoked_at is not None
        return pb.RevokeBindingResponse(
            thumbprint=revoked.cert_thumbprint, revoked_at=converters.timestamp(revoked.revoked_at)
        )

    @mapped_errors
    async def GetBinding(  # noqa: N802
        self, request: pb.GetBindingRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBindingResponse:
        partner = partner_id(context)
        binding, status = await self._run(
            lambda: self.service.get_binding(
                partner,
                psut=request.partner_specific_user_token,
                thumbprint=request.thumbprint,
                factor=request.bind_auth_factor_type,
            )
        )
        return converters.binding_to_proto(binding, status)

    @mapped_errors
    async def GetBindingNonce(  # noqa: N802
        self, request: pb.GetBindingNonceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBindingNonceResponse:
        partner = partner_id(context)
        nonce, expires = await self._run(lambda: self.service.get_binding_nonce(partner, request.individual_id))
        return pb.GetBindingNonceResponse(nonce=nonce, expires_at=converters.timestamp(expires))
