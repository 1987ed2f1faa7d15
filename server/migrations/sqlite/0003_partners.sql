-- depends: 0002_wla_revocation
-- Binding partners. The API key is kept only as its SHA-256 (the key is 256 random bits, shown once);
-- a partner may instead authenticate with an mTLS client certificate, pinned by its SHA-256 fingerprint.

CREATE TABLE partners (
    partner_id          TEXT PRIMARY KEY,
    api_key_sha256      BLOB NOT NULL CHECK (length(api_key_sha256) = 32),
    client_cert_sha256  TEXT UNIQUE,
    enabled             INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
