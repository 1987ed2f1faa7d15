-- depends: 0005_limits_audit
-- Issuer key lifecycle: a key may be pending (a CSR was made, no certificate is installed yet), and an
-- installed key records from when it may sign (not_before) and the CA chain above its certificate.
-- In place: no row is copied or lost. Existing issuers become installed with not_before = created_at
-- (`keybinder init` used one instant for both), which makes the newest of them the active one, as before.
-- issuers stays a small reference table (replicated to every node on Citus).

ALTER TABLE issuers
    ALTER COLUMN certificate_pem DROP NOT NULL,
    ALTER COLUMN not_after DROP NOT NULL,
    ADD COLUMN state text NOT NULL DEFAULT 'installed'
        CONSTRAINT issuers_state_check CHECK (state IN ('pending', 'installed')),
    ADD COLUMN not_before timestamptz,
    ADD COLUMN csr_pem text,
    ADD COLUMN chain_pem text NOT NULL DEFAULT '';

UPDATE issuers SET not_before = created_at;

ALTER TABLE issuers
    ADD CONSTRAINT issuers_installed_complete
        CHECK (state = 'pending' OR (certificate_pem IS NOT NULL AND not_before IS NOT NULL AND not_after IS NOT NULL)),
    ADD CONSTRAINT issuers_pending_has_csr
        CHECK (state = 'installed' OR (certificate_pem IS NULL AND csr_pem IS NOT NULL));
