"""The composition root: builds the service and its ports (HSM, stores, notifiers) from settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from hsm import Pkcs11KeyManager
from server.config import Settings
from server.domain import OtpChannel
from server.hsm_backend import HsmHasher, HsmIssuerKeys
from server.keyprofiles import profile_of
from server.notifiers import ChannelRouter, DeadlineNotifier, read_secret
from server.notifiers.outbox import OutboxNotifier
from server.notifiers.smtp import SmtpConfig, SmtpNotifier
from server.notifiers.webhook import WebhookConfig, WebhookNotifier
from server.partners import PartnerAuthenticator
from server.ports import Notifier
from server.service import KeyBinderService
from server.stores import Store, open_store
from server.sweeper import Sweeper


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class App:
    """Everything one process owns; `close` releases it (HSM logout, DB connections)."""

    settings: Settings
    keys: Pkcs11KeyManager
    store: Store
    service: KeyBinderService
    partners: PartnerAuthenticator
    notifier: Notifier | None = None

    def probe(self) -> None:
        """A database write (rolled back) and one signature with the active issuer key in the HSM.

        The write shows what a read cannot: a database that is read-only or whose disk is full. Its outcome
        feeds the circuit breaker, so requests are refused at once while the database is known down."""
        try:
            self.store.check_writable()
        except Exception as err:
            self.service.breaker.failed(f"{type(err).__name__}: {err}")
            raise
        self.service.breaker.succeeded()
        signer = self.service.active_issuer().signer
        profile_of(signer.public_key()).sign(signer, b"keybinder health probe")

    def sweeper(self) -> Sweeper:
        """Periodic maintenance (expired rows, signed audit heads) for this process."""
        return Sweeper(self.store, self.service.hasher, self.settings.limits(), batch=self.settings.sweep_batch_rows)

    def close(self) -> None:
        if isinstance(self.notifier, DeadlineNotifier):
            self.notifier.close()
        self.store.close()
        self.keys.close()


def build_notifier(settings: Settings) -> Notifier:
    """The OTP notifier per channel; reads the SMTP password and webhook secret from their sources."""
    backends: dict[str, Notifier] = {}

    def backend(name: str) -> Notifier:
        if name in backends:
            return backends[name]
        notifier: Notifier
        if name == "smtp":
            notifier = SmtpNotifier(
                SmtpConfig(
                    host=settings.smtp_host,
                    port=settings.smtp_port,
                    from_address=settings.smtp_from,
                    starttls=settings.smtp_starttls,
                    username=settings.smtp_username,
                    password=read_secret(settings.smtp_password_source, "SMTP password")
                    if settings.smtp_username
                    else "",
                    timeout_seconds=settings.smtp_timeout_seconds,
                    ca_file=settings.smtp_ca_file,
                    otp_ttl_seconds=settings.otp_ttl_seconds,
                )
            )
        elif name == "webhook":
            notifier = WebhookNotifier(
                WebhookConfig(
                    url=settings.webhook_url,
                    secret=read_secret(settings.webhook_secret_source, "webhook HMAC secret").encode(),
                    timeout_seconds=settings.webhook_timeout_seconds,
                    retries=settings.webhook_retries,
                    deadline_seconds=settings.notifier_deadline_seconds,
                    ca_file=settings.webhook_ca_file,
                    otp_ttl_seconds=settings.otp_ttl_seconds,
                )
            )
        else:
            notifier = OutboxNotifier(settings.outbox)
        backends[name] = notifier
        return notifier

    router = ChannelRouter(
        {OtpChannel.EMAIL: backend(settings.email_notifier), OtpChannel.PHONE: backend(settings.phone_notifier)}
    )
    # Every backend may meet a slow or hostile peer: each delivery gets a total deadline and a bounded pool.
    return DeadlineNotifier(router, settings.notifier_deadline_seconds)


def build_app(settings: Settings) -> App:
    """Connect to the token (this process logs in itself) and the database."""
    notifier = build_notifier(settings)  # first: a missing secret must not leave a session open
    settings.apply_environment()
    keys = Pkcs11KeyManager(settings.pkcs11_uri)
    keys.session.open()
    store = open_store(settings.database)
    service = KeyBinderService(
        policy=settings.policy(),
        clock=SystemClock(),
        hasher=HsmHasher(keys, settings.hmac_key_label),
        issuer_keys=HsmIssuerKeys(keys),
        identities=store,
        otps=store,
        bindings=store,
        issuers=store,
        notifier=notifier,
        replay=store,
        nonces=store,
        limit_store=store,
        audit_log=store,
        kbi=store,
        aliases=store,
    )
    partners = PartnerAuthenticator(store, cache_seconds=settings.partner_cache_seconds)
    return App(settings, keys, store, service, partners, notifier)
