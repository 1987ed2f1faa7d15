"""Settings precedence (defaults < TOML < KEYBINDER_* env < flags) and derived values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hsm import HsmConfigError, KeyKind
from server.config import DEFAULT_MODULE, load_settings


def test_defaults_live_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYBINDER_CONFIG", raising=False)
    s = load_settings(data_dir=tmp_path)
    assert s.listen == "127.0.0.1:50051"
    assert s.database_path == tmp_path / "keybinder.db"
    assert s.outbox == tmp_path / "outbox.jsonl"
    uri = s.pkcs11_uri
    assert (uri.token, uri.object, uri.module_path) == ("keybinder", "keybinder-issuer", DEFAULT_MODULE)
    assert uri.pin_source == f"file:{tmp_path / 'hsm-pin'}"
    assert s.issuer_key_type is KeyKind.EC_P256
    assert (s.otp_ttl_seconds, s.otp_max_attempts, s.cert_validity_days) == (180, 3, 365)
    assert s.bind_auth_factor_types == ["WLA"]


def test_toml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "keybinder.toml"
    config.write_text(
        'listen = "127.0.0.1:6000"\notp_ttl_seconds = 90\ncert_validity_days = 30\nissuer_key_type = "ed25519"\n'
    )
    monkeypatch.setenv("KEYBINDER_OTP_TTL_SECONDS", "120")
    monkeypatch.setenv("KEYBINDER_CERT_VALIDITY_DAYS", "60")
    s = load_settings(config, data_dir=tmp_path, cert_validity_days=7)
    assert s.listen == "127.0.0.1:6000"  # TOML only
    assert s.issuer_key_type is KeyKind.ED25519  # TOML only
    assert s.otp_ttl_seconds == 120  # env beats TOML
    assert s.cert_validity_days == 7  # flag beats env
    monkeypatch.setenv("KEYBINDER_CONFIG", str(config))
    assert load_settings(data_dir=tmp_path).listen == "127.0.0.1:6000"


def test_env_lists_are_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBINDER_BIND_AUTH_FACTOR_TYPES", '["WLA", "PIN"]')
    assert load_settings(data_dir=tmp_path).policy().bind_auth_factor_types == frozenset({"WLA", "PIN"})


def test_unknown_and_invalid_settings_fail_loudly(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("otp_ttl_secs = 90\n")
    with pytest.raises(ValidationError, match="otp_ttl_secs"):
        load_settings(config, data_dir=tmp_path)
    with pytest.raises(ValidationError, match="otp_max_attempts"):
        load_settings(data_dir=tmp_path, otp_max_attempts=0)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_hsm_uri_setting(tmp_path: Path) -> None:
    uri = "pkcs11:token=prod;object=issuer-2026?module-path=/opt/hsm/lib.so&pin-source=env:HSM_PIN"
    s = load_settings(data_dir=tmp_path, hsm_uri=uri)
    assert (s.pkcs11_uri.token, s.pkcs11_uri.object, s.pkcs11_uri.pin_source) == ("prod", "issuer-2026", "env:HSM_PIN")
    no_object = load_settings(data_dir=tmp_path, hsm_uri="pkcs11:token=prod?module-path=/opt/hsm/lib.so")
    assert no_object.pkcs11_uri.object == "keybinder-issuer"
    with pytest.raises(HsmConfigError, match="pin-value"):
        _ = load_settings(data_dir=tmp_path, hsm_uri="pkcs11:token=t?module-path=/x.so&pin-value=1234").pkcs11_uri


def test_listen_parsing(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path, listen="0.0.0.0:9000").host_port == ("0.0.0.0", 9000)  # noqa: S104
    assert load_settings(data_dir=tmp_path, listen="[::1]:9001").host_port == ("::1", 9001)


def test_database_urls(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).database == f"sqlite:///{tmp_path / 'keybinder.db'}"
    pg = load_settings(data_dir=tmp_path, database_url="postgresql://kb@db.internal:5432/keybinder")
    assert pg.database == "postgresql://kb@db.internal:5432/keybinder"
    with pytest.raises(ValueError, match="not SQLite"):
        _ = pg.database_path
    with pytest.raises(ValueError, match=r"sqlite:///path or postgresql://"):
        _ = load_settings(data_dir=tmp_path, database_url="mysql://x/y").database
