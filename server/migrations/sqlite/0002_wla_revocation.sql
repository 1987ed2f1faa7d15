-- depends: 0001_initial
-- Revocation, the WLA replay cache and proof-of-possession nonces.
-- SQLite cannot change a CHECK constraint in place: the bindings table is rebuilt, every row copied.

CREATE TABLE bindings_v2 (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    id_hmac           BLOB NOT NULL,
    partner_id        TEXT NOT NULL,
    auth_factor_type  TEXT NOT NULL,
    psut              TEXT NOT NULL,
    key_fingerprint   TEXT NOT NULL,
    certificate_pem   TEXT NOT NULL,
    cert_thumbprint   TEXT NOT NULL UNIQUE,
    serial_hex        TEXT NOT NULL,
    issuer_key_label  TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    created_at        TEXT NOT NULL,
    expires_at        TEXT NOT NULL,
    superseded_at     TEXT,
    revoked_at        TEXT,
    revocation_reason TEXT
);

INSERT INTO bindings_v2 (id, id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem,
                         cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at, superseded_at)
SELECT id, id_hmac, partner_id, auth_factor_type, psut, key_fingerprint, certificate_pem,
       cert_thumbprint, serial_hex, issuer_key_label, status, created_at, expires_at, superseded_at
FROM bindings;

DROP TABLE bindings;

ALTER TABLE bindings_v2 RENAME TO bindings;

CREATE UNIQUE INDEX bindings_one_active ON bindings (id_hmac, partner_id, auth_factor_type) WHERE status = 'active';

CREATE INDEX bindings_by_individual ON bindings (id_hmac, partner_id);

CREATE INDEX bindings_by_psut ON bindings (psut, partner_id);

-- A WLA token's jti is accepted once until the token expires; replicas share this table.
CREATE TABLE wla_jtis (
    id_hmac     BLOB NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    PRIMARY KEY (id_hmac, jti)
);

CREATE TABLE binding_nonces (
    nonce       TEXT PRIMARY KEY,
    id_hmac     BLOB NOT NULL,
    partner_id  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT
);

CREATE INDEX binding_nonces_by_individual ON binding_nonces (id_hmac, partner_id);
