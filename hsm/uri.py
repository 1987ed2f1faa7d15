"""RFC 7512 PKCS#11 URIs naming a module, a token and an object, and where the PIN comes from."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes

from hsm.errors import HsmConfigError

#: Vendor query attribute (RFC 7512 section 2.3: vendor attributes start with "x-") carrying one
#: environment variable the module reads when it loads, as ``NAME=value``; may repeat. Modules
#: are configured through their environment (p11-kit's client: P11_KIT_SERVER_ADDRESS; SoftHSM:
#: SOFTHSM2_CONF; YubiHSM: YUBIHSM_PKCS11_CONF), so this keeps the URI the whole configuration.
MODULE_ENV_ATTR = "x-module-env"

# Attributes we understand; RFC 7512 says unknown path attributes must make the URI unusable
# for selecting an object, so we refuse them rather than silently widening the match.
_PATH_ATTRS = frozenset({"token", "object", "id", "type", "manufacturer", "serial", "model"})
_QUERY_ATTRS = frozenset({"module-path", "module-name", "pin-source", "pin-value", MODULE_ENV_ATTR})
#: Attributes that may be given more than once.
_REPEATABLE = frozenset({MODULE_ENV_ATTR})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. ``pin_source`` is ``file:/path``, a bare path, or ``env:NAME``."""

    token: str
    module_path: str
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None
    #: Environment the module needs, set in this process before the module is loaded.
    module_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise HsmConfigError("an HSM URI must start with 'pkcs11:'")
        body = text[len("pkcs11:") :]
        path, _, query = body.partition("?")
        attrs: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, sep, value = part.partition("=")
            if not sep or name not in _PATH_ATTRS:
                raise HsmConfigError(f"unsupported PKCS#11 URI path attribute {name!r}")
            if name in attrs:
                raise HsmConfigError(f"PKCS#11 URI attribute {name!r} given twice")
            attrs[name] = value if name == "id" else unquote(value)
        params: dict[str, str] = {}
        module_env: list[tuple[str, str]] = []
        for part in filter(None, query.split("&")):
            name, sep, value = part.partition("=")
            if not sep or name not in _QUERY_ATTRS:
                raise HsmConfigError(f"unsupported PKCS#11 URI query attribute {name!r}")
            if name in params and name not in _REPEATABLE:
                raise HsmConfigError(f"PKCS#11 URI attribute {name!r} given twice")
            if name == MODULE_ENV_ATTR:
                module_env.append(_parse_module_env(unquote(value), [n for n, _ in module_env]))
            params[name] = unquote(value)
        if "pin-value" in params:
            # A PIN inside the URI ends up in config files, process listings and logs.
            raise HsmConfigError("pin-value is not accepted; use pin-source=file:/path or env:NAME")
        if "token" not in attrs:
            raise HsmConfigError("the HSM URI must name a token (token=...)")
        if "module-path" not in params:
            raise HsmConfigError("the HSM URI must name the PKCS#11 module (module-path=...)")
        # CKA_ID is binary: the URI carries it percent-encoded byte by byte.
        key_id = unquote_to_bytes(attrs["id"]) if "id" in attrs else None
        return cls(
            token=attrs["token"],
            module_path=params["module-path"],
            object=attrs.get("object"),
            id=key_id,
            pin_source=params.get("pin-source"),
            module_env=tuple(module_env),
        )

    def with_object(self, label: str) -> Pkcs11Uri:
        return Pkcs11Uri(self.token, self.module_path, label, self.id, self.pin_source, self.module_env)

    def __str__(self) -> str:
        path = f"token={quote(self.token, safe='')}"
        if self.object is not None:
            path += f";object={quote(self.object, safe='')}"
        if self.id is not None:
            path += ";id=" + "".join(f"%{b:02x}" for b in self.id)
        query = f"module-path={quote(self.module_path, safe='/')}"
        if self.pin_source is not None:
            query += f"&pin-source={quote(self.pin_source, safe='/:')}"
        for name, value in self.module_env:
            query += f"&{MODULE_ENV_ATTR}={name}={quote(value, safe='/:=')}"
        return f"pkcs11:{path}?{query}"

    def read_pin(self) -> str:
        """Read the user PIN from its source. The PIN is never part of the URI itself."""
        source = self.pin_source
        if source is None:
            raise HsmConfigError("the HSM URI has no pin-source")
        if source.startswith("env:"):
            name = source[len("env:") :]
            value = os.environ.get(name)
            if not value:
                raise HsmConfigError(f"PIN environment variable {name} is not set")
            return value
        path = Path(source[len("file:") :] if source.startswith("file:") else source)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise HsmConfigError(f"cannot read the PIN file {path}: {err.strerror}") from err
        if not value:
            raise HsmConfigError(f"the PIN file {path} is empty")
        return value


def _parse_module_env(text: str, seen: list[str]) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
        raise HsmConfigError(f"{MODULE_ENV_ATTR} must be NAME=value with NAME a variable name")
    if name.upper().startswith("LD_"):
        # Not the module's configuration, but an instruction to the dynamic loader of every child.
        raise HsmConfigError(f"{MODULE_ENV_ATTR} cannot set the loader variable {name}")
    if name in seen:
        raise HsmConfigError(f"{MODULE_ENV_ATTR} sets {name} twice")
    return name, value


_env_lock = threading.Lock()
#: What apply_module_env set in this process: a module reads its environment once, when it loads.
_applied_env: dict[str, str] = {}


def apply_module_env(uri: Pkcs11Uri) -> None:
    """Export the URI's module environment into this process, before the module is loaded.

    The URI wins over an inherited value. Two URIs that need different values for one variable
    cannot share a process (the module has read the first), which is a configuration error.
    """
    with _env_lock:
        for name, value in uri.module_env:
            if _applied_env.get(name, value) != value:
                raise HsmConfigError(
                    f"{MODULE_ENV_ATTR}: {name} is already set to another value by an HSM URI in this process"
                )
        for name, value in uri.module_env:
            os.environ[name] = value
            _applied_env[name] = value
