"""Configuration: defaults < TOML file < KEYBINDER_* environment < command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hsm import KeyKind, Pkcs11Uri
from server.service import DEFAULT_INDIVIDUAL_ID_PATTERN, Policy
from server.stores import check_url, is_postgres, sqlite_path

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN = "keybinder"  # noqa: S105 - a token label, not a secret
DEFAULT_ISSUER_LABEL = "keybinder-issuer"


class Settings(BaseSettings):
    """Every setting, with its default. Environment variables are KEYBINDER_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="KEYBINDER_", extra="forbid", frozen=True)

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
    bind_auth_factor_types: list[str] = Field(["WLA"], description="Factors a wallet key may be bound for.")
    individual_id_pattern: str = Field(DEFAULT_INDIVIDUAL_ID_PATTERN, description="Regex an individual ID must match.")
    outbox_path: Path | None = Field(None, description="Where the outbox notifier appends OTP messages.")
    wla_audience: str = Field("keybinder", min_length=1, description="aud a WLA token must carry by default.")
    wla_skew_seconds: int = Field(30, ge=0, le=600, description="Clock skew allowed on WLA iat/exp.")
    wla_max_lifetime_seconds: int = Field(300, ge=10, le=86400, description="Largest exp - iat of a WLA token.")
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
    log_level: str = Field("INFO", description="Python logging level.")
    # -- issuer key lifecycle (README "Issuer key rotation") --
    issuer_validity_days: int = Field(1095, ge=1, le=36500, description="Validity of a new issuer certificate.")
    issuer_rotation_window_days: int = Field(
        60, ge=0, le=3650, description="Before its notAfter, the active issuer key hands signing to a newer key."
    )
    issuer_cache_seconds: float = Field(
        30.0, ge=0, le=3600, description="How long a server reuses the issuer list; a rotation reaches it within this."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

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

    def policy(self) -> Policy:
        return Policy(
            otp_ttl_seconds=self.otp_ttl_seconds,
            otp_max_attempts=self.otp_max_attempts,
            cert_validity_days=self.cert_validity_days,
            bind_auth_factor_types=frozenset(self.bind_auth_factor_types),
            individual_id_pattern=self.individual_id_pattern,
            wla_audience=self.wla_audience,
            wla_skew_seconds=self.wla_skew_seconds,
            wla_max_lifetime_seconds=self.wla_max_lifetime_seconds,
            proof_of_possession=self.proof_of_possession,
            proof_of_possession_by_partner=tuple(sorted(self.proof_of_possession_by_partner.items())),
            issuer_rotation_window_days=self.issuer_rotation_window_days,
            issuer_cache_seconds=self.issuer_cache_seconds,
        )

    def apply_environment(self) -> None:
        """Point SoftHSM at the data directory's token folder unless the caller chose one."""
        if "SOFTHSM2_CONF" not in os.environ and self.softhsm_conf_path.exists():
            os.environ["SOFTHSM2_CONF"] = str(self.softhsm_conf_path)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file (or $KEYBINDER_CONFIG), env and overrides."""
    path = config_file or (Path(os.environ["KEYBINDER_CONFIG"]) if os.environ.get("KEYBINDER_CONFIG") else None)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    values = {k: v for k, v in overrides.items() if v is not None}

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    return _FileSettings(**values) if path is not None else Settings(**values)
