-- depends: 0009_commit_binding_function
-- Issue 13 hardening: failure budgets per partner and for everyone, GetBindingNonce limits, indexes for the
-- bounded sweep of expired rows, and the HSM-signed heads of the audit chains (see server/audit.py).

-- Fixed-window counters that are not an individual's: scope names the limit ('auth_failures', 'nonces'),
-- key the partner ('*' for the global budget). Distribution column: key (each statement names one or two
-- keys and is a transaction of its own, never joined with an individual's rows).
CREATE TABLE limit_windows (
    scope         text NOT NULL,
    key           text NOT NULL,
    window_start  timestamptz NOT NULL,
    count         integer NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX limit_windows_by_start ON limit_windows (window_start);

-- GetBindingNonce calls per individual, counted in the transaction that stores the nonce.
ALTER TABLE individual_limits ADD COLUMN nonce_window_start timestamptz;
ALTER TABLE individual_limits ADD COLUMN nonces integer NOT NULL DEFAULT 0;

-- The sweep deletes expired rows oldest first, a bounded batch per run.
CREATE INDEX otps_by_expiry ON otps (expires_at);
CREATE INDEX wla_jtis_by_expiry ON wla_jtis (expires_at);
CREATE INDEX binding_nonces_by_expiry ON binding_nonces (expires_at);

-- The sweep signs the heads of the chains written since its last run, found by entry id.
CREATE INDEX audit_log_by_id ON audit_log (id);

-- The last signed head of each audit chain: (chain_key, seq, hash) under an HMAC whose key never leaves
-- the HSM. Recomputing a chain needs no key; matching a signed head does. Distribution column: chain_key.
CREATE TABLE audit_heads (
    chain_key  bytea PRIMARY KEY,
    seq        bigint NOT NULL CHECK (seq >= 1),
    hash       bytea NOT NULL,
    signed_at  timestamptz NOT NULL,
    mac        bytea NOT NULL
);
