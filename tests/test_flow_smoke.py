"""Smoke: one OTP binding through the real server."""

from __future__ import annotations

from cryptography import x509

from server.grpc_api.demo import new_wallet_key
from tests.conftest import Person, RunningServer, bind_request, md, otp_challenge, send_otp


def test_otp_binding_issues_certificate(kb: RunningServer, person: Person) -> None:
    _, otp = send_otp(kb, person)
    _, jwk = new_wallet_key("ec-p256")
    resp = kb.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
    cert = x509.load_pem_x509_certificate(resp.certificate.encode())
    assert cert.subject.rfc4514_string() == f"CN={resp.partner_specific_user_token}"
