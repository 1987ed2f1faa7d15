"""The layout shows the layers: every module of server/ belongs to one, and no import points the wrong way.

Read with the ast module from the source files (every import counts: module level, inside a function,
under TYPE_CHECKING), so a violation fails here whether or not the import happens to run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The service layer: the operations, the domain they work on and the ports they need. None of it may
#: import gRPC, PKCS#11, the hsm package or any adapter below.
SERVICE_LAYER = {
    "server.service": "the operations of the KeyBinder contract",
    "server.partners": "partner keys and the per-request partner check, over the PartnerStore port",
    "server.ports": "the Protocols the service needs; the adapters implement them",
    "server.domain": "frozen records passed between the service and its ports",
    "server.policy": "policy values and the ID patterns",
    "server.errors": "errors with their reason and a transport-neutral status",
    "server.auth": "the auth-factor registry, challenge validation and the factor rules",
    "server.auth.base": "the AuthFactor Protocol and the values a factor works on",
    "server.auth.otp": "the OTP factor",
    "server.auth.pin": "the PIN factor",
    "server.auth.wla": "the WLA factor (a token signed by the bound wallet key)",
    "server.auth.kbi": "the KBI factor (knowledge-based answers)",
    "server.jwk": "wallet JWK validation",
    "server.breaker": "the database circuit breaker the service consults (fed by the health probe)",
    "server.deadline": "the caller's deadline as a context variable, with no transport type",
    "server.pin_policy": "the enrolment rules for PINs (guessable PINs refused)",
    "server.sweeper": "periodic maintenance over the ports: purge expired rows, sign audit chain heads",
    "server.keyprofiles": "the key-type table (JWS algs, hash, JWK kty/crv, HSM kind) and its one type dispatch",
    "server.keytypes": "wallet key types by name, as operators allow them per partner",
    "server.otp": "OTP alphabets and drawing a code",
    "server.aliases": "an individual's aliases (UIN, VIDs): their port and the admin operations",
    "server.wla": "WLA token and proof-of-possession verification",
    "server.certs": "certificate profiles (the signer is any cryptography private key)",
    "server.issuers": "which issuer key signs and which are published; the cache of installed issuers",
    "server.limits": "abuse-limit rules",
    "server.audit": "audit entries and their hash chain",
    "server.logs": "log records with request context (plain logging; the gRPC hook is in grpc_api)",
}

#: Adapters, each with the reason it is one. They may import the service layer (dependencies point down).
ADAPTERS = {
    "server": "the package marker",
    "server.__main__": "`python -m server`: the command line",
    "server.app": "the composition root: builds the HSM key manager (pkcs11), stores and notifiers",
    "server.provisioning": "the idempotent `init`: SoftHSM token and PINs, keys on the HSM, schema, demo partner",
    "server.issuer_admin": "issuer key administration: keys on the HSM (hsm), certificates and CSRs in the store",
    "server.enrolment": "identity enrolment: drives the service (HMACs, ID and PIN checks) into the store",
    "server.config": "reads TOML and KEYBINDER_* into Settings, and names the HSM (hsm.Pkcs11Uri, KeyKind)",
    "server.serve": "the grpc.aio server: health, reflection, signals",
    "server.workers": "processes sharing the port; starts serve",
    "server.process": "the serving process's OS surface: umask, descriptor limit, the listen address, parent death",
    "server.tls": "gRPC server credentials (grpc.ssl_server_credentials) that follow the files",
    "server.metrics": "Prometheus exporter, and the observer of every PKCS#11 call (hsm.set_observer)",
    "server.hsm_backend": "the PKCS#11 backend of the KeyedHasher and IssuerKeys ports (hsm)",
}
#: Packages whose every module is an adapter of one kind.
ADAPTER_PACKAGES = {
    "server.grpc_api": "everything that speaks gRPC: servicer, converters, status, decoding, observability, demo",
    "server.gen": "code generated from protos/ (protobuf and grpc)",
    "server.stores": "persistence: SQLite and PostgreSQL",
    "server.notifiers": "OTP delivery: outbox file, SMTP, webhook",
    "server.cli": "the command line (typer), one module per command group: driving adapters over app.py",
}
#: Driven adapters implement ports; they must not load the service, the partner check or a driving adapter.
DRIVEN = ("server.stores", "server.notifiers", "server.hsm_backend")
#: What drives the service: only these may import server.service.
DRIVERS = ("server.app", "server.grpc_api", "server.cli", "server.serve", "server.enrolment")

GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.rpc")
FORBIDDEN_IN_SERVICE_LAYER = (*GRPC, "pkcs11", "hsm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, names) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[int, str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, tuple(alias.name for alias in node.names)))
    return found


def within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    return any(
        module == p or module.startswith(p + ".") for p in ((prefixes,) if isinstance(prefixes, str) else prefixes)
    )


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


SERVER = [(module_name(p), p) for p in sources("server")]
HSM = [(module_name(p), p) for p in sources("hsm")]


def violations(modules: list[tuple[str, Path]], rule: object) -> list[str]:
    assert callable(rule)
    return [
        f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
        for module, path in modules
        for line, target, names in imports_of(path)
        if rule(module, target, names)
    ]


def test_every_server_module_belongs_to_one_layer() -> None:
    unclaimed = [
        m for m, _ in SERVER if m not in SERVICE_LAYER and m not in ADAPTERS and not within(m, tuple(ADAPTER_PACKAGES))
    ]
    assert unclaimed == [], "name the layer of each new module in tests/test_layers.py"
    stale = [m for m in (*SERVICE_LAYER, *ADAPTERS) if m not in dict(SERVER)]
    assert stale == [], "modules named here that no longer exist"
    assert not set(SERVICE_LAYER) & set(ADAPTERS)


def test_the_service_layer_imports_neither_grpc_nor_pkcs11_nor_hsm() -> None:
    found = violations(
        [(m, p) for m, p in SERVER if m in SERVICE_LAYER],
        lambda module, target, names: within(target, FORBIDDEN_IN_SERVICE_LAYER),
    )
    assert found == [], "\n".join(found)


def test_the_service_layer_imports_no_adapter() -> None:
    def adapter(target: str) -> bool:
        return (target in ADAPTERS and target != "server") or within(target, tuple(ADAPTER_PACKAGES))

    found = violations(
        [(m, p) for m, p in SERVER if m in SERVICE_LAYER],
        lambda module, target, names: adapter(target) or (target == "server" and bool(set(names) & _adapter_leaves())),
    )
    assert found == [], "\n".join(found)


def _adapter_leaves() -> set[str]:
    """``from server import metrics`` names a module: the last part of each adapter's dotted name."""
    return {m.rpartition(".")[2] for m in (*ADAPTERS, *ADAPTER_PACKAGES) if m != "server"}


def test_hsm_never_imports_server() -> None:
    found = violations(HSM, lambda module, target, names: within(target, "server"))
    assert found == [], "\n".join(found)


def test_driven_adapters_never_load_the_service() -> None:
    """Stores, notifiers and the HSM backend implement ports: they import domain modules and ports only."""
    found = violations(
        [(m, p) for m, p in SERVER if within(m, DRIVEN)],
        lambda module, target, names: within(target, ("server.service", "server.partners", *DRIVERS, "server.config")),
    )
    assert found == [], "\n".join(found)


def test_only_the_drivers_import_the_service_module() -> None:
    found = violations(
        [(m, p) for m, p in SERVER if not within(m, DRIVERS)],
        lambda module, target, names: target == "server.service" or (target == "server" and "service" in names),
    )
    assert found == [], "\n".join(found)


def test_server_uses_only_what_hsm_exports() -> None:
    import hsm

    exported = set(hsm.__all__)
    found = violations(
        [(module_name(p), p) for p in [*sources("server"), *sources("scripts")]],
        lambda module, target, names: within(target, "hsm") and (target != "hsm" or not set(names) <= exported),
    )
    assert found == [], "\n".join(found)


#: The bottom of the service layer: what each of these may import from server/ (nothing else).
BOTTOM = {
    "server.domain": (),
    "server.errors": (),
    "server.limits": (),
    "server.audit": (),
    "server.ports": ("server.domain", "server.audit", "server.limits"),
    "server.keyprofiles": (),
    "server.policy": ("server.limits", "server.wla", "server.keyprofiles"),
}


def test_ports_domain_and_policy_sit_at_the_bottom() -> None:
    """Ports and records name domain values only: not a certificate profile, the service or an adapter."""
    found = violations(
        [(m, p) for m, p in SERVER if m in BOTTOM],
        lambda module, target, names: within(target, "server") and target not in BOTTOM[module],
    )
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "module", ["server.service", "server.auth", "server.partners", "server.policy", "server.config"]
)
def test_importing_a_service_module_loads_no_grpc(module: str) -> None:
    """The rule holds at run time too: nothing the module pulls in, transitively, loads grpc (or pkcs11)."""
    forbidden = ["grpc", "pkcs11"] if module != "server.config" else ["grpc"]
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == ""


#: Outside server/grpc_api/ (and the generated code) only these may import gRPC, each for a reason.
GRPC_OUTSIDE_GRPC_API = {
    "server.serve": "starts the grpc.aio server and registers the servicer, health and reflection on it",
    "server.tls": "turns the certificate files into grpc server credentials that reload on a new handshake",
}


def test_grpc_is_spoken_under_grpc_api() -> None:
    """Request handling, status mapping, per-RPC observability and the demo client live in server/grpc_api/."""
    found = violations(
        [
            (m, p)
            for m, p in SERVER
            if not within(m, ("server.grpc_api", "server.gen")) and m not in GRPC_OUTSIDE_GRPC_API
        ],
        lambda module, target, names: within(target, GRPC),
    )
    assert found == [], "\n".join(found)
