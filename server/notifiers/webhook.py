"""OTP delivery through an HTTP webhook (an SMS gateway): signed JSON POST with timeout and retries."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from server.domain import OtpMessage
from server.notifiers import otp_text
from server.ports import DeliveryFailed

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-KeyBinder-Signature"
TIMESTAMP_HEADER = "X-KeyBinder-Timestamp"
#: Same value on every retry of one message, so a gateway can drop a duplicate after a lost reply.
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_BACKOFF_SECONDS = 5.0
#: Worth another try: the gateway is overloaded or broken right now. Any other 4xx will not change.
RETRYABLE_STATUS = frozenset({408, 429})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA-256 over ``<timestamp>.<body>``.

    The timestamp is signed with the body so a captured request cannot be replayed later with a
    fresh timestamp header; receivers should also refuse timestamps far from their clock.
    """
    return "sha256=" + hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(url: str) -> str:
    """An https URL, or http to this machine only: the body carries a live OTP."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("the webhook URL must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("the webhook URL must not carry credentials (the HMAC secret authenticates us)")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("a webhook URL off this machine must be https (the body carries the OTP)")
    return url


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: bytes = field(repr=False)
    timeout_seconds: float = 5.0
    retries: int = 2
    backoff_seconds: float = 0.25
    #: Total time of one delivery, retries and backoff included: no attempt starts or waits past it.
    deadline_seconds: float = 15.0
    ca_file: Path | None = None
    otp_ttl_seconds: int = 180

    def __post_init__(self) -> None:
        check_webhook_url(self.url)
        if len(self.secret) < 16:
            raise ValueError("the webhook HMAC secret must be at least 16 bytes")
        if self.timeout_seconds <= 0 or self.deadline_seconds <= 0 or self.retries < 0 or self.backoff_seconds < 0:
            raise ValueError("webhook timeout and deadline must be positive, retries and backoff not negative")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would resend the OTP somewhere not configured: treat it as a failed delivery."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class WebhookNotifier:
    """`Notifier` POSTing ``{channel, to, transaction_id, otp, message, sent_at}`` as JSON.

    Headers: ``X-KeyBinder-Timestamp`` (Unix seconds) and ``X-KeyBinder-Signature:
    sha256=<hex HMAC-SHA-256 of "<timestamp>.<body>">`` under the shared secret, and
    ``Idempotency-Key`` (stable across retries). Any 2xx is delivered. Connection errors,
    timeouts, 5xx, 408 and 429 are retried ``retries`` times with doubling backoff; any other
    answer fails at once. ``timeout_seconds`` bounds each connect and each read, ``deadline_seconds`` the
    whole delivery: no retry starts, and no wait lasts, past it.
    """

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        tls = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls), _RefuseRedirects())

    def body(self, message: OtpMessage) -> bytes:
        return json.dumps(
            {
                "channel": message.channel.value,
                "to": message.to,
                "transaction_id": message.transaction_id,
                "otp": message.otp,
                "message": otp_text(message, self.config.otp_ttl_seconds),
                "sent_at": message.sent_at.isoformat(),
            },
            separators=(",", ":"),
        ).encode()

    def send(self, message: OtpMessage) -> None:
        cfg = self.config
        body = self.body(message)
        attempts = cfg.retries + 1
        last = ""
        deadline = time.monotonic() + cfg.deadline_seconds
        for attempt in range(attempts):
            if attempt:
                backoff = min(cfg.backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                if time.monotonic() + backoff >= deadline:
                    attempts = attempt
                    break
                time.sleep(backoff)
            remaining = deadline - time.monotonic()
            timestamp = str(int(time.time()))
            request = urllib.request.Request(  # noqa: S310 - the scheme is checked in WebhookConfig
                cfg.url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "keybinder-notifier",
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: signature(cfg.secret, timestamp, body),
                    IDEMPOTENCY_HEADER: f"{message.transaction_id}:{message.channel.value}",
                },
            )
            try:
                with self._opener.open(request, timeout=min(cfg.timeout_seconds, remaining)) as response:
                    response.read(65536)
                log.info(
                    "OTP for transaction %s sent by %s webhook (attempt %d)",
                    message.transaction_id,
                    message.channel.value,
                    attempt + 1,
                )
                return
            except urllib.error.HTTPError as err:
                status = err.code
                err.close()
                # Never the response body: a gateway may echo the request, OTP included.
                if status < 500 and status not in RETRYABLE_STATUS:
                    raise DeliveryFailed(f"the webhook refused the message: HTTP {status}") from err
                last = f"HTTP {status}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                last = type(reason).__name__ if isinstance(reason, BaseException) else "connection error"
            log.warning(
                "webhook delivery for transaction %s failed (attempt %d of %d): %s",
                message.transaction_id,
                attempt + 1,
                attempts,
                last,
            )
        raise DeliveryFailed(f"the webhook failed {attempts} time(s), last: {last}")
