"""Configuration: defaults < TOML file < KEYBINDER_* environment < command-line flags."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hsm import KeyKind, Pkcs11Uri
from server.auth import DEFAULT_CHALLENGE_FACTORS, DEFAULT_CHALLENGE_RULES, REGISTRY, check_factor_settings
from server.limits import Limits, RateRule
from server.notifiers import read_secret
from server.notifiers.webhook import check_webhook_url
from server.otp import DEFAULT_OTP_LENGTH, MAX_OTP_LENGTH, MIN_OTP_LENGTH
from server.policy import DEFAULT_INDIVIDUAL_ID_FIELD, DEFAULT_INDIVIDUAL_ID_PATTERN, KbiField, Policy
from server.stores import check_url, is_postgres, sqlite_path

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN = "keybinder"  # noqa: S105 - a token label, not a secret
DEFAULT_ISSUER_LABEL = "keybinder-issuer"
KeyType = Literal["EC-P256", "EC-P384", "RSA", "Ed25519"]
WlaProfile = Literal["strict", "esignet"]


class KbiFieldSetting(BaseModel):
    """One KBI question, as an entry of eSignet's ``kbi.field-details``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    type: Literal["text", "date"] = "text"
    format: str = ""

    @model_validator(mode="after")
    def _valid(self) -> KbiFieldSetting:
        KbiField(self.id, self.type, self.format)  # ValueError naming the field
        return self


class Settings(BaseSettings):
    """Every setting, with its default. Environment variables are KEYBINDER_<NAME>."""

    # hide_input_in_errors: a misplaced secret (or a database URL with a password) must not be echoed.
    model_config = SettingsConfigDict(env_prefix="KEYBINDER_", extra="forbid", frozen=True, hide_input_in_errors=True)

    data_dir: Path = Field(Path(".keybinder"), description="State directory (token, database, outbox).")
    listen: str = Field("127.0.0.1:50051", description="host:port the gRPC server binds.")
    database_url: str = Field(
        "", description="sqlite:///path or postgresql://user@host:port/db; default sqlite <data_dir>/keybinder.db."
    )
    hsm_uri: str = Field(
        "",
        description="RFC 7512 URI of the token and issuer key; default a SoftHSM token in <data_dir>.",
    )
    hmac_key_label: str = Field("keybinder-hmac", description="Label of the HMAC secret key on the token.")
    issuer_key_type: KeyKind = Field(KeyKind.EC_P256, description="ec-p256, ec-p384, rsa-3072 or ed25519.")
    cert_validity_days: int = Field(365, ge=1, le=3650, description="Validity of wallet certificates.")
    otp_ttl_seconds: int = Field(180, ge=10, le=3600, description="How long an OTP stays usable.")
    otp_max_attempts: int = Field(3, ge=1, le=10, description="Verification attempts per OTP.")
    otp_alphabet: Literal["digits", "alphanumeric"] = Field(
        "digits", description="OTP characters: digits (what Inji accepts) or alphanumeric (A-Z0-9)."
    )
    otp_length: int = Field(
        DEFAULT_OTP_LENGTH, ge=MIN_OTP_LENGTH, le=MAX_OTP_LENGTH, description="Characters in an OTP."
    )
    bind_auth_factor_types: list[str] = Field(["WLA"], description="Factors a wallet key may be bound for.")
    challenge_factors: list[str] = Field(
        list(DEFAULT_CHALLENGE_FACTORS),
        description="Auth factors whose challenges are accepted (docs/auth-factors.md).",
    )
    challenge_rules: list[list[str]] | None = Field(
        None,
        description="Factor combinations that bind: a request must include every factor of one of them."
        " Unset: OTP, PIN or WLA, each alone (KBI only with one of them).",
    )
    kbi_fields: list[KbiFieldSetting] = Field(
        [], description="KBI questions as eSignet's kbi.field-details: [{id, type = text|date, format}]."
    )
    kbi_individual_id_field: str = Field(
        DEFAULT_INDIVIDUAL_ID_FIELD,
        min_length=1,
        description="The KBI field that carries the individual ID (eSignet's kbi.individual-id-field), not an answer.",
    )
    individual_id_pattern: str = Field(DEFAULT_INDIVIDUAL_ID_PATTERN, description="Regex an individual ID must match.")
    outbox_path: Path | None = Field(None, description="Where the outbox notifier appends OTP messages.")
    wla_audience: str = Field("keybinder", min_length=1, description="aud a WLA token must carry by default.")
    wla_skew_seconds: int = Field(30, ge=0, le=600, description="Clock skew allowed on WLA iat/exp.")
    wla_max_lifetime_seconds: int = Field(300, ge=10, le=86400, description="Largest exp - iat of a WLA token.")
    wla_profile: WlaProfile = Field("strict", description="WLA token profile for partners not listed below.")
    wla_profile_by_partner: dict[str, WlaProfile] = Field(
        {}, description="Per-partner WLA token profile, e.g. {esignet = 'esignet'}."
    )
    wla_esignet_audience: str = Field(
        "esignet-binding", min_length=1, description="Default aud under the esignet profile (eSignet's audience-id)."
    )
    wla_esignet_skew_seconds: int = Field(60, ge=0, le=600, description="Clock skew under the esignet profile.")
    wla_esignet_max_lifetime_seconds: int = Field(
        18000, ge=10, le=86400, description="Largest exp - iat under the esignet profile (Inji: 18000)."
    )
    allowed_key_types: list[KeyType] = Field(
        ["EC-P256", "EC-P384", "RSA", "Ed25519"],
        min_length=1,
        description="Wallet key types partners not listed below may bind.",
    )
    allowed_key_types_by_partner: dict[str, list[KeyType]] = Field(
        {}, description="Per-partner wallet key types, e.g. {esignet = ['RSA']}."
    )
    proof_of_possession: Literal["off", "optional", "required"] = Field(
        "optional", description="Proof-of-possession policy for partners not listed below."
    )
    proof_of_possession_by_partner: dict[str, Literal["off", "optional", "required"]] = Field(
        {}, description="Per-partner proof-of-possession policy, e.g. {wallet-a = 'required'}."
    )
    softhsm2_conf: Path | None = Field(
        None, description="SOFTHSM2_CONF to use when unset; default <data_dir>/softhsm2.conf if it exists."
    )
    rpc_threads: int | None = Field(
        None,
        ge=0,
        le=256,
        description="Threads running blocking service calls per process; 0 runs them on the event loop."
        " Unset: 0 with SQLite, 8 with PostgreSQL (see BENCHMARKS.md).",
    )
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="Time in-flight RPCs get on SIGTERM.")
    workers: int = Field(0, ge=0, le=256, description="Serving processes on one port; 0 means one per CPU.")
    health_probe_seconds: float = Field(5.0, gt=0, le=300, description="Interval of the HSM + database probe.")
    # -- observability (docs/observability.md) -------------------------------------------
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON or text; auto: JSON unless stderr is a terminal."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; unset: no metrics."
    )
    metrics_host: str = Field("127.0.0.1", min_length=1, description="Address the /metrics endpoint binds.")

    # -- OTP delivery: the backend per channel and their settings. Secrets come from a source
    # (file:/path or env:NAME), read when the server starts, never from inline config or argv.
    email_notifier: Literal["outbox", "smtp", "webhook"] = Field("outbox", description="Backend for email OTPs.")
    phone_notifier: Literal["outbox", "webhook"] = Field("outbox", description="Backend for phone (SMS) OTPs.")
    smtp_host: str = Field("", description="SMTP submission server host.")
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP port (587: submission with STARTTLS).")
    smtp_starttls: bool = Field(True, description="Require STARTTLS (certificate and host name verified).")
    smtp_username: str = Field("", description="SMTP AUTH user; empty for no AUTH.")
    smtp_password_source: str = Field("", description="file:/path or env:NAME holding the SMTP password.")
    smtp_from: str = Field("", description="From address of OTP e-mails.")
    smtp_timeout_seconds: float = Field(10.0, gt=0, le=120, description="SMTP connect and reply timeout.")
    smtp_ca_file: Path | None = Field(None, description="CA bundle for the SMTP server; default the system's.")
    webhook_url: str = Field("", description="https URL the OTP webhook POSTs to (http only to loopback).")
    webhook_secret_source: str = Field("", description="file:/path or env:NAME holding the HMAC secret.")
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60, description="Timeout of each connect and read.")
    webhook_retries: int = Field(2, ge=0, le=10, description="Retries after a 5xx, 408, 429 or connection error.")
    webhook_ca_file: Path | None = Field(None, description="CA bundle for the webhook; default the system's.")
    notifier_deadline_seconds: float = Field(
        8.0, gt=0, le=120, description="Total time one OTP delivery may take, retries included; then send_otp_failed."
    )

    @field_validator("smtp_password_source", "webhook_secret_source")
    @classmethod
    def _secret_source(cls, value: str) -> str:
        # Not echoed: a value without the prefix may be the secret itself, pasted by mistake.
        if value and not value.startswith(("file:", "env:")):
            raise ValueError("a secret source is file:/path or env:NAME, never the secret itself")
        return value

    @model_validator(mode="after")
    def _notifiers_complete(self) -> Settings:
        if self.email_notifier == "smtp":
            if not self.smtp_host or not self.smtp_from:
                raise ValueError("email_notifier = smtp needs smtp_host and smtp_from")
            if self.smtp_username and not self.smtp_password_source:
                raise ValueError("smtp_username needs smtp_password_source")
            if self.smtp_username and not self.smtp_starttls:
                raise ValueError("SMTP authentication needs smtp_starttls (no password in clear text)")
        if "webhook" in (self.email_notifier, self.phone_notifier):
            if not self.webhook_url or not self.webhook_secret_source:
                raise ValueError("the webhook notifier needs webhook_url and webhook_secret_source")
            check_webhook_url(self.webhook_url)
        # Fail at load, in the parent process, rather than in every spawned worker (which would
        # die and be restarted forever); the values are read again, and kept, by the wiring.
        if self.email_notifier == "smtp" and self.smtp_username:
            read_secret(self.smtp_password_source, "SMTP password")
        if "webhook" in (self.email_notifier, self.phone_notifier):
            read_secret(self.webhook_secret_source, "webhook HMAC secret")
        return self

    # -- abuse limits (shared by every process through the database) ----------------------
    otp_sends_per_individual: int = Field(3, ge=1, le=1_000_000, description="OTPs one individual may be sent ...")
    otp_send_window_seconds: int = Field(600, ge=1, le=86400, description="... per this many seconds.")
    otp_sends_per_partner_per_minute: int = Field(
        600, ge=1, le=10_000_000, description="SendBindingOtp calls one partner may make per minute."
    )
    auth_failures_before_lockout: int = Field(
        5, ge=1, le=1_000_000, description="Failed challenges of one individual that start a lockout ..."
    )
    auth_failure_window_seconds: int = Field(900, ge=1, le=86400, description="... within this many seconds.")
    lockout_seconds: int = Field(900, ge=1, le=86400 * 7, description="How long a lockout lasts.")
    auth_failures_per_partner_per_minute: int = Field(
        120, ge=1, le=10_000_000, description="Failed challenges one partner may cause per minute (all IDs)."
    )
    auth_failures_per_minute: int = Field(
        1_000, ge=1, le=100_000_000, description="Failed challenges all partners together may cause per minute."
    )
    nonces_per_partner_per_minute: int = Field(
        600, ge=1, le=10_000_000, description="GetBindingNonce calls one partner may make per minute."
    )
    nonces_per_individual: int = Field(10, ge=1, le=1_000_000, description="Nonces one individual may get ...")
    nonce_window_seconds: int = Field(600, ge=1, le=86400, description="... per this many seconds.")
    sweep_interval_seconds: float = Field(
        60.0, gt=0, le=86400, description="Interval of the sweep of expired rows and of audit head signing."
    )
    sweep_batch_rows: int = Field(1000, ge=1, le=1_000_000, description="Rows per table one sweep run may delete.")

    # -- transport security and partner authentication -------------------------------------
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain for the gRPC port (with tls_key); reloaded when the file changes."
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (unencrypted; keep it mode 0600).")
    client_ca: Path | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."
    )
    allow_plaintext: bool = Field(
        False, description="Serve without TLS on a non-loopback address (behind a TLS-terminating proxy only)."
    )
    max_connections: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Client connections one process holds at once; 0: its open-file limit less a reserve for the"
        " HSM and the database.",
    )
    handshake_timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="A connection that has not finished its TLS/HTTP/2 handshake by then is closed."
    )
    connection_idle_seconds: float = Field(
        300.0, gt=0, le=86400, description="A connection without calls for this long is closed (GOAWAY)."
    )
    keepalive_seconds: float = Field(
        60.0, gt=0, le=7200, description="Ping an idle connection this often; no answer within 20 s closes it."
    )
    partner_cache_seconds: float = Field(
        5.0, ge=0, le=300, description="How long a server trusts its cached partner record; 0 reads it every time."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mTLS) needs tls_cert and tls_key")
        return self

    def __repr_args__(self) -> Any:
        # A database URL may carry a password: settings print (and log) with it masked.
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "database_url" and isinstance(value, str) else value)

    # -- issuer key lifecycle (docs/rotation.md) --
    issuer_validity_days: int = Field(1095, ge=1, le=36500, description="Validity of a new issuer certificate.")
    issuer_rotation_window_days: int = Field(
        60, ge=0, le=3650, description="Before its notAfter, the active issuer key hands signing to a newer key."
    )
    issuer_cache_seconds: float = Field(
        30.0, ge=0, le=3600, description="How long a server reuses the issuer list; a rotation reaches it within this."
    )

    @model_validator(mode="after")
    def _factors_usable(self) -> Settings:
        check_factor_settings(
            self.challenge_factors,
            self.factor_rules,
            kbi_fields=self.kbi_field_list,
            kbi_individual_id_field=self.kbi_individual_id_field,
        )
        return self

    @property
    def factor_rules(self) -> tuple[frozenset[str], ...]:
        """``challenge_rules``, or the default rules of the factors this build has."""
        if self.challenge_rules is not None:
            return tuple(frozenset(rule) for rule in self.challenge_rules)
        return tuple(rule for rule in DEFAULT_CHALLENGE_RULES if rule <= REGISTRY.keys())

    @property
    def kbi_field_list(self) -> tuple[KbiField, ...]:
        return tuple(KbiField(f.id, f.type, f.format) for f in self.kbi_fields)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _, colon, port = value.rpartition(":")
        if not colon or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:50051 (port 0 picks a free one)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return check_url(value) if value else value

    @field_validator("allowed_key_types_by_partner")
    @classmethod
    def _some_key_type(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = sorted(partner for partner, types in value.items() if not types)
        if empty:
            raise ValueError(f"allowed_key_types_by_partner names no key type for {empty}")
        return value

    @field_validator("individual_id_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"individual_id_pattern is not a valid regular expression: {err}") from err
        return value

    @model_validator(mode="after")
    def _rotation_window_inside_validity(self) -> Settings:
        # A window as long as the validity would put every new issuer key in it from its first day.
        if self.issuer_rotation_window_days >= self.issuer_validity_days:
            raise ValueError("issuer_rotation_window_days must be shorter than issuer_validity_days")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # -- derived values -------------------------------------------------------------------

    @property
    def database(self) -> str:
        """The database URL, checked: sqlite:///path or postgresql://..."""
        return check_url(self.database_url or f"sqlite:///{self.data_dir / 'keybinder.db'}")

    @property
    def service_threads(self) -> int:
        """``rpc_threads``, or the measured best for the database: on SQLite and an in-process HSM every
        blocking step is short and a thread hand-off costs more CPU than it saves (~0.9 ms of ~2.9 ms
        per binding); PostgreSQL waits on round trips that other requests should overlap."""
        if self.rpc_threads is not None:
            return self.rpc_threads
        return 8 if is_postgres(self.database) else 0

    @property
    def database_path(self) -> Path:
        """The SQLite file (an error for another backend)."""
        path = sqlite_path(self.database)
        if path is None:
            raise ValueError("the database is not SQLite")
        return path

    @property
    def pin_file(self) -> Path:
        return self.data_dir / "hsm-pin"

    @property
    def so_pin_file(self) -> Path:
        return self.data_dir / "hsm-so-pin"

    @property
    def pkcs11_uri(self) -> Pkcs11Uri:
        if self.hsm_uri:
            uri = Pkcs11Uri.parse(self.hsm_uri)
            return uri if uri.object else uri.with_object(DEFAULT_ISSUER_LABEL)
        return Pkcs11Uri(
            token=DEFAULT_TOKEN,
            module_path=DEFAULT_MODULE,
            object=DEFAULT_ISSUER_LABEL,
            pin_source=f"file:{self.pin_file}",
        )

    @property
    def outbox(self) -> Path:
        return self.outbox_path or self.data_dir / "outbox.jsonl"

    @property
    def softhsm_conf_path(self) -> Path:
        return self.softhsm2_conf or self.data_dir / "softhsm2.conf"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def demo_partner_key_file(self) -> Path:
        return self.data_dir / "demo-partner.key"

    def policy(self) -> Policy:
        return Policy(
            otp_ttl_seconds=self.otp_ttl_seconds,
            otp_max_attempts=self.otp_max_attempts,
            cert_validity_days=self.cert_validity_days,
            bind_auth_factor_types=frozenset(self.bind_auth_factor_types),
            challenge_factors=frozenset(self.challenge_factors),
            challenge_rules=self.factor_rules,
            kbi_fields=self.kbi_field_list,
            kbi_individual_id_field=self.kbi_individual_id_field,
            individual_id_pattern=self.individual_id_pattern,
            wla_audience=self.wla_audience,
            wla_skew_seconds=self.wla_skew_seconds,
            wla_max_lifetime_seconds=self.wla_max_lifetime_seconds,
            otp_alphabet=self.otp_alphabet,
            otp_length=self.otp_length,
            wla_profile=self.wla_profile,
            wla_profile_by_partner=tuple(sorted(self.wla_profile_by_partner.items())),
            wla_esignet_audience=self.wla_esignet_audience,
            wla_esignet_skew_seconds=self.wla_esignet_skew_seconds,
            wla_esignet_max_lifetime_seconds=self.wla_esignet_max_lifetime_seconds,
            allowed_key_types=frozenset(self.allowed_key_types),
            allowed_key_types_by_partner=tuple(
                sorted((p, frozenset(types)) for p, types in self.allowed_key_types_by_partner.items())
            ),
            proof_of_possession=self.proof_of_possession,
            proof_of_possession_by_partner=tuple(sorted(self.proof_of_possession_by_partner.items())),
            limits=self.limits(),
            issuer_rotation_window_days=self.issuer_rotation_window_days,
            issuer_cache_seconds=self.issuer_cache_seconds,
        )

    def limits(self) -> Limits:
        return Limits(
            otp_sends_per_individual=RateRule(self.otp_sends_per_individual, self.otp_send_window_seconds),
            otp_sends_per_partner=RateRule(self.otp_sends_per_partner_per_minute, 60),
            auth_failures=RateRule(self.auth_failures_before_lockout, self.auth_failure_window_seconds),
            lockout_seconds=self.lockout_seconds,
            auth_failures_per_partner=RateRule(self.auth_failures_per_partner_per_minute, 60),
            auth_failures_global=RateRule(self.auth_failures_per_minute, 60),
            nonces_per_partner=RateRule(self.nonces_per_partner_per_minute, 60),
            nonces_per_individual=RateRule(self.nonces_per_individual, self.nonce_window_seconds),
        )

    def apply_environment(self) -> None:
        """Point SoftHSM at the data directory's token folder unless the caller chose one."""
        if "SOFTHSM2_CONF" not in os.environ and self.softhsm_conf_path.exists():
            os.environ["SOFTHSM2_CONF"] = str(self.softhsm_conf_path)


def redact_url(url: str) -> str:
    """The URL without its password, fit for printing."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def config_path(config_file: Path | None = None) -> Path | None:
    """The TOML file settings are read from: the one given, else $KEYBINDER_CONFIG, else none."""
    return config_file or (Path(os.environ["KEYBINDER_CONFIG"]) if os.environ.get("KEYBINDER_CONFIG") else None)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file (or $KEYBINDER_CONFIG), env and overrides."""
    path = config_path(config_file)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    values = {k: v for k, v in overrides.items() if v is not None}

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FileSettings(**values) if path is not None else Settings(**values)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


class ConfigError(ValueError):
    """A setting that is unknown or has a bad value; the message names where it came from, in one line."""


def explain(err: ValidationError, path: Path | None, flags: set[str]) -> str:
    """One line per problem, joined: where the value came from (file, variable or flag), the key, what is wrong.

    pydantic's own text spans several lines and names neither the file nor the variable; the values
    themselves are left out (hide_input_in_errors), as a misplaced secret must not be echoed."""
    in_file: set[str] = set()
    if path is not None:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            in_file = set(tomllib.loads(path.read_text()))
    environment = {name.upper() for name in os.environ}
    problems = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        key = ".".join(loc)
        top = loc[0] if loc else ""
        if top in flags:
            source = "command line: "
        elif f"KEYBINDER_{top.upper()}" in environment:
            source = f"KEYBINDER_{top.upper()}: "
        elif top in in_file:
            source = f"{path}: "
        else:
            source = ""
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(top, Settings.model_fields, n=1)
            what = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
        else:
            what = problem["msg"].removeprefix("Value error, ")
        problems.append(f"{source}{key}: {what}" if key else f"{source}{what}")
    return "; ".join(problems)
