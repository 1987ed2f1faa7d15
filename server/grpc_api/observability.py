"""Per-RPC observability: request context for the logs, one access-log line, metrics, x-request-id back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextvars import Token
from types import TracebackType
from typing import Any, NamedTuple

import grpc

from server import metrics
from server.errors import KeyBinderError
from server.logs import (
    INVALID_PARTNER,
    PARTNER_HEADER,
    REQUEST_ID_HEADER,
    RequestContext,
    clean_header,
    current_request,
    new_request_id,
)

access_log = logging.getLogger("keybinder.access")

INTERNAL_REASON = "key_binding_failed"


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: Sequence[tuple[str, str | bytes]]


class StatusWithRequestId(_Status, grpc.Status):  # type: ignore[misc]
    """A grpc.Status (what abort_with_status takes); its trailing metadata replaces any set before."""


class Rpc:
    """One RPC being served: enter at the start, ``refused``/``failed`` on an error, exit at the end."""

    __slots__ = (
        "_context",
        "_done",
        "_token",
        "cause",
        "code",
        "limit",
        "method",
        "partner",
        "reason",
        "request_id",
        "started",
    )

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self._context = context
        self.started = time.perf_counter()
        request_id = partner = None
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_HEADER:
                request_id = clean_header(value)
            elif key == PARTNER_HEADER:
                partner = clean_header(value) or INVALID_PARTNER
        self.request_id = request_id or new_request_id()
        self.partner = partner
        self.code: str | None = None
        self.reason: str | None = None
        self.cause: str | None = None
        #: The limit that refused (too_many_attempts), for the refusals metric.
        self.limit: str | None = None
        self._token: Token[RequestContext | None] | None = None
        self._done = False

    def __enter__(self) -> Rpc:
        self._token = current_request.set(RequestContext(self.request_id, self.method, self.partner))
        self._context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),))
        return self

    def refused(self, err: KeyBinderError) -> None:
        """A domain error: the caller gets its status and reason."""
        self.code = err.status.value
        self.reason = err.reason
        self.limit = err.metadata.get("limit")
        cause = err.__cause__
        if cause is not None:
            self.cause = f"{type(cause).__name__}: {cause}"

    def failed(self) -> None:
        """An error nobody foresaw: the caller gets a generic INTERNAL."""
        self.code = "INTERNAL"
        self.reason = INTERNAL_REASON

    def status(self, status: grpc.Status) -> grpc.Status:
        """The status to abort with: ``status`` plus the request id (an abort replaces the trailing metadata
        set before). Completes the observation now: grpc.aio sends an abort's status before raising, and
        whoever sees the answer must find it already counted and logged."""
        self._complete(None)
        trailing = (*(status.trailing_metadata or ()), (REQUEST_ID_HEADER, self.request_id))
        return StatusWithRequestId(status.code, status.details, trailing)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._complete(exc)
        finally:
            if self._token is not None:
                current_request.reset(self._token)

    def _complete(self, exc: BaseException | None) -> None:
        """Record the metrics and write the access-log line, once."""
        if self._done:
            return
        self._done = True
        seconds = time.perf_counter() - self.started
        if self.code is not None:
            code, outcome = self.code, "refused" if self.reason != INTERNAL_REASON else "error"
            label = self.reason or "error"
        elif exc is None:
            code, outcome, label = "OK", "ok", "ok"
        elif isinstance(exc, asyncio.CancelledError):
            code, outcome, label = "CANCELLED", "cancelled", "cancelled"
        else:  # aborted by someone else, or an error after the servicer answered
            status = self._context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
            outcome, label = "error", "error"
        recorder = metrics.recorder()
        if recorder is not None:
            recorder.rpc(self.method, code, label, seconds)
            if self.limit is not None:
                recorder.limit_refused(self.limit)
        fields: dict[str, Any] = {
            "outcome": outcome,
            "reason": self.reason,
            "code": code,
            "duration_ms": round(seconds * 1000, 3),
        }
        if self.cause is not None:
            fields["cause"] = self.cause
        access_log.info("%s %s %s %.1fms", self.method, self.reason or outcome, code, seconds * 1000, extra=fields)


def otps_sent(channels: Sequence[str]) -> None:
    """Count a successful SendBindingOtp's deliveries (its channels were validated, duplicates dropped)."""
    recorder = metrics.recorder()
    if recorder is not None:
        for channel in {c.lower() for c in channels}:
            recorder.otp_sent(channel)
