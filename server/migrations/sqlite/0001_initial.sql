-- KeyBinder schema v1 (SQLite). Times are ISO-8601 UTC text of one fixed width, so they compare as text.
-- Every row that describes a person is keyed by id_hmac, the HSM-keyed HMAC of the individual ID.

CREATE TABLE individuals (
    id_hmac     BLOB PRIMARY KEY,
    email       TEXT,
    phone       TEXT,
    name        TEXT,
    pin_hmac    BLOB,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE otps (
    transaction_id  TEXT PRIMARY KEY,
    id_hmac         BLOB NOT NULL,
    partner_id      TEXT NOT NULL,
    otp_hmac        BLOB NOT NULL,
    created_at      TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'used', 'replaced')),
    CHECK (attempts >= 0 AND attempts <= max_attempts)
);
-- Sending a new OTP invalidates the previous one: at most one outstanding per individual and partner.
CREATE UNIQUE INDEX otps_one_pending ON otps (id_hmac, partner_id) WHERE state = 'pending';

CREATE TABLE bindings (
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
    status            TEXT NOT NULL CHECK (status IN ('active', 'superseded')),
    created_at        TEXT NOT NULL,
    expires_at        TEXT NOT NULL,
    superseded_at     TEXT
);
-- The schema, not only the code, guarantees one active binding per individual, partner and factor.
CREATE UNIQUE INDEX bindings_one_active ON bindings (id_hmac, partner_id, auth_factor_type) WHERE status = 'active';
CREATE INDEX bindings_by_individual ON bindings (id_hmac, partner_id);

-- A wallet key belongs to one individual for good: binding it to another is refused.
CREATE TABLE wallet_keys (
    key_fingerprint  TEXT PRIMARY KEY,
    id_hmac          BLOB NOT NULL,
    created_at       TEXT NOT NULL
);

CREATE TABLE issuers (
    key_label        TEXT PRIMARY KEY,
    key_kind         TEXT NOT NULL,
    certificate_pem  TEXT NOT NULL,
    not_after        TEXT NOT NULL,
    created_at       TEXT NOT NULL
);
