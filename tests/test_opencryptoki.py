"""KeyBinder end to end on openCryptoki's software token: an RSA-3072 issuer behind a second module.

The HSM suite (tests/test_hsm.py) runs on openCryptoki too; this checks the whole path: `init`
against an existing token, then bindings whose certificates the RSA issuer key signed with
CKM_RSA_PKCS (openCryptoki 3.8 has no CKM_SHA256_RSA_PKCS, EC or EdDSA).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import load_settings
from server.grpc_api.demo import new_wallet_key
from server.issuer_admin import issuer_chain_pem
from server.provisioning import initialise
from tests.conftest import RunningServer, bind_request, md, new_person, otp_challenge, running, send_otp
from tests.hsm_backends import HsmBackend


@pytest.fixture(scope="module")
def kb_ock(opencryptoki_backend: HsmBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("ock-data"), hsm_uri=str(opencryptoki_backend.uri), otp_ttl_seconds=60
    )
    report = initialise(settings)
    # The token and both keys were made on the HSM beforehand: init only issues the certificate.
    assert any("HMAC key" in line for line in report.reused), report
    assert any("issuer key" in line for line in report.reused), report
    with running(settings) as server:
        yield server


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519"])
def test_binding_with_an_rsa_issuer_on_opencryptoki(kb_ock: RunningServer, key_type: str) -> None:
    issuer = x509.load_pem_x509_certificates(issuer_chain_pem(kb_ock.app.store).encode())[0]
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, rsa.RSAPublicKey)
    assert issuer_key.key_size == 3072
    issuer.verify_directly_issued_by(issuer)  # self-signed in the HSM by init
    person = new_person(kb_ock)
    _, otp = send_otp(kb_ock, person)
    private, jwk = new_wallet_key(key_type)
    resp = kb_ock.stub.DoKeyBinding(bind_request(person, jwk, otp_challenge(otp)), metadata=md())
    cert = x509.load_pem_x509_certificate(resp.certificate.encode())
    cert.verify_directly_issued_by(issuer)
    assert cert.public_key() == private.public_key()
