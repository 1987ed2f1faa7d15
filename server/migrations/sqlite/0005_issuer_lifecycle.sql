-- depends: 0004_limits_audit
-- Issuer key lifecycle: a key may be pending (a CSR was made, no certificate is installed yet), and an
-- installed key records from when it may sign (not_before) and the CA chain above its certificate.
-- SQLite cannot drop NOT NULL in place: the small issuers table is rebuilt, every row copied. Existing
-- issuers become installed with not_before = created_at (`keybinder init` used one instant for both),
-- which makes the newest of them the active one, as before.

CREATE TABLE issuers_v2 (
    key_label        TEXT PRIMARY KEY,
    key_kind         TEXT NOT NULL,
    certificate_pem  TEXT,
    not_after        TEXT,
    created_at       TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'installed' CHECK (state IN ('pending', 'installed')),
    not_before       TEXT,
    csr_pem          TEXT,
    chain_pem        TEXT NOT NULL DEFAULT '',
    CHECK (state = 'pending' OR (certificate_pem IS NOT NULL AND not_before IS NOT NULL AND not_after IS NOT NULL)),
    CHECK (state = 'installed' OR (certificate_pem IS NULL AND csr_pem IS NOT NULL))
);

INSERT INTO issuers_v2 (key_label, key_kind, certificate_pem, not_after, created_at, state, not_before)
SELECT key_label, key_kind, certificate_pem, not_after, created_at, 'installed', created_at
FROM issuers;

DROP TABLE issuers;

ALTER TABLE issuers_v2 RENAME TO issuers;
