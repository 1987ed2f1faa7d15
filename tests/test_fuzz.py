"""Property-based fuzzing of every RPC through the real server: no INTERNAL/UNKNOWN, no rows from a refusal."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.enrolment import register_identity
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.gen.keybinder.v1 import keybinder_pb2_grpc as pb_grpc
from server.grpc_api.demo import WalletPrivateKey, new_wallet_key
from server.policy import DEFAULT_INDIVIDUAL_ID_PATTERN, PARTNER_ID_PATTERN
from server.service import b64url
from tests.conftest import POP_OFF_PARTNER, POP_REQUIRED_PARTNER, Person, RunningServer, md, otp_challenge, send_otp

FUZZ_PARTNER = "fuzz-wallet"
#: Registered once per session by the `world` fixture (the database is fresh per session).
FUZZ_ID = "fuzz.person-0001"
FUZZ_PIN = "739184"
AUDIENCE = "keybinder"
TABLES = ("bindings", "wallet_keys", "otps", "wla_jtis", "binding_nonces")
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
KNOWN_FORMATS = frozenset({"alpha-numeric", "number", "jwt", "encoded-json"})
EXAMPLES = 300

Metadata = tuple[tuple[str, str | bytes], ...]

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# -- the world the fuzzer aims at: a registered individual with an active binding ----------------


@dataclass(frozen=True)
class World:
    kb: RunningServer
    #: A client whose metadata limit is far above gRPC's 8 KiB soft / 16 KiB hard default, so a long status
    #: message reaches the test deterministically (see test_do_key_binding_long_alg_is_not_echoed).
    stub: pb_grpc.KeyBinderServiceStub
    wallet: WalletPrivateKey
    thumbprint: str
    psut: str


@pytest.fixture(scope="module")
def world(kb: RunningServer) -> Iterator[World]:
    register_identity(
        kb.app.service,
        kb.app.store,
        individual_id=FUZZ_ID,
        email="fuzz@example.org",
        phone="+491500001234",
        name="F",
        pin=FUZZ_PIN,
    )
    private, jwk = new_wallet_key("ec-p256")
    _, otp = send_otp(kb, Person(FUZZ_ID, "fuzz@example.org", "+491500001234", FUZZ_PIN), FUZZ_PARTNER)
    req = pb.DoKeyBindingRequest(
        individual_id=FUZZ_ID, challenges=[otp_challenge(otp)], public_key_jwk=jwk, bind_auth_factor_type="WLA"
    )
    bound: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(req, metadata=md(FUZZ_PARTNER))
    options = [("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(kb.target, options=options) as channel:
        stub = pb_grpc.KeyBinderServiceStub(channel)
        yield World(kb, stub, private, bound.thumbprint, bound.partner_specific_user_token)


# -- checking one call ------------------------------------------------------------------------


def row_counts(kb: RunningServer) -> dict[str, int]:
    return {table: kb.app.store.count_rows(table) for table in TABLES}


def still_serving(kb: RunningServer) -> None:
    resp = kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="OTP"), metadata=md(FUZZ_PARTNER), timeout=10
    )
    assert list(resp.formats) == ["alpha-numeric"]


def check_refusal(err: grpc.RpcError) -> None:
    """Never INTERNAL/UNKNOWN; one keybinder ErrorInfo, except gRPC's own 128 KiB request limit (no details)."""
    code = err.code()
    assert code not in FORBIDDEN, f"{code}: {err.details()!r:.300}"
    try:
        status = rpc_status.from_call(err)
    except ValueError as mismatch:  # the details' code differs from the status code
        raise AssertionError(f"{code}: {err.details()!r:.300}: {mismatch}") from None
    if status is None:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{code} without ErrorInfo: {err.details()!r:.300}"
        return
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "keybinder", info
    assert info.reason, info


def outcome(kb: RunningServer, call: Callable[[], object]) -> object | None:
    """Run the RPC; its response, or None after checking the refusal (contract, no rows written)."""
    before = row_counts(kb)
    try:
        response = call()
    except grpc.RpcError as err:
        refusal: grpc.RpcError | None = err
    else:
        refusal = None
    if refusal is not None:
        check_refusal(refusal)
        assert row_counts(kb) == before, "a refused request wrote rows"
    still_serving(kb)
    return response if refusal is None else None


def compact(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The same strategy with a short repr (Hypothesis formats reprs into notes while drawing)."""

    def generated(_: None) -> st.SearchStrategy[Any]:
        return strategy

    return st.none().flatmap(generated)


# -- strategies: text ---------------------------------------------------------------------------

#: Every Unicode category protobuf strings can carry (no lone surrogates): controls, NUL, format, private use.
ANY_CHAR = st.characters(codec="utf-8")
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
SPECIAL = ["", " ", "\x00", "\t\n", "\u202e", "\ufeff", "null", "None", "0", "-1", "WLA", "email", FUZZ_ID, "ʷ" * 5]


def fuzz_text(max_size: int = 20_000) -> st.SearchStrategy[str]:
    long_size = max(1, min(max_size, 20_000))
    return compact(
        st.one_of(
            st.sampled_from(SPECIAL),
            st.text(ANY_CHAR, max_size=min(40, max_size)),
            st.text(ANY_CHAR, min_size=long_size // 4, max_size=long_size),
            st.builds(
                lambda unit, n: (unit * n)[:max_size], st.text(ANY_CHAR, min_size=1, max_size=6), st.integers(1, 5000)
            ),
            st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
            st.binary(max_size=64).map(lambda b: b.decode("utf-8", "replace")),
            st.from_regex(DEFAULT_INDIVIDUAL_ID_PATTERN, fullmatch=True),
        )
    )


SHORT_TEXT = fuzz_text(64)
INDIVIDUAL_IDS = st.one_of(st.just(FUZZ_ID), st.just(FUZZ_ID), fuzz_text())

# -- strategies: metadata -------------------------------------------------------------------

PARTNER_VALUES = compact(
    st.one_of(
        st.sampled_from([FUZZ_PARTNER, POP_REQUIRED_PARTNER, POP_OFF_PARTNER, "", " ", "-x", "a" * 128, "a" * 129]),
        st.from_regex(PARTNER_ID_PATTERN, fullmatch=True),
        st.text(PRINTABLE, max_size=300),
    )
)
METADATA: st.SearchStrategy[Metadata] = compact(
    st.one_of(
        st.just(md(FUZZ_PARTNER)),
        st.just(md(FUZZ_PARTNER)),
        st.just(md(FUZZ_PARTNER)),
        st.just(()),
        PARTNER_VALUES.map(lambda v: (("partner-id", v),)),
        st.tuples(PARTNER_VALUES, PARTNER_VALUES).map(lambda t: (("partner-id", t[0]), ("partner-id", t[1]))),
        st.binary(max_size=40).map(lambda b: (("partner-id-bin", b),)),
        PARTNER_VALUES.map(lambda v: (("x-partner-id", v), ("partner-api-key", v))),
    )
)

# -- strategies: JSON with wrong types, huge numbers, NaN literals and deep nesting -------------


@dataclass(frozen=True)
class Literal:
    """Raw JSON text that json.dumps cannot produce (huge numbers, NaN, deep nesting)."""

    text: str


@dataclass(frozen=True)
class Marker:
    """Filled in at run time: 'thumbprint', 'sub', or 'now' (+ offset seconds)."""

    name: str
    offset: int = 0


#: Python refuses to read integers of more than 4,300 digits (ValueError, not JSONDecodeError).
INT_DIGIT_LIMIT = 4300


def json_values(*, huge_integers: bool = True) -> st.SearchStrategy[Any]:
    """Any JSON value: wrong types, huge numbers, NaN/Infinity literals, deep nesting."""
    digits = [1, 300, 4000, INT_DIGIT_LIMIT] + ([INT_DIGIT_LIMIT + 1, 6000, 15_000] if huge_integers else [])
    literals = st.one_of(
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1E-400", "0.0000", "1.5e308"]),
        st.sampled_from(digits).map(lambda n: "9" * n),
        st.integers(1, 6000).map(lambda n: "1" + "0" * n + ".5"),
        st.sampled_from([1, 100, 999, 1000, 3000]).map(lambda n: "[" * n + "]" * n),
        st.sampled_from([1, 100, 999, 1000, 3000]).map(lambda n: '{"a":' * n + "1" + "}" * n),
    ).map(Literal)
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-(2**520), 2**520),
        st.floats(allow_nan=True, allow_infinity=True),
        SHORT_TEXT,
        literals,
    )
    return compact(
        st.recursive(
            compact(scalars),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SHORT_TEXT, inner, max_size=4),
            max_leaves=12,
        )
    )


JSON_VALUES = json_values()


def dump(value: Any, world: World) -> str:
    """JSON text of a generated value; non-finite floats become the NaN/Infinity literals Python accepts."""
    if isinstance(value, Literal):
        return value.text
    if isinstance(value, Marker):
        if value.name == "thumbprint":
            return json.dumps(world.thumbprint)
        if value.name == "sub":
            return json.dumps(FUZZ_ID)
        return str(int(world.kb.app.service.clock.now().timestamp()) + value.offset)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v, world)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v, world) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


# -- strategies: JWKs ----------------------------------------------------------------------------


@functools.cache
def valid_jwks() -> dict[str, dict[str, Any]]:
    """One accepted public JWK of each wallet key type (generated once)."""
    return {kind: json.loads(new_wallet_key(kind)[1]) for kind in ("ec-p256", "ec-p384", "ed25519", "rsa-2048")}


JWK_MEMBERS = ["kty", "crv", "x", "y", "n", "e", "alg", "use", "key_ops", "kid", "x5c", "x5t", "x5t#S256", "x5u", "d"]


def jwks(*, huge_integers: bool) -> st.SearchStrategy[Any]:
    """JWK text or JSON: random text, any JSON, accepted keys with members removed or of the wrong type."""
    values = json_values(huge_integers=huge_integers)

    @st.composite
    def mutated(draw: st.DrawFn) -> Any:
        jwk = dict(valid_jwks()[draw(st.sampled_from(sorted(valid_jwks())))])
        for name in draw(st.lists(st.sampled_from(sorted(jwk)), max_size=2)):
            jwk.pop(name, None)
        keys = st.one_of(st.sampled_from(JWK_MEMBERS), SHORT_TEXT)
        jwk.update(draw(st.dictionaries(keys, values, max_size=4)))
        return jwk

    return compact(
        st.one_of(
            fuzz_text(),
            values,
            mutated(),
            mutated(),
            mutated(),
            st.sampled_from(["ec-p256", "ec-p384", "ed25519", "rsa-2048"]).map(lambda k: valid_jwks()[k]),
        )
    )


def jwk_text(value: Any, world: World) -> str:
    return value if isinstance(value, str) else dump(value, world)


# -- strategies: tokens --------------------------------------------------------------------------

ALGS = ["ES256", "ES384", "RS256", "PS256", "EdDSA", "Ed25519", "none", "HS256", "es256", ""]


@dataclass(frozen=True)
class Token:
    """A compact JWS to render: raw text, or header/payload JSON with a random or real signature."""

    raw: str | None = None
    header: Any = None
    payload: Any = None
    signature: bytes = b""
    sign: bool = False


HEADERS = compact(
    st.fixed_dictionaries(
        {},
        optional={
            "alg": st.one_of(st.sampled_from(ALGS), st.just("ES256"), JSON_VALUES),
            "x5t#S256": st.one_of(st.just(Marker("thumbprint")), st.just(Marker("thumbprint")), JSON_VALUES),
            "kid": JSON_VALUES,
            "crit": JSON_VALUES,
            "typ": JSON_VALUES,
            "jwk": JSON_VALUES,
        },
    )
)
TIMES = st.one_of(st.integers(-100_000, 100_000).map(lambda s: Marker("now", s)), JSON_VALUES)
CLAIMS = compact(
    st.fixed_dictionaries(
        {},
        optional={
            "sub": st.one_of(st.just(Marker("sub")), JSON_VALUES),
            "aud": st.one_of(st.just(AUDIENCE), st.lists(st.just(AUDIENCE) | SHORT_TEXT, max_size=3), JSON_VALUES),
            "iat": TIMES,
            "exp": TIMES,
            "nbf": TIMES,
            "jti": st.one_of(st.uuids().map(str), JSON_VALUES),
            "nonce": JSON_VALUES,
        },
    )
)
PARTS = st.one_of(st.binary(max_size=300).map(b64url), st.text(ANY_CHAR, max_size=100), st.just(""))


def tokens(*, signed: bool) -> st.SearchStrategy[Token]:
    structured = st.builds(
        Token,
        header=st.one_of(HEADERS, HEADERS, JSON_VALUES),
        payload=st.one_of(CLAIMS, CLAIMS, JSON_VALUES),
        signature=st.binary(max_size=600),
        sign=st.booleans() if signed else st.just(False),
    )
    three_parts = st.lists(PARTS, min_size=1, max_size=5).map(lambda ps: Token(raw=".".join(ps)))
    return compact(st.one_of(structured, structured, three_parts, fuzz_text(9000).map(lambda t: Token(raw=t))))


def _sign(key: WalletPrivateKey, alg: str, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.sign(data)


def render(token: Token, world: World) -> str:
    if token.raw is not None:
        return token.raw
    head = b64url(dump(token.header, world).encode("utf-8", "surrogatepass"))
    body = b64url(dump(token.payload, world).encode("utf-8", "surrogatepass"))
    signing_input = f"{head}.{body}"
    alg = token.header.get("alg") if isinstance(token.header, dict) else None
    signature = _sign(world.wallet, "ES256", signing_input.encode()) if token.sign and alg == "ES256" else None
    return f"{signing_input}.{b64url(signature if signature is not None else token.signature)}"


# -- strategies: challenges ----------------------------------------------------------------------

FACTORS = st.one_of(st.sampled_from(["OTP", "PIN", "WLA", "BIO", "otp", "", "PIN "]), SHORT_TEXT)
FORMATS = st.one_of(st.sampled_from(["alpha-numeric", "number", "jwt", "encoded-json", ""]), SHORT_TEXT)
OTP_SHAPED = st.from_regex(r"[A-Za-z0-9]{6}", fullmatch=True)
PIN_SHAPED = st.one_of(st.from_regex(r"[0-9]{6}", fullmatch=True), st.just(FUZZ_PIN[::-1]))
WLA_SHAPED = st.tuples(st.binary(min_size=40, max_size=400), st.binary(min_size=30, max_size=400), st.binary()).map(
    lambda t: ".".join(b64url(p) or "A" for p in t)
)


@dataclass(frozen=True)
class ChallengeSpec:
    factor: str
    format: str
    answer: str | Token


WELL_FORMED = compact(
    st.one_of(
        st.builds(ChallengeSpec, st.just("OTP"), st.just("alpha-numeric"), OTP_SHAPED),
        st.builds(ChallengeSpec, st.just("PIN"), st.just("number"), PIN_SHAPED),
        st.builds(ChallengeSpec, st.just("WLA"), st.just("jwt"), st.one_of(WLA_SHAPED, tokens(signed=False))),
    )
)
ANY_CHALLENGE = compact(st.builds(ChallengeSpec, FACTORS, FORMATS, st.one_of(OTP_SHAPED, PIN_SHAPED, SHORT_TEXT)))
CHALLENGES = compact(
    st.one_of(
        st.lists(WELL_FORMED, min_size=1, max_size=3, unique_by=lambda c: c.factor),
        st.lists(WELL_FORMED, min_size=1, max_size=3, unique_by=lambda c: c.factor),
        st.lists(st.one_of(WELL_FORMED, ANY_CHALLENGE), max_size=8),
        st.lists(ANY_CHALLENGE, max_size=300),
        st.lists(st.builds(ChallengeSpec, FACTORS, FORMATS, fuzz_text()), max_size=4),
    )
)


def challenges(specs: list[ChallengeSpec], world: World) -> list[pb.AuthChallenge]:
    return [
        pb.AuthChallenge(
            auth_factor_type=c.factor,
            format=c.format,
            challenge=c.answer if isinstance(c.answer, str) else render(c.answer, world),
        )
        for c in specs
    ]


BIND_FACTORS = st.one_of(st.sampled_from(["WLA", "", "OTP", "PIN", "wla"]), SHORT_TEXT)
CHANNELS = st.one_of(
    st.lists(st.sampled_from(["email", "phone", "EMAIL", "Phone", "sms", "", " email"]), max_size=4),
    st.lists(st.one_of(st.sampled_from(["email", "phone"]), SHORT_TEXT), max_size=300),
    st.lists(fuzz_text(), max_size=3),
)


# -- the properties ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def server_still_serving(kb: RunningServer) -> Iterator[None]:
    yield
    health = health_pb2_grpc.HealthStub(kb.channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service="keybinder.v1.KeyBinderService"), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(individual_id=INDIVIDUAL_IDS, channels=CHANNELS, metadata=METADATA)
def test_send_binding_otp(world: World, individual_id: str, channels: list[str], metadata: Metadata) -> None:
    req = pb.SendBindingOtpRequest(individual_id=individual_id, otp_channels=channels)
    outcome(world.kb, lambda: world.stub.SendBindingOtp(req, metadata=metadata))


@FUZZ
@given(
    individual_id=INDIVIDUAL_IDS,
    specs=CHALLENGES,
    jwk=jwks(huge_integers=True),
    factor=BIND_FACTORS,
    proof=st.one_of(st.just(""), st.just(""), tokens(signed=False), SHORT_TEXT),
    metadata=METADATA,
)
def test_do_key_binding(
    world: World,
    individual_id: str,
    specs: list[ChallengeSpec],
    jwk: Any,
    factor: str,
    proof: str | Token,
    metadata: Metadata,
) -> None:
    req = pb.DoKeyBindingRequest(
        individual_id=individual_id,
        challenges=challenges(specs, world),
        public_key_jwk=jwk_text(jwk, world),
        bind_auth_factor_type=factor,
        proof_of_possession=proof if isinstance(proof, str) else render(proof, world),
    )
    resp = outcome(world.kb, lambda: world.stub.DoKeyBinding(req, metadata=metadata))
    # No generated answer is right: the OTP was consumed, the PIN is never generated, tokens are unsigned.
    assert resp is None, "a fuzzed DoKeyBinding was accepted"


DEEP_PARTNERS = st.sampled_from([FUZZ_PARTNER, FUZZ_PARTNER, POP_REQUIRED_PARTNER, POP_OFF_PARTNER]).map(md)
PROOFS = st.one_of(st.just(""), tokens(signed=False), SHORT_TEXT)


def bind_deep(world: World, specs: list[ChallengeSpec], jwk: Any, proof: str | Token, metadata: Metadata) -> None:
    """A request valid up to the JWK (partner, ID, challenge shapes, factor): the JWK and proof go deep."""
    req = pb.DoKeyBindingRequest(
        individual_id=FUZZ_ID,
        challenges=challenges(specs, world),
        public_key_jwk=jwk_text(jwk, world),
        bind_auth_factor_type="WLA",
        proof_of_possession=proof if isinstance(proof, str) else render(proof, world),
    )
    assert outcome(world.kb, lambda: world.stub.DoKeyBinding(req, metadata=metadata)) is None


@FUZZ
@given(
    specs=st.lists(WELL_FORMED, min_size=1, max_size=3, unique_by=lambda c: c.factor),
    jwk=jwks(huge_integers=True),
    proof=PROOFS,
    metadata=DEEP_PARTNERS,
)
def test_do_key_binding_jwk(  # includes integers beyond json's 4,300-digit limit: invalid_public_key
    world: World, specs: list[ChallengeSpec], jwk: Any, proof: str | Token, metadata: Metadata
) -> None:
    bind_deep(world, specs, jwk, proof, metadata)


@settings(FUZZ, max_examples=50)  # a long alg is not echoed into the status (16 KiB trailer limit)
@given(
    kind=st.sampled_from(["ec-p256", "ec-p384", "ed25519", "rsa-2048"]),
    alg=st.one_of(
        st.integers(7000, 15_000).map(lambda n: "A" * n),
        st.lists(st.text(PRINTABLE, min_size=50, max_size=60), min_size=150, max_size=220),
    ),
)
def test_do_key_binding_long_alg_is_not_echoed(world: World, kind: str, alg: Any) -> None:
    """Through a client with gRPC's default limits (as every partner has)."""
    req = pb.DoKeyBindingRequest(
        individual_id=FUZZ_ID,
        challenges=[pb.AuthChallenge(auth_factor_type="PIN", format="number", challenge=FUZZ_PIN[::-1])],
        public_key_jwk=json.dumps({**valid_jwks()[kind], "alg": alg}),
        bind_auth_factor_type="WLA",
    )
    outcome(world.kb, lambda: world.kb.stub.DoKeyBinding(req, metadata=md(FUZZ_PARTNER)))


@FUZZ
@given(factor=fuzz_text(), metadata=METADATA)
def test_get_supported_challenge_formats(world: World, factor: str, metadata: Metadata) -> None:
    req = pb.GetSupportedChallengeFormatsRequest(auth_factor_type=factor)
    resp = outcome(world.kb, lambda: world.stub.GetSupportedChallengeFormats(req, metadata=metadata))
    if isinstance(resp, pb.GetSupportedChallengeFormatsResponse):
        assert set(resp.formats) <= KNOWN_FORMATS


@FUZZ
@given(
    token=tokens(signed=True),
    individual_id=INDIVIDUAL_IDS,
    audience=st.one_of(st.just(""), st.just(AUDIENCE), fuzz_text(400)),
    factor=st.one_of(st.just(""), BIND_FACTORS),
    metadata=METADATA,
)
def test_verify_wallet_token(
    world: World, token: Token, individual_id: str, audience: str, factor: str, metadata: Metadata
) -> None:
    req = pb.VerifyWalletTokenRequest(
        token=render(token, world),
        individual_id=individual_id,
        expected_audience=audience,
        bind_auth_factor_type=factor,
    )
    outcome(world.kb, lambda: world.stub.VerifyWalletToken(req, metadata=metadata))


@FUZZ
@given(token=tokens(signed=True), audience=st.sampled_from(["", AUDIENCE]), factor=st.sampled_from(["", "WLA"]))
def test_verify_wallet_token_deep(world: World, token: Token, audience: str, factor: str) -> None:
    """Partner, ID and factor valid: every token reaches the header, binding, signature and claim checks."""
    req = pb.VerifyWalletTokenRequest(
        token=render(token, world), individual_id=FUZZ_ID, expected_audience=audience, bind_auth_factor_type=factor
    )
    outcome(world.kb, lambda: world.stub.VerifyWalletToken(req, metadata=md(FUZZ_PARTNER)))


@settings(FUZZ, max_examples=100)
@given(metadata=METADATA)
def test_get_issuer_certificates(world: World, metadata: Metadata) -> None:
    outcome(world.kb, lambda: world.stub.GetIssuerCertificates(pb.GetIssuerCertificatesRequest(), metadata=metadata))


@FUZZ
@given(
    individual_id=INDIVIDUAL_IDS,
    specs=CHALLENGES,
    reason=st.one_of(st.text(PRINTABLE, max_size=250), fuzz_text()),
    factor=st.one_of(st.just(""), BIND_FACTORS),
    metadata=METADATA,
)
def test_revoke_binding(
    world: World, individual_id: str, specs: list[ChallengeSpec], reason: str, factor: str, metadata: Metadata
) -> None:
    req = pb.RevokeBindingRequest(
        individual_id=individual_id, challenges=challenges(specs, world), reason=reason, bind_auth_factor_type=factor
    )
    resp = outcome(world.kb, lambda: world.stub.RevokeBinding(req, metadata=metadata))
    assert resp is None, "a fuzzed RevokeBinding was accepted"


SELECTORS = st.one_of(
    st.none(),
    st.tuples(st.just("partner_specific_user_token"), st.one_of(st.just(Marker("psut")), fuzz_text())),
    st.tuples(st.just("thumbprint"), st.one_of(st.just(Marker("thumbprint")), fuzz_text())),
)


@FUZZ
@given(selector=SELECTORS, factor=st.one_of(st.just(""), BIND_FACTORS), metadata=METADATA)
def test_get_binding(world: World, selector: tuple[str, str | Marker] | None, factor: str, metadata: Metadata) -> None:
    req = pb.GetBindingRequest(bind_auth_factor_type=factor)
    if selector is not None:
        field, value = selector
        if isinstance(value, Marker):
            value = world.psut if value.name == "psut" else world.thumbprint
        setattr(req, field, value)
    outcome(world.kb, lambda: world.stub.GetBinding(req, metadata=metadata))


@FUZZ
@given(individual_id=INDIVIDUAL_IDS, metadata=METADATA)
def test_get_binding_nonce(world: World, individual_id: str, metadata: Metadata) -> None:
    req = pb.GetBindingNonceRequest(individual_id=individual_id)
    outcome(world.kb, lambda: world.stub.GetBindingNonce(req, metadata=metadata))
