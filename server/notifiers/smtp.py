"""E-mail OTP delivery through an SMTP submission server (stdlib smtplib, STARTTLS, AUTH)."""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path

from server.domain import OtpChannel, OtpMessage
from server.notifiers import otp_text
from server.ports import DeliveryFailed

log = logging.getLogger(__name__)

SMTP_SUBJECT = "Your wallet binding code"


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    from_address: str
    starttls: bool = True
    username: str = ""
    password: str = field(default="", repr=False)
    timeout_seconds: float = 10.0
    ca_file: Path | None = None
    otp_ttl_seconds: int = 180

    def __post_init__(self) -> None:
        if not self.host or not self.from_address:
            raise ValueError("SMTP needs a host and a from address")
        if self.username and not self.password:
            raise ValueError("an SMTP username needs a password")
        if self.username and not self.starttls:
            # AUTH PLAIN/LOGIN over a clear connection hands the password to anyone on the path.
            raise ValueError("SMTP authentication requires STARTTLS")


class SmtpNotifier:
    """`Notifier` for the e-mail channel: one SMTP session per message.

    A session per message keeps the notifier thread-safe (the service sends from a thread pool)
    and never leaves a half-dead connection behind; OTP mail is rare enough for that to be cheap.
    With STARTTLS the server's certificate and host name are verified (system trust store or
    ``ca_file``), and a server that does not offer STARTTLS is a delivery failure, never a
    fall-back to clear text.
    """

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._tls = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)

    def build(self, message: OtpMessage) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.config.from_address
        mail["To"] = message.to
        mail["Subject"] = SMTP_SUBJECT
        mail["Date"] = formatdate(message.sent_at.timestamp(), usegmt=True)
        mail["Message-ID"] = make_msgid(domain=parseaddr(self.config.from_address)[1].rpartition("@")[2] or None)
        mail["Auto-Submitted"] = "auto-generated"
        mail.set_content(otp_text(message, self.config.otp_ttl_seconds) + "\n")
        return mail

    def send(self, message: OtpMessage) -> None:
        if message.channel is not OtpChannel.EMAIL:
            raise DeliveryFailed(f"the SMTP notifier cannot deliver on the {message.channel.value} channel")
        try:
            mail = self.build(message)
        except ValueError as err:  # e.g. a line break in the address: header injection, refused
            raise DeliveryFailed("the e-mail address cannot be used in a message header") from err
        cfg = self.config
        try:
            with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_seconds) as smtp:
                smtp.ehlo()
                if cfg.starttls:
                    smtp.starttls(context=self._tls)
                    smtp.ehlo()
                if cfg.username:
                    smtp.login(cfg.username, cfg.password)
                smtp.send_message(mail)
        except smtplib.SMTPResponseException as err:
            # The reply text may quote the recipient or our credentials' user name: code only.
            raise DeliveryFailed(f"SMTP server refused the message: {type(err).__name__} {err.smtp_code}") from err
        except smtplib.SMTPRecipientsRefused as err:
            raise DeliveryFailed("SMTP server refused the recipient") from err
        except (smtplib.SMTPException, OSError, UnicodeError) as err:  # OSError: TLS, timeouts, refused connections
            raise DeliveryFailed(f"SMTP delivery to {cfg.host}:{cfg.port} failed: {type(err).__name__}") from err
        log.info("OTP for transaction %s sent by e-mail through %s", message.transaction_id, cfg.host)
