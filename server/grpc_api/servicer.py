"""The KeyBinderService servicer: a thin async adapter over the synchronous service layer."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from server import deadline
from server.domain import Partner
from server.errors import InvalidPartnerError, KeyBinderError
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api import converters
from server.grpc_api.observability import Rpc, otps_sent
from server.grpc_api.status import internal_status, to_status
from server.partners import PartnerAuthenticator, certificate_fingerprint
from server.service import KeyBinderService

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
#: What an RPC method implements: the request and the authenticated partner id.
Method = Callable[[Any, Req, str], Awaitable[Resp]]
#: What gRPC calls.
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

PARTNER_ID_HEADER = "partner-id"
API_KEY_HEADER = "partner-api-key"


def partner_headers(context: grpc.aio.ServicerContext) -> tuple[str | None, str | None]:
    """The partner-id and partner-api-key values; two different values of one header are refused."""
    partner: str | None = None
    key: str | None = None
    for name, value in context.invocation_metadata() or ():
        if name == PARTNER_ID_HEADER and isinstance(value, str):
            if partner is not None and value != partner:
                raise InvalidPartnerError("the partner-id header is repeated with different values")
            partner = value
        elif name == API_KEY_HEADER and isinstance(value, str):
            if key is not None and value != key:
                raise InvalidPartnerError("the partner-api-key header is repeated with different values")
            key = value
    return partner, key


class InFlight:
    """Calls of the service running now, and when the last one started: what a drain waits on."""

    def __init__(self) -> None:
        self.running = 0
        self.last_started = 0.0

    def quiet_for(self) -> float:
        """Seconds since the last call started, 0 while one runs."""
        return 0.0 if self.running else time.monotonic() - self.last_started


def authenticated(method: Method[Req, Resp]) -> Handler[Req, Resp]:
    """Authenticate the partner, then run the method; domain errors become their status, anything
    unforeseen a generic INTERNAL. Every KeyBinderService RPC goes through here; health and reflection
    are other services and stay open."""

    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: KeyBinderServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        # Observability: request context for logs, the access-log line (with a refusal's reason and
        # cause) and metrics at the end, x-request-id in the trailing metadata (see server.grpc_api.observability).
        self.in_flight.running += 1
        self.in_flight.last_started = time.monotonic()
        with Rpc(name, context) as rpc:
            # The caller's deadline reaches the service layer as a plain context variable (server.deadline).
            token = deadline.start(context.time_remaining())
            try:
                partner = await self.authenticate(context)
                return await method(self, request, partner)
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
            finally:
                self.in_flight.running -= 1
                deadline.reset(token)
        raise AssertionError("unreachable")  # abort_with_status always raises

    return wrapper


class KeyBinderServicer(pb_grpc.KeyBinderServiceServicer):
    def __init__(
        self,
        service: KeyBinderService,
        executor: Executor | None,
        partners: PartnerAuthenticator,
        *,
        outbound: Executor | None = None,
        client_certificates: bool = False,
    ) -> None:
        self.service = service
        self.in_flight = InFlight()
        self.executor = executor
        #: Where calls that wait on a peer outside (the OTP notifier) run: never on the event loop, even when
        #: every other call does (executor None), or one hung SMS gateway would stop health and every RPC.
        self.outbound = outbound or executor
        self.partners = partners
        #: mTLS is on: a client certificate registered to a partner authenticates it.
        self.client_certificates = client_certificates

    async def _run(self, fn: Callable[[], Resp], executor: Executor | None = None) -> Resp:
        # Service calls block on the HSM and the database: on a thread pool they overlap those waits;
        # without one (executor None) they run right here, which costs the least CPU when every wait
        # is short (SQLite, an in-process HSM).
        # While the database is known down, answer at once, here on the loop: no queueing behind RPC threads
        # that are waiting for it.
        self.service.check_available(trial=False)
        executor = executor or self.executor
        if executor is None:
            return fn()
        # The request context (server.logs) follows the call: run_in_executor does not copy it.
        return await asyncio.get_running_loop().run_in_executor(executor, contextvars.copy_context().run, fn)

    async def _partner(self, cache_key: str) -> Partner | None:
        # From the cache on the event loop; only a miss (a database read) goes to a thread.
        hit, partner = self.partners.cached(cache_key)
        if hit:
            return partner
        return await self._run(lambda: self.partners.fetch(cache_key))

    async def authenticate(self, context: grpc.aio.ServicerContext) -> str:
        """The partner this request comes from: a registered client certificate, else partner-id + API key."""
        partner_id, api_key = partner_headers(context)
        if self.client_certificates:
            certs = context.auth_context().get("x509_pem_cert")
            if certs:
                by_cert = await self._partner("cert:" + certificate_fingerprint(certs[0]))
                if by_cert is not None:
                    return self.partners.verify_certificate(partner_id, api_key, by_cert)
        pid, key = self.partners.check_headers(partner_id, api_key)
        cache_key = "id:" + pid
        try:
            return self.partners.verify_key(pid, key, await self._partner(cache_key))
        except InvalidPartnerError:
            if not self.partners.worth_refreshing(cache_key):
                raise
        # Refused by a cached record: the key may have just been rotated. Read the partner again (at most
        # once a second per partner, whatever a caller with a wrong key does).
        return self.partners.verify_key(pid, key, await self._run(lambda: self.partners.fetch(cache_key)))

    @authenticated
    async def SendBindingOtp(  # noqa: N802 - name fixed by the proto
        self, request: pb.SendBindingOtpRequest, partner: str
    ) -> pb.SendBindingOtpResponse:
        result = await self._run(
            lambda: self.service.send_binding_otp(partner, request.individual_id, list(request.otp_channels)),
            self.outbound,
        )
        otps_sent(request.otp_channels)  # observability: OTPs sent by channel
        return converters.send_otp_to_proto(result)

    @authenticated
    async def DoKeyBinding(  # noqa: N802
        self, request: pb.DoKeyBindingRequest, partner: str
    ) -> pb.DoKeyBindingResponse:
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

    @authenticated
    async def GetSupportedChallengeFormats(  # noqa: N802
        self, request: pb.GetSupportedChallengeFormatsRequest, partner: str
    ) -> pb.GetSupportedChallengeFormatsResponse:
        formats = self.service.get_supported_challenge_formats(request.auth_factor_type)
        return pb.GetSupportedChallengeFormatsResponse(formats=formats)

    @authenticated
    async def VerifyWalletToken(  # noqa: N802
        self, request: pb.VerifyWalletTokenRequest, partner: str
    ) -> pb.VerifyWalletTokenResponse:
        result = await self._run(
            lambda: self.service.verify_wallet_token(
                partner, request.token, request.individual_id, request.expected_audience, request.bind_auth_factor_type
            )
        )
        return converters.wallet_token_to_proto(result)

    @authenticated
    async def GetIssuerCertificates(  # noqa: N802
        self, request: pb.GetIssuerCertificatesRequest, partner: str
    ) -> pb.GetIssuerCertificatesResponse:
        chains = await self._run(self.service.issuer_chains)
        return converters.issuers_to_proto(chains)

    @authenticated
    async def RevokeBinding(  # noqa: N802
        self, request: pb.RevokeBindingRequest, partner: str
    ) -> pb.RevokeBindingResponse:
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

    @authenticated
    async def GetBinding(  # noqa: N802
        self, request: pb.GetBindingRequest, partner: str
    ) -> pb.GetBindingResponse:
        binding, status = await self._run(
            lambda: self.service.get_binding(
                partner,
                psut=request.partner_specific_user_token,
                thumbprint=request.thumbprint,
                factor=request.bind_auth_factor_type,
            )
        )
        return converters.binding_to_proto(binding, status)

    @authenticated
    async def GetBindingNonce(  # noqa: N802
        self, request: pb.GetBindingNonceRequest, partner: str
    ) -> pb.GetBindingNonceResponse:
        nonce, expires = await self._run(lambda: self.service.get_binding_nonce(partner, request.individual_id))
        return pb.GetBindingNonceResponse(nonce=nonce, expires_at=converters.timestamp(expires))
