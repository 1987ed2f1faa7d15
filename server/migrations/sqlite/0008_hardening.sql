-- depends: 0007_kbi
-- Issue 13 hardening: failure budgets per partner and for everyone, GetBindingNonce limits, indexes for the
-- bounded sweep of expired rows, and the HSM-signed heads of the audit chains (see server/audit.py).

-- Fixed-window counters that are not an individual's: scope names the limit ('auth_failures', 'nonces'),
-- key the partner ('*' for the global budget).
CREATE TABLE limit_windows (
    scope         TEXT NOT NULL,
    key           TEXT NOT NULL,
    window_start  TEXT NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX limit_windows_by_start ON limit_windows (window_start);

-- GetBindingNonce calls per individual, counted in the transaction that stores the nonce.
ALTER TABLE individual_limits ADD COLUMN nonce_window_start TEXT;
ALTER TABLE individual_limits ADD COLUMN nonces INTEGER NOT NULL DEFAULT 0;

-- The sweep deletes expired rows oldest first, a bounded batch per run.
CREATE INDEX otps_by_expiry ON otps (expires_at);
CREATE INDEX wla_jtis_by_expiry ON wla_jtis (expires_at);
CREATE INDEX binding_nonces_by_expiry ON binding_nonces (expires_at);

-- The last signed head of each audit chain: (chain_key, seq, hash) under an HMAC whose key never leaves
-- the HSM. Recomputing a chain needs no key; matching a signed head does.
CREATE TABLE audit_heads (
    chain_key  BLOB PRIMARY KEY,
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    hash       BLOB NOT NULL,
    signed_at  TEXT NOT NULL,
    mac        BLOB NOT NULL
);
