"""Auth factors end to end through the real server (SoftHSM, SQLite and PostgreSQL): KBI with OTP or PIN,
KBI alone refused, wrong answers counted towards the lockout, answers never stored or logged in clear, and the
same with any one factor's module removed from the registry."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from server import auth
from server.config import Settings, load_settings
from server.enrolment import register_identity
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key, read_otp
from server.provisioning import initialise
from server.stores.sqlite import SqliteStore
from tests.conftest import (
    POP_OFF_PARTNER,
    POP_REQUIRED_PARTNER,
    RunningServer,
    failure,
    fresh_database,
    md,
    otp_challenge,
    pin_challenge,
    running,
)
from tests.test_cli import kb_cli, make_data_dir

KBI_FIELDS = [{"id": "dob", "type": "date", "format": "dd/MM/yyyy"}, {"id": "mothersName", "type": "text"}]
LOCKOUT_AFTER = 3


@dataclass(frozen=True)
class KbiPerson:
    individual_id: str
    email: str
    pin: str
    dob: str  # ISO, as enrolled
    mothers_name: str


def kbi_settings(base: Settings, database_url: str, factors: list[str]) -> Settings:
    return load_settings(
        data_dir=base.data_dir,
        database_url=database_url,
        otp_ttl_seconds=60,
        proof_of_possession_by_partner={POP_REQUIRED_PARTNER: "required", POP_OFF_PARTNER: "off"},
        otp_sends_per_individual=1_000_000,
        otp_sends_per_partner_per_minute=10_000_000,
        auth_failures_before_lockout=LOCKOUT_AFTER,
        challenge_factors=factors,
        kbi_fields=KBI_FIELDS,
    )


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A database of the kind, of its own: KBI servers must not share rows with the session's server."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'kbi.db'}"
    else:
        with fresh_database("kb_kbi") as url:
            yield url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def kbi_db(
    request: pytest.FixtureRequest, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database (the session's token and issuer key, installed here too) for KBI servers."""
    with database(request.param, tmp_path_factory.mktemp("kbi-db")) as url:
        initialise(kbi_settings(settings, url, ["OTP", "PIN", "WLA", "KBI"]))
        yield url


@pytest.fixture(scope="module")
def kbi_kb(settings: Settings, kbi_db: str) -> Iterator[RunningServer]:
    with running(kbi_settings(settings, kbi_db, ["OTP", "PIN", "WLA", "KBI"])) as server:
        yield server


def enrol(kb: RunningServer) -> KbiPerson:
    p = KbiPerson(
        individual_id=f"{secrets.randbelow(10**12):012d}",
        email=f"kbi{secrets.token_hex(3)}@example.org",
        pin=f"{secrets.randbelow(10**6):06d}",
        dob=f"19{secrets.randbelow(90) + 10}-0{secrets.randbelow(9) + 1}-1{secrets.randbelow(9)}",
        mothers_name=f"Quetzal{secrets.token_hex(4)} Xochitl",
    )
    register_identity(
        kb.app.service,
        kb.app.store,
        individual_id=p.individual_id,
        email=p.email,
        phone=None,
        name="K",
        pin=p.pin,
        kbi={"dob": p.dob, "mothersName": p.mothers_name},
    )
    return p


def formats_request(factor: str) -> pb.GetSupportedChallengeFormatsRequest:
    return pb.GetSupportedChallengeFormatsRequest(auth_factor_type=factor)


def kbi_challenge(answers: dict[str, str]) -> pb.AuthChallenge:
    encoded = base64.urlsafe_b64encode(json.dumps(answers).encode()).rstrip(b"=").decode()
    return pb.AuthChallenge(auth_factor_type="KBI", format="base64url-encoded-json", challenge=encoded)


def right_kbi(p: KbiPerson) -> pb.AuthChallenge:
    """The enrolled answers as a wallet would type them: the configured date format, other case and spacing."""
    y, m, d = p.dob.split("-")
    return kbi_challenge({"dob": f"{d}/{m}/{y}", "mothersName": "  " + p.mothers_name.upper().replace(" ", "   ")})


def wrong_kbi(p: KbiPerson) -> pb.AuthChallenge:
    y, m, d = p.dob.split("-")
    return kbi_challenge({"dob": f"{d}/{m}/{int(y) + 1}", "mothersName": p.mothers_name})


def bind(kb: RunningServer, p: KbiPerson, *challenges: pb.AuthChallenge) -> pb.DoKeyBindingResponse:
    request = pb.DoKeyBindingRequest(
        individual_id=p.individual_id,
        challenges=list(challenges),
        public_key_jwk=new_wallet_key("ec-p256")[1],
        bind_auth_factor_type="WLA",
    )
    response: pb.DoKeyBindingResponse = kb.stub.DoKeyBinding(request, metadata=md())
    return response


def companion(kb: RunningServer, p: KbiPerson) -> pb.AuthChallenge:
    """A right PIN challenge, or a right OTP where the PIN factor is not registered."""
    if "PIN" in kb.app.service.factors:
        return pin_challenge(p.pin)
    return otp_challenge(otp_for(kb, p))


def otp_for(kb: RunningServer, p: KbiPerson) -> str:
    sent = kb.stub.SendBindingOtp(
        pb.SendBindingOtpRequest(individual_id=p.individual_id, otp_channels=["email"]), metadata=md()
    )
    return read_otp(kb.app.settings.outbox, sent.transaction_id)


def kbi_scenario(kb: RunningServer) -> None:
    """KBI through the real server: binds with OTP or PIN, never alone, a wrong answer counts."""
    p = enrol(kb)
    fmt = kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="KBI"), metadata=md()
    )
    assert list(fmt.formats) == ["base64url-encoded-json"]

    # Right answers with another factor bind; with OTP too wherever OTP is registered.
    assert bind(kb, p, right_kbi(p), companion(kb, p)).certificate.startswith("-----BEGIN CERTIFICATE-----")
    if "OTP" in kb.app.service.factors:
        assert bind(kb, p, right_kbi(p), otp_challenge(otp_for(kb, p))).thumbprint

    # KBI alone does not bind by default, even right: refused before any answer is looked at (nothing counted).
    for _ in range(LOCKOUT_AFTER + 1):
        alone = failure(lambda: bind(kb, p, right_kbi(p)))
        assert (alone.code, alone.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_auth_factor_type")
        assert "do not suffice together" in alone.message

    # A wrong answer is refused as any failed challenge, and counted: the lockout follows, even for right answers.
    for _ in range(LOCKOUT_AFTER):
        wrong = failure(lambda: bind(kb, p, wrong_kbi(p), companion(kb, p)))
        assert (wrong.code, wrong.reason) == (grpc.StatusCode.UNAUTHENTICATED, "auth_failed")
    locked = failure(lambda: bind(kb, p, right_kbi(p), companion(kb, p)))
    assert (locked.code, locked.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_attempts")


def test_kbi_end_to_end(kbi_kb: RunningServer) -> None:
    kbi_scenario(kbi_kb)


def test_kbi_challenge_carrying_the_individual_id_as_esignet_forms_do(kbi_kb: RunningServer) -> None:
    p = enrol(kbi_kb)
    y, m, d = p.dob.split("-")
    answers = {"dob": f"{d}/{m}/{y}", "mothersName": p.mothers_name}
    assert bind(kbi_kb, p, kbi_challenge({**answers, "individualId": p.individual_id}), pin_challenge(p.pin)).thumbprint
    other = kbi_challenge({**answers, "individualId": enrol(kbi_kb).individual_id})
    err = failure(lambda: bind(kbi_kb, p, other, pin_challenge(p.pin)))
    assert (err.code, err.reason) == (grpc.StatusCode.UNAUTHENTICATED, "auth_failed")


NOT_A_DATE = kbi_challenge({"dob": "1 April 1990", "mothersName": "x"})


def test_kbi_with_a_malformed_answer_is_invalid_challenge_and_not_counted(kbi_kb: RunningServer) -> None:
    p = enrol(kbi_kb)
    for _ in range(LOCKOUT_AFTER + 1):
        bad = failure(lambda: bind(kbi_kb, p, NOT_A_DATE, pin_challenge(p.pin)))
        assert (bad.reason, bad.metadata) == ("invalid_challenge", {"challenge_index": "0"})
    assert bind(kbi_kb, p, right_kbi(p), pin_challenge(p.pin)).thumbprint


def test_an_individual_without_kbi_attributes_fails_kbi(kbi_kb: RunningServer) -> None:
    p = enrol(kbi_kb)
    register_identity(  # enrolled again without KBI attributes: they are gone
        kbi_kb.app.service,
        kbi_kb.app.store,
        individual_id=p.individual_id,
        email=p.email,
        phone=None,
        name="K",
        pin=p.pin,
    )
    err = failure(lambda: bind(kbi_kb, p, right_kbi(p), pin_challenge(p.pin)))
    assert err.reason == "auth_failed"


def test_kbi_answers_are_never_stored_or_logged_in_clear(
    kbi_kb: RunningServer, kbi_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = enrol(kbi_kb)
    messages = []
    bind(kbi_kb, p, right_kbi(p), pin_challenge(p.pin))
    for challenges in ([wrong_kbi(p), pin_challenge(p.pin)], [right_kbi(p)], [kbi_challenge({"dob": p.dob})]):
        with pytest.raises(grpc.RpcError) as info:
            bind(kbi_kb, p, *challenges)
        messages.append(str(info.value.details()))
    y, m, d = p.dob.split("-")
    secrets_used = {
        p.mothers_name, p.mothers_name.lower(), p.mothers_name.upper(), p.mothers_name.split()[0].lower(),
        p.dob, f"{d}/{m}/{y}", f"{d}/{m}/{int(y) + 1}", right_kbi(p).challenge, wrong_kbi(p).challenge,
    }  # fmt: skip
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert caplog.records, "the server logged nothing: the check would prove nothing"
    stored = database_text(kbi_db)
    assert p.email in stored, "the dump does not see the individual's row: the check would prove nothing"
    for value in secrets_used:
        assert value not in logged
        assert all(value not in m for m in messages)
        assert value not in stored


def database_text(url: str) -> str:
    """Every byte the database holds for KeyBinder, as text (SQLite: the files; PostgreSQL: every row)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        files = [path, path.with_name(path.name + "-wal")]
        return "".join(f.read_bytes().decode("latin-1") for f in files if f.exists())
    with closing(psycopg.connect(url)) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(
            str(row[0])  # bytea appears as hex: an answer in clear would appear as itself
            for table in tables
            for row in conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" t')  # noqa: S608 - catalog names
        )


def test_supported_formats_without_kbi(kb: RunningServer) -> None:
    """The session's server keeps the default factors: KBI is off until configured."""
    fmt = kb.stub.GetSupportedChallengeFormats(
        pb.GetSupportedChallengeFormatsRequest(auth_factor_type="KBI"), metadata=md()
    )
    assert list(fmt.formats) == []


# -- the same with any one factor's module removed from the registry ------------------------------------------


@pytest.mark.parametrize("removed", sorted(auth.REGISTRY))
def test_any_one_factor_module_removed_from_the_registry(
    removed: str, settings: Settings, kbi_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(auth.REGISTRY, removed)
    rest = [f for f in ("OTP", "PIN", "WLA", "KBI") if f != removed]
    # Settings naming the missing factor are refused at load, saying which factors there are.
    with pytest.raises(ValueError, match=rf"unknown factor\(s\) \['{removed}'\]"):
        kbi_settings(settings, kbi_db, [*rest, removed])
    with running(kbi_settings(settings, kbi_db, rest)) as kb:
        fmt = kb.stub.GetSupportedChallengeFormats(
            pb.GetSupportedChallengeFormatsRequest(auth_factor_type=removed), metadata=md()
        )
        assert list(fmt.formats) == []
        if removed == "KBI":
            p = enrol_without_kbi(kb)
            err = failure(lambda: bind(kb, p, right_kbi(p), pin_challenge(p.pin)))
            assert (err.reason, err.metadata) == ("invalid_auth_factor_type", {"challenge_index": "0"})
            assert bind(kb, p, pin_challenge(p.pin)).thumbprint  # the others work as before
        else:
            kbi_scenario(kb)


def enrol_without_kbi(kb: RunningServer) -> KbiPerson:
    p = KbiPerson(
        f"{secrets.randbelow(10**12):012d}", "n@example.org", f"{secrets.randbelow(10**6):06d}", "1990-01-01", "x"
    )
    register_identity(
        kb.app.service, kb.app.store, individual_id=p.individual_id, email=p.email, phone=None, name="K", pin=p.pin
    )
    return p


# -- enrolment through the CLI, as an operator does it ---------------------------------------------------------

KBI_TOML = """challenge_factors = ["OTP", "PIN", "WLA", "KBI"]
kbi_fields = [{ id = "dob", type = "date", format = "dd/MM/yyyy" }, { id = "mothersName", type = "text" }]
"""


@pytest.fixture(scope="module")
def cli_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_data_dir(tmp_path_factory.mktemp("kbi-cli") / "data")
    (path / "kbi.toml").write_text(KBI_TOML)
    return path


def import_with_kbi(people: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return kb_cli("identities", "import", str(people), "--config", str(data_dir / "kbi.toml"), data_dir=data_dir)


def kbi_rows(data_dir: Path) -> int:
    store = SqliteStore(data_dir / "keybinder.db")
    try:
        return store.count_rows("kbi_answers")
    finally:
        store.close()


def test_identities_import_takes_kbi_attributes_and_stores_only_hmacs(cli_data_dir: Path, tmp_path: Path) -> None:
    before = kbi_rows(cli_data_dir)
    people = tmp_path / "people.json"
    answers = {"dob": "23/11/1987", "mothersName": "Itzpapalotl Quiahuitl"}
    entry = {"individual_id": "5550101010", "email": "k@example.org", "kbi": answers}
    people.write_text(json.dumps([entry]))
    result = kb_cli(
        "identities", "import", str(people), "--config", str(cli_data_dir / "kbi.toml"), data_dir=cli_data_dir
    )
    assert result.returncode == 0, result.stderr
    assert kbi_rows(cli_data_dir) == before + 2
    raw = b"".join(f.read_bytes() for f in cli_data_dir.glob("keybinder.db*"))
    assert b"k@example.org" in raw  # the dump sees the identity's row
    for clear in (b"Itzpapalotl", b"itzpapalotl", b"1987-11-23", b"23/11/1987"):
        assert clear not in raw


@pytest.mark.parametrize(
    ("kbi", "message"),
    [
        ({"dob": "23/11/1987", "mothersName": "M", "petName": "Secretfluff"}, "unknown KBI field(s) ['petName']"),
        ({"dob": "23/11/1987"}, "KBI field(s) ['mothersName'] missing"),
        ({"dob": "Secret-Nov-1987", "mothersName": "M"}, "KBI field 'dob' must be a date"),
        ({"dob": 1987, "mothersName": "M"}, "kbi must be an object of field id to answer"),
    ],
    ids=["unknown-field", "missing-field", "not-a-date", "not-a-string"],
)
def test_identities_import_refuses_bad_kbi_naming_the_field_never_the_value(
    cli_data_dir: Path, tmp_path: Path, kbi: dict[str, object], message: str
) -> None:
    before = kbi_rows(cli_data_dir)
    people = tmp_path / "people.json"
    good = {"individual_id": "5550202020", "kbi": {"dob": "01/01/1990", "mothersName": "M"}}
    people.write_text(json.dumps([good, {"individual_id": "5550303030", "kbi": kbi}]))
    result = kb_cli(
        "identities", "import", str(people), "--config", str(cli_data_dir / "kbi.toml"), data_dir=cli_data_dir
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Secret" not in result.stderr
    assert kbi_rows(cli_data_dir) == before, "a file with a bad entry imports nothing"


def test_identities_add_reads_kbi_answers_from_stdin_not_argv(cli_data_dir: Path) -> None:
    before = kbi_rows(cli_data_dir)
    result = kb_cli(
        "identities", "add", "5550404040", "--with-pin", "--with-kbi", "--config", str(cli_data_dir / "kbi.toml"),
        data_dir=cli_data_dir, stdin="864209\n05/06/1970\nCitlali  Tonatiuh\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "added"
    assert "Citlali" not in result.stdout + result.stderr
    assert kbi_rows(cli_data_dir) == before + 2


def test_identities_add_with_kbi_needs_configured_fields(cli_data_dir: Path) -> None:
    result = kb_cli("identities", "add", "5550505050", "--with-kbi", data_dir=cli_data_dir, stdin="x\n")
    assert result.returncode != 0
    assert "no kbi_fields are configured" in result.stderr
