"""The audit trail through the real server and the CLI: one entry per outcome, no secrets, tamper evidence."""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
import pytest

from server.audit import (
    ADMIN_CHAIN,
    GENESIS,
    AuditRow,
    admin_event,
    encode_payload,
    individual_event,
    link_hash,
    partner_chain,
    verify_chains,
)
from server.gen.keybinder.v1 import keybinder_pb2 as pb
from server.grpc_api.demo import new_wallet_key
from server.ports import StoreUnavailable
from server.stores import postgres as pg
from server.stores import sqlite as lite
from server.stores.postgres import PostgresStore
from server.stores.sqlite import SqliteStore
from tests.conftest import (
    PARTNER,
    Person,
    RunningServer,
    bind_request,
    failure,
    fresh_database,
    id_hmac,
    md,
    other_pin,
    pin_challenge,
    send_otp,
    unregistered,
)
from tests.test_cli import kb_cli, make_data_dir
from tests.test_wla import bind as wla_bind
from tests.test_wla import verify as wla_verify


def rows_of(kb: RunningServer, chain_key: bytes) -> list[AuditRow]:
    rows: list[AuditRow] = []
    after: tuple[bytes, int] | None = (chain_key, 0)
    while after is not None:
        page = [r for r in kb.app.store.audit_rows(after, 100) if r.chain_key == chain_key]
        rows += page
        after = (chain_key, page[-1].seq) if len(page) == 100 else None
    return rows


def summary(rows: list[AuditRow]) -> list[tuple[str, str, str]]:
    return [(r.action, r.outcome, r.reason) for r in rows]


def cli_verify(db_url: str, tmp_path: Path) -> tuple[int, str]:
    result = kb_cli("audit", "verify", "--database-url", db_url, data_dir=tmp_path)
    return result.returncode, result.stdout + result.stderr


# -- what is recorded ----------------------------------------------------------------------------


def test_every_outcome_of_an_individual_is_on_its_chain(kb: RunningServer, person: Person) -> None:
    wallet = wla_bind(kb, person)  # SendBindingOtp, then DoKeyBinding with the OTP
    wla_verify(kb, wallet.token(), person.individual_id)  # VerifyWalletToken
    token = wallet.token()
    wla_verify(kb, token, person.individual_id)
    failure(lambda: wla_verify(kb, token, person.individual_id))  # replayed
    wrong = bind_request(person, wallet.jwk, pin_challenge(other_pin(person.pin)))
    failure(lambda: kb.stub.DoKeyBinding(wrong, metadata=md()))
    revoke = pb.RevokeBindingRequest(
        individual_id=person.individual_id, challenges=[pin_challenge(person.pin)], reason="lost phone"
    )
    kb.stub.RevokeBinding(revoke, metadata=md())
    failure(lambda: kb.stub.RevokeBinding(revoke, metadata=md()))  # nothing left to revoke

    rows = rows_of(kb, id_hmac(kb, person))
    assert summary(rows) == [
        ("send_binding_otp", "success", ""),
        ("do_key_binding", "success", ""),
        ("verify_wallet_token", "success", ""),
        ("verify_wallet_token", "success", ""),
        ("verify_wallet_token", "refused", "token_replayed"),
        ("do_key_binding", "refused", "auth_failed"),
        ("revoke_binding", "success", ""),
        ("revoke_binding", "refused", "binding_not_found"),
    ]
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert {r.partner_id for r in rows} == {PARTNER}
    psut = wallet.bound.partner_specific_user_token
    assert [r.subject for r in rows[1:4]] == [f"psut:{psut}"] * 3
    assert rows[0].subject == f"id_hmac:{id_hmac(kb, person).hex()}"
    assert verify_chains(rows).broken == []


def test_entries_hold_no_raw_id_otp_pin_or_key(kb: RunningServer, person: Person) -> None:
    _, otp = send_otp(kb, person)
    wallet = wla_bind(kb, person)
    wrong = bind_request(person, wallet.jwk, pin_challenge(other_pin(person.pin)))
    failure(lambda: kb.stub.DoKeyBinding(wrong, metadata=md()))
    text = json.dumps([r.to_json() for r in rows_of(kb, id_hmac(kb, person))])
    x = json.loads(wallet.jwk)["x"]
    for secret in (person.individual_id, otp, person.pin, x, person.email, person.phone):
        assert secret not in text


def test_requests_refused_before_the_id_is_hashed_go_to_the_partner_chain(kb: RunningServer) -> None:
    partner = "audit-partner-chain"
    before = len(rows_of(kb, partner_chain(partner)))
    bad = pb.SendBindingOtpRequest(individual_id="bad id!", otp_channels=["email"])
    failure(lambda: kb.stub.SendBindingOtp(bad, metadata=md(partner)))
    no_channel = pb.SendBindingOtpRequest(individual_id=unregistered().individual_id, otp_channels=["fax"])
    failure(lambda: kb.stub.SendBindingOtp(no_channel, metadata=md(partner)))
    rows = rows_of(kb, partner_chain(partner))[before:]
    assert summary(rows) == [
        ("send_binding_otp", "refused", "invalid_individual_id"),
        ("send_binding_otp", "refused", "invalid_otp_channel"),
    ]
    assert {r.subject for r in rows} == {""}


def test_unknown_individual_refusal_is_recorded_on_its_id_chain(kb: RunningServer) -> None:
    nobody = unregistered()
    request = pb.SendBindingOtpRequest(individual_id=nobody.individual_id, otp_channels=["email"])
    failure(lambda: kb.stub.SendBindingOtp(request, metadata=md()))
    chain = kb.app.service.id_hmac(nobody.individual_id)
    assert summary(rows_of(kb, chain)) == [("send_binding_otp", "refused", "send_otp_failed")]


# -- when the audit write fails --------------------------------------------------------------------


def test_a_refusal_stays_itself_when_its_entry_cannot_be_written(
    kb: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def append_audit(self, event: object) -> None:
            raise StoreUnavailable("database gone")

    monkeypatch.setattr(kb.app.service, "audit_log", Broken())
    bad = pb.SendBindingOtpRequest(individual_id="bad id!", otp_channels=["email"])
    with caplog.at_level(logging.ERROR, logger="server.service"):
        f = failure(lambda: kb.stub.SendBindingOtp(bad, metadata=md()))
    assert (f.code, f.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_individual_id")
    assert "audit entry lost: action=send_binding_otp outcome=refused reason=invalid_individual_id" in caplog.text


def test_a_success_is_never_answered_without_its_entry(
    kb: RunningServer, person: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise StoreUnavailable("audit insert failed")

    monkeypatch.setattr(type(kb.app.store), "_append_audit", staticmethod(broken))
    request = bind_request(person, new_wallet_key("ec-p256")[1], pin_challenge(person.pin))
    f = failure(lambda: kb.stub.DoKeyBinding(request, metadata=md()))
    # Retryable, and the binding was rolled back with its entry: the audit never disagrees with the state.
    assert (f.code, f.reason) == (grpc.StatusCode.UNAVAILABLE, "key_binding_failed")
    assert kb.app.store.bindings_for(id_hmac(kb, person), PARTNER) == []


# -- audit verify and export (the CLI) ---------------------------------------------------------------


def copy_database(kb: RunningServer, target: Path) -> str:
    """A consistent copy of the running server's SQLite database, to tamper with."""
    with closing(sqlite3.connect(kb.app.settings.database_path)) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)
    return f"sqlite:///{target}"


def test_verify_names_the_row_tampered_with_in_the_servers_database(
    kb: RunningServer, person: Person, tmp_path: Path
) -> None:
    wla_bind(kb, person)
    url = copy_database(kb, tmp_path / "copy.db")
    data_dir = kb.app.settings.data_dir  # its token checks the signed heads the server's sweep may have made
    code, out = cli_verify(url, data_dir)
    assert code == 0, out
    assert "audit trail intact" in out

    binding_row = rows_of(kb, id_hmac(kb, person))[1]
    with closing(sqlite3.connect(tmp_path / "copy.db")) as db, db:
        db.execute("DROP TRIGGER audit_log_no_update")  # as someone with write access to the file could
        db.execute("UPDATE audit_log SET outcome = 'refused', reason = 'auth_failed' WHERE id = ?", (binding_row.id,))
    code, out = cli_verify(url, data_dir)
    assert code == 1, out
    chain = f"individual:{id_hmac(kb, person).hex()}"
    assert f"first broken link: row id {binding_row.id} (chain {chain}, seq 2)" in out
    assert "hash does not match" in out
    # The server's own database is untouched and intact.
    code, out = cli_verify(kb.app.settings.database, data_dir)
    assert code == 0, out


def seeded_chains(store: SqliteStore | PostgresStore) -> list[AuditRow]:
    now = datetime.now(UTC)
    alice, bob = b"\x01" * 32, b"\x02" * 32
    for _ in range(3):
        store.append_audit(individual_event(alice, now, PARTNER, "do_key_binding", "refused", "auth_failed"))
        store.append_audit(individual_event(bob, now, PARTNER, "send_binding_otp", "success"))
    store.append_audit(admin_event(now, "init"))
    rows = list(store.audit_rows(None, 100))
    assert len(rows) == 7
    return rows


@pytest.mark.parametrize(
    ("tamper", "broken_seq", "problem"),
    [
        pytest.param(
            "UPDATE audit_log SET subject = 'id_hmac:00' WHERE id = {id}", 2, "hash does not match", id="edit"
        ),
        # Rewriting the entry's hash to fit its new contents only moves the break to the next link.
        pytest.param(
            "UPDATE audit_log SET partner_id = 'x', hash = {rehash} WHERE id = {id}", 3, "prev_hash", id="rehash"
        ),
        pytest.param("DELETE FROM audit_log WHERE id = {id}", 3, "expected seq 2", id="delete"),
        pytest.param("UPDATE audit_log SET prev_hash = {zero} WHERE id = {id}", 2, "prev_hash", id="relink"),
    ],
)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_verify_finds_tampering(tmp_path: Path, backend: str, tamper: str, broken_seq: int, problem: str) -> None:
    if backend == "sqlite":
        path = tmp_path / "audit.db"
        lite.migrate(path)
        store = SqliteStore(path)
        try:
            rows = seeded_chains(store)
        finally:
            store.close()
        alice_2 = next(r for r in rows if r.chain_key == b"\x01" * 32 and r.seq == 2)
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("DROP TRIGGER audit_log_no_update")
            db.execute("DROP TRIGGER audit_log_no_delete")
            db.execute(tamper.format(id=alice_2.id, zero="zeroblob(32)", rehash=f"X'{rehashed(alice_2).hex()}'"))
        check_tampered(f"sqlite:///{path}", tmp_path, alice_2, broken_seq, problem)
        return
    with fresh_database("kb_audit") as url:
        pg.migrate(url)
        pg_store = PostgresStore(url)
        try:
            rows = seeded_chains(pg_store)
        finally:
            pg_store.close()
        alice_2 = next(r for r in rows if r.chain_key == b"\x01" * 32 and r.seq == 2)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            zero, rehash = (f"'\\x{b.hex()}'::bytea" for b in (GENESIS, rehashed(alice_2)))
            conn.execute(tamper.format(id=alice_2.id, zero=zero, rehash=rehash))
        check_tampered(url, tmp_path, alice_2, broken_seq, problem)


def rehashed(row: AuditRow) -> bytes:
    """The hash ``row`` would have with partner_id 'x': what a forger who knows the scheme would write."""
    payload = encode_payload(row.chain_key, row.at, "x", row.action, row.outcome, row.reason, row.subject)
    return link_hash(row.prev_hash, row.seq, payload)


def check_tampered(url: str, tmp_path: Path, row: AuditRow, broken_seq: int, problem: str) -> None:
    code, out = cli_verify(url, tmp_path)
    assert code == 1, out
    chain = f"individual:{'01' * 32}"
    broken_id = row.id if broken_seq == row.seq else row.id + 2  # the next entry of that chain
    assert f"first broken link: row id {broken_id} (chain {chain}, seq {broken_seq})" in out, out
    assert problem in out
    assert "BROKEN: 1 of 3 chain(s)" in out  # the other chains verify


def test_export_writes_json_lines_and_admin_actions_are_on_the_admin_chain(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = make_data_dir(tmp_path_factory.mktemp("audit-cli"))  # `init`, then `identities import`
    result = kb_cli("identities", "add", "5550001111", "--email", "c@example.org", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    out = data_dir / "audit.jsonl"
    result = kb_cli("audit", "export", "--output", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["chain"], e["seq"], e["action"], e["outcome"]) for e in entries] == [
        ("admin", 1, "init", "success"),
        ("admin", 2, "identities_import", "success"),
        ("admin", 3, "identities_add", "success"),
    ]
    assert entries[1]["subject"] == "1 new, 0 updated"
    assert entries[2]["subject"].startswith("id_hmac:")
    assert "5550001111" not in out.read_text()
    assert entries[0]["prev_hash"] == GENESIS.hex()
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    assert set(entries[0]) == {
        *("id", "chain", "seq", "at", "partner_id", "action", "outcome", "reason", "subject", "prev_hash", "hash"),
    }
    stdout = kb_cli("audit", "export", data_dir=data_dir)
    assert stdout.stdout == out.read_text()
    assert ADMIN_CHAIN.decode() == entries[0]["chain"]
    verified = kb_cli("audit", "verify", data_dir=data_dir)
    assert verified.returncode == 0, verified.stderr
    assert "3 entries in 1 chain(s)" in verified.stdout


def test_partner_and_issuer_key_changes_are_admin_entries(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = make_data_dir(tmp_path_factory.mktemp("audit-admin"))
    keys = []
    for args in (
        ("partners", "add", "audited-wallet"),
        ("partners", "rotate-key", "audited-wallet"),
        ("partners", "disable", "audited-wallet"),
        ("partners", "enable", "audited-wallet"),
        ("keys", "rotate"),
    ):
        result = kb_cli(*args, data_dir=data_dir)
        assert result.returncode == 0, (args, result.stderr)
        keys += [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("api key")]
    assert len(keys) == 2
    refused = kb_cli("partners", "disable", "no-such-wallet", data_dir=data_dir)
    assert refused.returncode == 1  # nothing changed, so nothing is audited
    exported = kb_cli("audit", "export", data_dir=data_dir)
    entries = [json.loads(line) for line in exported.stdout.splitlines()]
    admin = [(e["action"], e["subject"]) for e in entries if e["chain"] == ADMIN_CHAIN.decode()]
    assert admin[2:6] == [
        ("partners_add", "partner audited-wallet"),
        ("partners_rotate_key", "partner audited-wallet"),
        ("partners_disable", "partner audited-wallet"),
        ("partners_enable", "partner audited-wallet"),
    ]
    assert admin[6][0] == "keys_rotate"
    assert admin[6][1].endswith("self-signed")
    assert len(admin) == 7
    assert all(k not in exported.stdout for k in keys)
    assert kb_cli("audit", "verify", data_dir=data_dir).returncode == 0
